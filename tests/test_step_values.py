"""What one DyRep step changes, checked by values rather than by "it did not crash".

* A plan applied grows exactly its sites with exactly its kinds: the planned site computes what its conv
  computed, and every other conv and every other tensor of the model is bitwise what it was. The plan here
  is not the scorer's choice (another site is the most salient one), so growing the top-scored site, the
  first candidate, or every kind the site takes instead of the planned ones all fail by value.
* The EMA copy's growth (``DyRep.attach_ema``, :mod:`dyrep_fx.ema_copies`): after a step, the copy's grown
  block computes the copy's previous function (its own averaged kernel, not the live model's), its new
  branches hold exactly the live model's new branch values, and nothing else of the copy changed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.nets import SmallNet
from helpers.numerics import rel_err
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import dyrep_fx
from dyrep_fx.defaults import PAPER_SCHEDULE
from dyrep_fx.step_plan import StepPlan

pytestmark = pytest.mark.usefixtures("one_thread")

SITES = ("conv1", "conv2", "conv3")
X_EVAL = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3000 + i)
    return torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)


def train(model: nn.Module, opt: torch.optim.Optimizer, iters: int, start: int = 0, ema=None) -> None:
    for i in range(start, start + iters):
        x, y = batch(i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(model)


@torch.no_grad()
def run_eval(model: nn.Module) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return model(X_EVAL)
    finally:
        model.train(was)


def favour(ctl: dyrep_fx.DyRep, name: str) -> None:
    """Make ``name`` the most salient site of the interval."""
    ctl.saliency.total[ctl.saliency.names.index(name)] += 1e6


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def conv_function(conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode ``(kernel, bias)`` a conv or a grown block computes with (a missing bias as zeros)."""
    weight, bias = conv.equivalent() if isinstance(conv, dyrep_fx.RepConv2d) else (conv.weight, conv.bias)
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias
    return weight.detach().clone(), bias.detach().clone()


def calib_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batch(500 + i) for i in range(3)]


# -- a plan grows its sites, with its kinds, and nothing else ------------------------------------------
PLANNED = {"conv3": ("1x1", "kx1")}  # neither the most salient site nor every kind conv3 takes


@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_a_plan_grows_exactly_its_site_with_its_kinds_and_nothing_else(mode):
    torch.manual_seed(0)
    model = SmallNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctl = dyrep_fx.DyRep(model, opt, interval=1, mode=mode, nested="open", **PAPER_SCHEDULE)
    train(model, opt, 2)
    favour(ctl, "conv2")
    decided = ctl.decide()
    assert list(decided.grow) == ["conv2"]  # the scorer's choice, which the plan below overrides
    site = {s.name: s for s in ctl.sites()}["conv3"]
    assert set(site.kinds) > set(PLANNED["conv3"])  # the site takes more kinds than planned
    plan = StepPlan.from_dict({**decided.to_dict(), "grow": {k: list(v) for k, v in PLANNED.items()}})

    before = snapshot(model)
    functions = {name: conv_function(model.get_submodule(name)) for name in SITES}
    out_before = run_eval(model)
    result = ctl.apply(plan)

    assert result.grown == {"conv3": ["1x1", "kx1"]}
    assert {name: site["kinds"] for name, site in dyrep_fx.structure(model)["sites"].items()} == \
        {"conv3": ["1x1", "kx1"]}
    block = model.conv3
    assert isinstance(block, dyrep_fx.RepConv2d) and block.kinds == ["1x1", "kx1"]
    # the planned site computes what its conv computed (exact at growth: eval mode in dbb mode)
    weight, bias = conv_function(block)
    assert rel_err(weight, functions["conv3"][0]) < 1e-12
    assert (bias - functions["conv3"][1]).abs().max() < 1e-12
    for kind in PLANNED["conv3"]:  # the new branches are real, not zero kernels
        assert block.branches[kind].kernel()[0].abs().max() > 0, kind
    # every other conv is the plain conv it was, with bitwise the same values; so is every other tensor
    for name in ("conv1", "conv2"):
        conv = model.get_submodule(name)
        assert type(conv) is nn.Conv2d, name
        assert all(torch.equal(a, b) for a, b in zip(conv_function(conv), functions[name])), name
    after = model.state_dict()
    outside = [k for k in before if not k.startswith("conv3.")]
    assert [k for k in after if not k.startswith("conv3.")] == outside
    for key in outside:
        assert torch.equal(after[key], before[key]), key
    assert rel_err(run_eval(model), out_before) < 1e-12  # the network's function is kept


# -- the EMA copy grows with the live model ------------------------------------------------------------
@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_the_ema_copy_grows_keeping_its_own_function_with_the_live_new_branches(mode):
    torch.manual_seed(0)
    model = SmallNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    ctl = dyrep_fx.DyRep(model, opt, interval=1, mode=mode, calib_loader=calib_batches(), calib_batches=3,
                         **PAPER_SCHEDULE)
    ctl.attach_ema(ema.module)
    train(model, opt, 3, ema=ema)
    favour(ctl, "conv2")
    copy_ = ema.module

    before = snapshot(copy_)
    ema_functions = {name: conv_function(copy_.get_submodule(name)) for name in SITES}
    live_function = conv_function(model.conv2)
    # the copy's average is not the live kernel: a copy re-balanced to the live function fails below
    assert rel_err(ema_functions["conv2"][0], live_function[0]) > 1e-3
    out_before = run_eval(copy_)
    result = ctl.step()
    assert list(result.grown) == ["conv2"]
    kinds = result.grown["conv2"]

    block, live = copy_.conv2, model.conv2
    assert isinstance(block, dyrep_fx.RepConv2d) and block.kinds == kinds == live.kinds
    # the copy's grown block computes the copy's previous function
    weight, bias = conv_function(block)
    assert rel_err(weight, ema_functions["conv2"][0]) < 1e-12
    assert (bias - ema_functions["conv2"][1]).abs().max() < 1e-12
    # its new branches start from the live model's values (parameters and, in dbb mode, the calibrated
    # BatchNorm statistics), bitwise
    for kind in kinds:
        mine, theirs = block.branches[kind].state_dict(), live.branches[kind].state_dict()
        assert list(mine) == list(theirs), kind
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), f"{kind}.{key}"
    # ... and the main kernel is the copy's own (re-balanced from the copy's average, not the live one's)
    assert rel_err(block.state_dict()["weight"], live.state_dict()["weight"]) > 1e-3
    # nothing else of the copy changed
    after = copy_.state_dict()
    outside = [k for k in before if not k.startswith("conv2.")]
    assert [k for k in after if not k.startswith("conv2.")] == outside
    for key in outside:
        assert torch.equal(after[key], before[key]), key
    assert rel_err(run_eval(copy_), out_before) < (1e-12 if mode == "online" else 1e-9)
    # the copy goes on averaging the live model, tensor by tensor
    old = copy.deepcopy(copy_)
    ema.update_parameters(model)
    for (name, e), m, o in zip(copy_.named_parameters(), model.parameters(), old.parameters()):
        assert torch.allclose(e, o + (m - o) * 0.2, rtol=1e-12, atol=1e-15), name
