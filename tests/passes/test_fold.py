"""``passes.fold`` (via ``dyrep_fx.fold`` and directly): blocks back to the original architecture, exactly."""

from __future__ import annotations

import pytest
import torch
from helpers.numerics import randomise, rel_err
from torch import nn

import dyrep_fx
from dyrep_fx.passes import PassError, fold
from dyrep_fx.passes.base import set_module
from dyrep_fx.tracing import trace_model

TOL = 1e-9


# float64 / tiny convs on CPU: one intra-op thread is much faster than two here.
pytestmark = pytest.mark.usefixtures("one_thread")
X = torch.randn(2, 4, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))




def out(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)




class TaggedConv(nn.Conv2d):
    """A user's Conv2d subclass (like mmcv's wrappers): the folded conv must be of this class again."""

    def describe(self) -> str:
        return f"tagged {self.kernel_size}"


class BiasFree(nn.Module):
    """Bias-free convs each feeding only a BatchNorm: in dbb mode their folded bias goes into the BN."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.c2 = TaggedConv(6, 6, 3, padding=2, dilation=2, bias=False, padding_mode="reflect")
        self.bn2 = nn.BatchNorm2d(6)
        self.c3 = nn.Conv2d(6, 6, 3, stride=2, padding="valid", groups=3, bias=True)  # own bias, no BN

    def forward(self, x):
        x = torch.relu(self.bn1(self.c1(x)))
        x = torch.relu(self.bn2(self.c2(x)))
        return self.c3(x)


def build(mode: str) -> tuple[nn.Module, list[str]]:
    torch.manual_seed(0)
    model = BiasFree().double()
    keys = list(model.state_dict())
    dyrep_fx.transform(model, mode=mode)
    return model, keys


@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_fold_is_exact_and_restores_the_original_architecture(mode):
    model, keys = build(mode)
    randomise(model)
    ref0 = out(model)
    dyrep_fx.grow(model)
    assert rel_err(out(model), ref0) <= TOL
    randomise(model, seed=1)
    ref = out(model)
    means = {n: model.get_submodule(n).running_mean.clone() for n in ["bn1", "bn2"]}
    folded = dyrep_fx.fold(model)
    assert rel_err(out(folded), ref) <= TOL
    assert list(folded.state_dict()) == keys
    assert type(folded.c1) is nn.Conv2d and type(folded.c2) is TaggedConv and folded.c2.describe() == "tagged (3, 3)"
    assert folded.c1.bias is None and folded.c2.bias is None and folded.c3.bias is not None
    for attr in ["kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"]:
        assert getattr(folded.c2, attr) == getattr(BiasFree().c2, attr), attr
        assert getattr(folded.c3, attr) == getattr(BiasFree().c3, attr), attr
    fresh = BiasFree().double()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    assert rel_err(out(fresh), ref) <= TOL
    # dbb mode: the bias the branches bring went into the following BN's running mean
    for n in ["bn1", "bn2"]:
        changed = not torch.equal(folded.get_submodule(n).running_mean, means[n])
        assert changed == (mode == "dbb"), n


def test_fold_report_names_the_absorbing_bn():
    model, _ = build("dbb")
    dyrep_fx.grow(model, ["c1", "c3"], ["1x1"])
    report = fold.run(dyrep_fx.api.state_of(model).traced, model)
    assert report.name == "fold"
    assert report.changed == {"c1": ["1x1"], "c3": ["1x1"]}
    assert report.details["bias_absorbed_into"] == {"c1": "bn1"}
    assert type(model.c1) is nn.Conv2d and model.c1.bias is None


def test_fold_absorbs_dbb_bias_into_bn_exactly_in_eval_mode():
    """The minimal case: bias-free conv + BN, dbb mode."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)).double()
    keys = list(model.state_dict())
    dyrep_fx.transform(model, mode="dbb")
    dyrep_fx.grow(model)
    randomise(model, seed=5)
    ref = out(model)
    assert model[0].equivalent()[1].abs().max() > 0  # dbb: the block has a bias for the BN to absorb
    folded = dyrep_fx.fold(model)
    assert list(folded.state_dict()) == keys and folded[0].bias is None
    assert rel_err(out(folded), ref) <= TOL
    # the grown model is still dbb with its main BN
    assert model[0].mode == "dbb" and hasattr(model[0], "main_bn")


def test_fold_nested_and_partly_cut_blocks():
    model, keys = build("online")
    dyrep_fx.grow(model, ["c1", "c2"])
    dyrep_fx.grow(model, ["c1.branches.1x1_kxk.conv2"])
    dyrep_fx.cut(model, "c2", model.c2.kinds)  # an un-grown block
    randomise(model, seed=2)
    ref = out(model)
    report = fold.run(dyrep_fx.api.state_of(model).traced, model)
    assert set(report.changed) == {"c1", "c2"} and report.changed["c2"] == []
    assert report.describe("c2") == "folded nothing"
    assert not dyrep_fx.blocks(model) and list(model.state_dict()) == keys
    assert rel_err(out(model), ref) <= TOL


def test_fold_keeps_training_flags_and_requires_grad():
    model, _ = build("online")
    dyrep_fx.grow(model, ["c1"])
    model.train()
    model.c3.eval()
    folded = dyrep_fx.fold(model)
    assert folded.training and folded.c1.training and not folded.c3.training
    assert folded.c1.weight.requires_grad


def test_fold_refuses_a_bias_it_cannot_absorb_and_changes_nothing():
    """A dbb block on a bias-free conv that does not feed only a BN (built by hand: analysis refuses it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU()).double()
    traced = trace_model(model)
    set_module(model, "0", dyrep_fx.RepConv2d(model[0], mode="dbb"))
    model[0].grow(["1x1"])
    set_module(model, "2", dyrep_fx.RepConv2d(model[2], mode="dbb"))
    model[2].grow(["1x1"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = dict(dyrep_fx.blocks(model))
    with pytest.raises(PassError, match="'2'.*BatchNorm"):
        fold.run(traced, model)
    assert dyrep_fx.blocks(model) == blocks
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
