"""When DyRep grows and how much: growth from the start (``grow_at_start``), ``topk`` per step, and
``topk=0`` (the reverse path: start grown, only cut).

The start step is scored on the first iteration's gradients at the initial weights (SNIP's saliency
at initialisation); its values are checked against a by-hand computation on a twin of the model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.nets import SmallNet, small_batch, spread_first_block
from helpers.numerics import rel_err
from torch import nn

import dyrep_fx

pytestmark = pytest.mark.usefixtures("one_thread")

SITES = ["conv1", "conv2", "conv3"]


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return small_batch(2000 + i)


def make(**kw):
    torch.manual_seed(0)
    model = SmallNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt, dyrep_fx.DyRep(model, opt, **kw)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    x, y = batch(i)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def snip_at_init(model: nn.Module, i: int = 0) -> dict[str, float]:
    """``sum |grad * weight|`` of every site on batch ``i`` at ``model``'s current weights (a twin)."""
    twin = copy.deepcopy(model)
    x, y = batch(i)
    nn.functional.cross_entropy(twin(x), y).backward()
    convs = {name: twin.get_submodule(name) for name in SITES}
    return {name: float((c.weight.grad * c.weight).detach().abs().sum()) for name, c in convs.items()}


@torch.no_grad()
def outputs(model: nn.Module) -> torch.Tensor:
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    model.eval()
    try:
        return model(x)
    finally:
        model.train()


def test_the_start_step_grows_the_fraction_best_scored_at_initialisation():
    model, opt, ctl = make(interval=4, grow_at_start=0.5, metric="snip")
    expected = snip_at_init(model)
    assert ctl.is_due()  # before any unit: the start step comes first
    train_step(model, opt, 0)
    before = outputs(model)
    result = ctl.step()
    assert result.due and result.unit == 1
    # the first iteration's scores at the initial weights (not after the update: those differ)
    assert result.saliency == pytest.approx(expected, rel=1e-12)
    best_two = sorted(expected, key=expected.get, reverse=True)[:2]  # round(0.5 * 3) = 2
    assert sorted(result.grown) == sorted(best_two)
    assert sorted(dyrep_fx.blocks(model)) == sorted(best_two)
    assert rel_err(outputs(model), before) < 1e-12


def test_the_defaults_grow_half_the_sites_at_the_first_call_by_per_weight_snip_at_initialisation():
    """Issue 31's defaults (dyrep_fx.defaults.GROW_AT_START, saliency.DEFAULT_METRIC): with no schedule
    arguments the first call grows round(0.5 * 3) = 2 sites, ranked by ``mean |grad * weight|``. On SmallNet
    the per-weight ranking differs from the summed one (conv2 and conv3 hold 5x and 11x conv1's weights), so
    a default left at ``snip`` fails here, as does one left at the paper's first step after ``interval`` units."""
    model, opt, ctl = make()
    sizes = {name: model.get_submodule(name).weight.numel() for name in SITES}
    summed = snip_at_init(model)
    expected = {name: v / sizes[name] for name, v in summed.items()}
    by_sum = sorted(summed, key=summed.get, reverse=True)[:2]
    best_two = sorted(expected, key=expected.get, reverse=True)[:2]
    assert sorted(by_sum) != sorted(best_two)  # the case tells the two metrics apart
    train_step(model, opt, 0)
    result = ctl.step()
    assert result.due and result.unit == 1
    assert result.saliency == pytest.approx(expected, rel=1e-12)
    assert sorted(result.grown) == sorted(best_two)


def test_after_the_start_step_the_usual_schedule_follows():
    model, opt, ctl = make(interval=3, grow_at_start=0.3)  # round(0.9) = 1 site at the start
    due = []
    for unit in range(1, 8):
        train_step(model, opt, unit)
        due.append(ctl.is_due())
        result = ctl.step()
        assert result.due == due[-1]
        if unit == 1:
            assert len(result.grown) == 1
        elif result.due:
            assert len(result.grown) <= 1  # topk=1 again
    assert due == [True, False, True, False, False, True, False]
    assert ctl.steps_done == 3


def test_a_small_fraction_still_grows_one_site():
    model, opt, ctl = make(interval=5, grow_at_start=0.01)
    train_step(model, opt, 0)
    assert len(ctl.step().grown) == 1


def test_without_grow_at_start_the_first_unit_is_not_a_step():
    model, opt, ctl = make(interval=3, grow_at_start=0.0)
    train_step(model, opt, 0)
    assert not ctl.is_due()
    assert not ctl.step().due


def test_reverse_path_starts_fully_grown_then_only_cuts():
    model, opt, ctl = make(interval=2, grow_at_start=1.0, topk=0, metric="random")
    train_step(model, opt, 0)
    result = ctl.step()
    assert sorted(result.grown) == SITES
    spread_first_block(model)  # make the Dep criterion cut the first block's weak branches
    first = sorted(dyrep_fx.blocks(model))[0]
    kinds_before = list(dyrep_fx.blocks(model)[first].kinds)
    train_step(model, opt, 1)
    before = outputs(model)
    result = ctl.step()
    assert result.due and not result.grown  # topk=0: no growth after the start, nested kxk convs neither
    assert result.cut and first in result.cut
    remaining = dyrep_fx.blocks(model).get(first)
    assert remaining is None or len(remaining.kinds) < len(kinds_before)
    assert rel_err(outputs(model), before) < 1e-12  # a cut absorbs what it removes


def test_resume_after_the_start_step_does_not_repeat_it():
    model, opt, ctl = make(interval=4, grow_at_start=0.5)
    train_step(model, opt, 0)
    ctl.step()
    state = ctl.state_dict()
    model2, opt2, ctl2 = make(interval=4, grow_at_start=0.5)
    ctl2.load_state_dict(state)
    assert sorted(dyrep_fx.blocks(model2)) == sorted(dyrep_fx.blocks(model))
    assert not ctl2.is_due()  # unit 2 of interval 4


@pytest.mark.parametrize("bad, message", [(dict(grow_at_start=1.5), "grow_at_start"),
                                          (dict(grow_at_start=-0.1), "grow_at_start"),
                                          (dict(topk=-1), "topk")])
def test_bad_settings_are_refused_by_name(bad, message):
    torch.manual_seed(0)
    model = SmallNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match=message):
        dyrep_fx.DyRep(model, opt, **bad)
    assert not dyrep_fx.Handle.is_transformed(model)  # refused before anything changed
