"""A DyRep step analyses each target's sites once, whatever ``topk``: after the change, for the candidates of
the next interval; the targets keep that analysis (:mod:`dyrep_fx.target_set`) and the next step decides on
it and hands it to apply, which checks the plan's growth against it instead of analysing per grown site."""

from __future__ import annotations

import pytest
import torch
from helpers.nets import SmallNet, small_batch
from torch import nn

import dyrep_fx
from dyrep_fx.passes import PassError
from dyrep_fx.step_plan import StepPlan


def batch(i: int):
    return small_batch(1000 + i)


def make(**kw):
    torch.manual_seed(0)
    model = SmallNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt, dyrep_fx.DyRep(model, opt, interval=1, **kw)


def train_once(model, opt) -> None:
    x, y = batch(0)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("topk", [1, 3])
def test_a_step_analyses_once_for_the_next_candidates_and_decides_on_the_kept_analysis(analyses, topk):
    model, opt, ctl = make(topk=topk, grow_at_start=0.0)
    train_once(model, opt)
    analyses.clear()
    result = ctl.step()
    assert len(result.grown) == topk
    assert len(analyses) == 1
    train_once(model, opt)
    second = ctl.step()  # (with topk=3 every site grew at the first step: this one only judges)
    assert len(analyses) == 1 + second.changed  # a step that changed nothing keeps the analysis


def test_a_plan_made_by_hand_is_checked_against_the_kept_analysis_before_anything_changes(analyses):
    model, opt, ctl = make(grow_at_start=0.0)
    train_once(model, opt)
    decided = ctl.decide()
    analyses.clear()
    hand = StepPlan.from_dict({**decided.to_dict(), "grow": {"conv1": ["1x1"], "fc": ["1x1"]}})
    with pytest.raises(PassError, match="no conv site named 'fc'"):
        ctl.apply(hand)
    assert len(analyses) == 0 and not dyrep_fx.blocks(model)
