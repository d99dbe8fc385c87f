"""``DyRep.load_structure``: a grown checkpoint as the start of a new run (fine-tuning), not a resume.

The structure is rebuilt so the grown weights load; the schedule starts over (counters at 0, no history,
no birth records, no saliency carried over) and the new Parameters join the new optimizer. A state that
does not fit changes nothing. ``load_state_dict`` (resume) still carries everything over.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.nets import SmallNet, small_batch
from helpers.numerics import assert_same
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import dyrep_fx
from dyrep_fx import optim_sync, structure_spec
from dyrep_fx.defaults import PAPER_SCHEDULE

pytestmark = pytest.mark.usefixtures("one_thread")

INTERVAL, UNITS = 2, 4  # steps after units 2 and 4: two blocks (or a block and its inner conv)


def batch(i: int):
    return small_batch(500 + i)


def make(seed: int):
    torch.manual_seed(seed)
    model = SmallNet().double()
    groups = [{"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": 1e-3},
              {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    return model, opt, dyrep_fx.DyRep(model, opt, interval=INTERVAL, seed=3, **PAPER_SCHEDULE)


def train_units(model, opt, ctl, units: int, start: int = 0) -> None:
    for unit in range(start, start + units):
        x, y = batch(unit)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ctl.step()


@pytest.fixture(scope="module")
def grown():
    model, opt, ctl = make(seed=0)
    train_units(model, opt, ctl, UNITS)
    assert len(ctl.history) == UNITS // INTERVAL and dyrep_fx.blocks(model)
    return copy.deepcopy(ctl.state_dict()), copy.deepcopy(model.state_dict())


def test_load_structure_rebuilds_the_blocks_and_restarts_the_schedule(grown):
    state, weights = grown
    model, opt, ctl = make(seed=1)
    ctl.load_structure(state)
    model.load_state_dict(weights, strict=True)  # the grown weights fit
    assert dyrep_fx.structure(model)["sites"] == state["structures"][""]["sites"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert (ctl.units, ctl.steps_done, ctl.history, ctl.births) == (0, 0, [], {})
    assert ctl.saliency.count == 0 and ctl.saliency.total is None
    assert ctl.saliency.names == ctl.candidates()  # watched: this run's candidates, not the saved ones
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in model.parameters()} == in_opt
    assert len(opt.param_groups) == 2  # the new optimizer's own groups: kernels with decay, 1-D without
    for name, p in model.named_parameters():
        group = next(i for i, g in enumerate(opt.param_groups) if any(q is p for q in g["params"]))
        assert group == (0 if p.dim() > 1 else 1), name
    # the first step is due after `interval` units again, and trains
    train_units(model, opt, ctl, INTERVAL, start=UNITS)
    assert ctl.units == INTERVAL and [e["unit"] for e in ctl.history] == [INTERVAL]


def test_load_state_dict_still_resumes_the_schedule(grown):
    state, _ = grown
    _, _, ctl = make(seed=1)
    ctl.load_state_dict(state)
    assert ctl.units == UNITS and len(ctl.history) == UNITS // INTERVAL


def test_load_structure_grows_the_ema_copy_too(grown):
    state, weights = grown
    model, opt, ctl = make(seed=1)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))
    ctl.attach_ema(ema.module)
    ctl.load_structure(state)
    assert set(dyrep_fx.blocks(ema.module)) == set(dyrep_fx.blocks(model))
    ema.module.load_state_dict(weights, strict=True)


def test_load_structure_that_does_not_fit_changes_nothing(grown):
    state, _ = grown
    model, opt, ctl = make(seed=1)
    params = {n: id(p) for n, p in model.named_parameters()}
    groups = [[id(p) for p in g["params"]] for g in opt.param_groups]
    bad = copy.deepcopy(state)
    spec = bad["structures"][""]
    spec["sites"]["conv9"] = spec["sites"].pop(next(iter(spec["sites"])))
    with pytest.raises(ValueError, match="conv9"):
        ctl.load_structure(bad)
    assert not dyrep_fx.blocks(model)
    assert {n: id(p) for n, p in model.named_parameters()} == params
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == groups


def snapshot(model: nn.Module, opt: torch.optim.Optimizer, ema: nn.Module) -> dict:
    """Values (not identities) of everything a failed ``load_structure`` must put back."""
    return copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict(), "ema": ema.state_dict()})


def count_grow_calls(state: dict, monkeypatch) -> int:
    """How often restoring ``state`` on one fresh model calls ``structure_spec.restore_block`` (nested
    entries count: the function recurses through the patched module attribute)."""
    real, calls = structure_spec.restore_block, []

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    model, _, ctl = make(seed=2)
    with monkeypatch.context() as m:
        m.setattr(structure_spec, "restore_block", counting)
        ctl.load_structure(state)
    return len(calls)


@pytest.mark.parametrize("where", ["live model", "ema copy", "optimizer"])
def test_load_structure_failing_midway_puts_values_back(grown, where, monkeypatch):
    """A failure after some blocks were rebuilt (the live model's last site, the EMA copy's last site, or
    the optimizer sync after every model changed): every parameter, buffer, optimizer state and group,
    and the EMA copy hold their old values, and training goes on."""
    state, _ = grown
    per_model = count_grow_calls(state, monkeypatch)
    assert per_model >= 2  # the failing call comes after at least one block was rebuilt
    model, opt, ctl = make(seed=1)
    train_units(model, opt, ctl, 1)  # momentum in the optimizer state; no step due yet
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))
    ema.update_parameters(model)
    ctl.attach_ema(ema.module)
    before = snapshot(model, opt, ema.module)

    if where == "optimizer":
        real_sync = optim_sync.sync_optimizer

        def sync_then_fail(*args, **kwargs):
            real_sync(*args, **kwargs)  # the groups changed: the undo must restore them
            raise RuntimeError("injected failure")

        monkeypatch.setattr(optim_sync, "sync_optimizer", sync_then_fail)
    else:
        real_grow, calls = structure_spec.restore_block, []
        fail_at = per_model if where == "live model" else 2 * per_model

        def grow_then_fail(*args, **kwargs):
            calls.append(args[1])
            if len(calls) == fail_at:
                raise RuntimeError("injected failure")
            return real_grow(*args, **kwargs)

        monkeypatch.setattr(structure_spec, "restore_block", grow_then_fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        ctl.load_structure(state)
    monkeypatch.undo()

    assert not dyrep_fx.blocks(model) and not dyrep_fx.blocks(ema.module)
    assert_same(snapshot(model, opt, ema.module), before, "after the failed load")
    assert ctl.units == 1
    train_units(model, opt, ctl, 3, start=1)  # the controller still trains and grows
    assert ctl.history and dyrep_fx.blocks(model)
