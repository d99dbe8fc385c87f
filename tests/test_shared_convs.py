"""Convs called more than once per forward (one module applied to several inputs) are sites.

One block serves every call: growth, training and folding stay exact; in online mode the kernel is
assembled once per training forward pass (counted), with the same gradients as assembling it per call.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.numerics import rel_err
from torch import nn

import dyrep_fx
from dyrep_fx import block as block_module
from dyrep_fx.controller import DYREP_KINDS

pytestmark = pytest.mark.usefixtures("one_thread")


class Siamese(nn.Module):
    """One 3x3 conv applied to three inputs (as a detection head's conv is to each pyramid level)."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.shared = nn.Conv2d(6, 6, 3, padding=1, bias=bias)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        f = torch.relu(self.bn(self.stem(x)))
        levels = [f, nn.functional.avg_pool2d(f, 2), nn.functional.avg_pool2d(f, 4)]
        pooled = sum(torch.relu(self.shared(level)).mean((2, 3)) for level in levels)
        return self.head(pooled)


def data(i: int):
    g = torch.Generator().manual_seed(i)
    return torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (4,), generator=g)




def shuffled(model):
    """Move every parameter and BatchNorm statistic away from its initial value."""
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model


@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_a_conv_called_three_times_grows_trains_and_folds_exactly(mode):
    torch.manual_seed(0)
    model = Siamese().double()
    dyrep_fx.transform(model, mode=mode)
    site = next(s for s in dyrep_fx.sites(model) if s.name == "shared")
    assert site.eligible and site.calls == 3, site.reason
    x, _ = data(0)
    model.eval()
    before = model(x)
    conv = copy.deepcopy(model.shared)
    report = dyrep_fx.grow(model, ["shared"], list(DYREP_KINDS))
    assert "shared" in report.changed
    shuffled_block = model.shared
    assert rel_err(model(x), before) < 1e-12
    if mode == "online":  # online blocks keep the function in train mode too
        f = torch.randn(2, 6, 5, 5, dtype=torch.float64)
        assert rel_err(model.shared.train()(f), conv(f)) < 1e-12
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(3):
        xb, yb = data(10 + i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    assert all(p.grad is not None for p in shuffled_block.parameters() if p.requires_grad)
    model.eval()
    trained = model(x)
    deploy = dyrep_fx.fold(model)
    assert type(deploy.shared) is nn.Conv2d
    assert rel_err(deploy(x), trained) < 1e-12
    fresh = Siamese().double()
    fresh.load_state_dict(deploy.state_dict(), strict=True)
    assert rel_err(fresh.eval()(x), trained) < 1e-12


def count_assemblies(monkeypatch) -> list[int]:
    count = [0]
    original = block_module.assemble_kernel

    def counting(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(block_module, "assemble_kernel", counting)
    return count


def grown_siamese():
    torch.manual_seed(0)
    model = shuffled(Siamese().double())
    dyrep_fx.transform(model)
    dyrep_fx.grow(model, ["shared"], list(DYREP_KINDS))
    model.shared.execution = "assemble"  # one kernel for every branch (no two-conv plan for 1x1_kxk)
    shuffled(model)
    return model


def test_one_kernel_assembly_per_training_forward(monkeypatch):
    model = grown_siamese()
    count = count_assemblies(monkeypatch)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = data(1)
    loss = nn.functional.cross_entropy(model(x), y)
    assert count[0] == 1  # three calls, one assembly
    loss.backward()
    opt.step()
    model(x)
    assert count[0] == 2  # the step changed the parameters: assembled again, once
    with torch.no_grad():
        model(x)
    assert count[0] == 5  # without gradients nothing is kept: one per call


def test_shared_kernel_gradients_equal_per_call_assembly(monkeypatch):
    x, y = data(2)
    model = grown_siamese()
    nn.functional.cross_entropy(model(x), y).backward()
    shared = {n: p.grad.clone() for n, p in model.named_parameters()}
    model = grown_siamese()
    monkeypatch.setattr(block_module.RepConv2d, "_call_kernel", block_module.RepConv2d._online_kernel)
    nn.functional.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(shared[n], p.grad, rtol=1e-12, atol=1e-15, msg=n)


def test_gradient_accumulation_builds_a_fresh_graph_each_forward(monkeypatch):
    model = grown_siamese()
    count = count_assemblies(monkeypatch)
    (x1, y1), (x2, y2) = data(3), data(4)
    nn.functional.cross_entropy(model(x1), y1).backward()
    nn.functional.cross_entropy(model(x2), y2).backward()  # no optimizer step in between
    assert count[0] == 2
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    nn.functional.cross_entropy(model(x1), y1).backward()
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    nn.functional.cross_entropy(model(x2), y2).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(accumulated[n], first[n] + p.grad, rtol=1e-12, atol=1e-15, msg=n)


def test_a_kept_kernel_never_outlives_a_parameter_change():
    """Written through ``.data`` (no version counter sees it) between two forward calls with gradients:
    the second call computes with the new value (the full matrix of writes is in test_forward_scope.py)."""
    model = grown_siamese()
    x, _ = data(5)
    out = model(x)  # gradients on, no backward
    model.shared.branches["1x1"].scale.data.mul_(3.0)
    changed = model(x)
    with torch.no_grad():
        reference = model(x)  # no kept kernel without gradients
    assert rel_err(changed, reference) < 1e-14 and rel_err(changed, out) > 1e-6
