"""``passes.fuse_bn``: conv + BatchNorm to one conv for deployment, on a folded model."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers.numerics import randomise_bns, rel_err
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import dyrep_fx
from dyrep_fx.passes import PassError, fuse_bn
from dyrep_fx.tracing import trace_model

TOL = 1e-9


# float64 / tiny convs on CPU: one intra-op thread is much faster than two here.
pytestmark = pytest.mark.usefixtures("one_thread")




def out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)




@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_fuse_bn_on_folded_resnet18(mode):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    dyrep_fx.transform(model, mode=mode)
    dyrep_fx.grow(model, ["conv1", "layer1.0.conv1", "layer2.0.downsample.0", "layer3.1.conv2"])
    randomise_bns(model)
    ref = out(model, x)
    folded = dyrep_fx.fold(model)
    with pytest.raises(PassError, match="folded model"):
        dyrep_fx.fuse_bn(model)  # the grown model is refused
    report = dyrep_fx.fuse_bn(folded)
    assert report.name == "fuse_bn" and len(report.changed) == 20 and not report.skipped
    assert report.changed["conv1"] == ["bn1"]
    assert report.changed["layer2.0.downsample.0"] == ["layer2.0.downsample.1"]
    assert not any(isinstance(m, _BatchNorm) for m in folded.modules())
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.layer2[0].downsample[1], nn.Identity)
    assert all(m.bias is not None for m in folded.modules() if isinstance(m, nn.Conv2d))
    assert rel_err(out(folded, x), ref) <= TOL


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fused = nn.Conv2d(3, 4, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.to_relu = nn.Conv2d(4, 4, 3, padding=1)
        self.twice_a = nn.Conv2d(4, 4, 1, bias=False)
        self.twice_b = nn.Conv2d(4, 4, 1, bias=False)
        self.shared_bn = nn.BatchNorm2d(4)
        self.no_stats = nn.Conv2d(4, 4, 1, bias=False)
        self.bn_no_stats = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        x = self.bn(self.fused(x))
        x = torch.relu(self.to_relu(x))
        x = self.shared_bn(self.twice_a(x)) + self.shared_bn(self.twice_b(x))
        return x + self.bn_no_stats(self.no_stats(x))


def test_fuse_bn_skips_what_it_cannot_fuse():
    torch.manual_seed(0)
    model = Mixed().double()
    randomise_bns(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ref = out(model, x)
    report = fuse_bn.run(trace_model(model), model)
    assert report.changed == {"fused": ["bn"]} and report.describe("fused") == "absorbed bn"
    assert "does not feed only a BatchNorm" in report.skipped["to_relu"]
    assert "more than once" in report.skipped["twice_a"] and "more than once" in report.skipped["twice_b"]
    assert "no running statistics" in report.skipped["no_stats"]
    assert isinstance(model.bn, nn.Identity) and isinstance(model.shared_bn, nn.BatchNorm2d)
    assert rel_err(out(model, x), ref) <= TOL
