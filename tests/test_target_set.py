"""The controller's targets as one (``dyrep_fx.target_set``): one site analysis per step, kept while the
model is unchanged and made again when anything the analysis reads changed."""

from __future__ import annotations

import pytest
import torch
from helpers.nets import SmallNet, small_batch
from torch import nn

import dyrep_fx
from dyrep_fx.handle import Handle
from dyrep_fx.target_set import TargetSet, structure_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")


def make(**kw):
    torch.manual_seed(0)
    model = SmallNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt, dyrep_fx.DyRep(model, opt, grow_at_start=0.0, **kw)


def train(model, opt, iters: int, start: int = 0) -> None:
    for i in range(start, start + iters):
        x, y = small_batch(2000 + i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_a_step_runs_one_site_analysis_and_the_next_decision_reuses_it(analyses):
    model, opt, ctl = make(interval=1)
    assert len(analyses) == 1  # the constructor's (sites, watch list)
    for step in range(1, 4):
        train(model, opt, 2, start=2 * step)
        result = ctl.step()
        assert result.grown  # each step changed the structure ...
        assert len(analyses) == 1 + step  # ... and analysed it once (after the change)


def test_a_kept_analysis_is_the_models_own():
    """The kept analysis equals a fresh one at every point of a run (names, kinds, grown, eligibility)."""
    model, opt, ctl = make(interval=1)
    for step in range(3):
        train(model, opt, 2, start=2 * step)
        ctl.step()
        kept = ctl.targets.analyse()
        fresh = {prefix: handle.sites() for prefix, handle in ctl.targets.items()}
        assert kept == fresh


def test_growth_by_hand_between_steps_is_seen_by_the_next_decision():
    model, opt, ctl = make(interval=1)
    train(model, opt, 2)
    ctl.candidates()  # the analysis is kept now
    dyrep_fx.grow(model, ["conv1"], ["1x1"])
    plan = ctl.decide()
    assert "conv1" not in plan.grow and "conv1" not in ctl.candidates()
    assert next(s for s in ctl.sites() if s.name == "conv1").grown == ["1x1"]


def test_freezing_a_conv_between_steps_is_seen_by_the_next_decision():
    """The analysis reads ``requires_grad`` (a frozen conv is not eligible): freezing changes the fingerprint."""
    model, opt, ctl = make(interval=1)
    assert "conv2" in ctl.candidates()
    model.conv2.weight.requires_grad_(False)
    assert "conv2" not in ctl.candidates()
    site = next(s for s in ctl.sites() if s.name == "conv2")
    assert not site.eligible and "frozen" in site.reason


def test_the_fingerprint_changes_with_what_the_analysis_reads():
    model = SmallNet()
    before = structure_fingerprint(model)
    assert structure_fingerprint(model) == before  # a value, not an identity: same model, same print
    model.conv1.weight.requires_grad_(False)
    assert structure_fingerprint(model) != before
    model.conv1.weight.requires_grad_(True)
    assert structure_fingerprint(model) == before
    model.conv1.weight = nn.Parameter(model.conv1.weight.detach().clone())  # a swapped Parameter
    assert structure_fingerprint(model) != before
    swapped = structure_fingerprint(model)
    model.conv3 = nn.Conv2d(model.conv3.in_channels, model.conv3.out_channels, 3, padding=1)
    assert structure_fingerprint(model) != swapped


def test_targets_in_different_modes_are_refused():
    a, b = SmallNet(), SmallNet()
    handles = {"a": Handle.transform(a, None, "online"), "b": Handle.transform(b, None, "dbb")}
    with pytest.raises(ValueError, match="different modes"):
        TargetSet(handles)
