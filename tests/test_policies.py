"""A DyRep step is ``decide() -> StepPlan`` then ``apply(plan)``, with policies a user can replace.

A user-written candidate rule (a class with records, and a plain function) and a user-written cut
criterion run through the public API; the plan is frozen, plain data that round-trips; applying it is
one transaction (a failure puts the model, its EMA copy, the optimizer, the counters and the interval's
saliency back); a controller state saved before the candidate rule was pluggable still loads.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from helpers.nets import SmallNet, set_importance
from helpers.numerics import assert_same
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import dyrep_fx
from dyrep_fx import optim_sync
from dyrep_fx.defaults import PAPER_SCHEDULE
from dyrep_fx.passes.dep import Verdict
from dyrep_fx.policies import CandidateRule, DyRepCandidates, GrowthSelection, TopScores
from dyrep_fx.step_plan import StepPlan

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(i: int):
    g = torch.Generator().manual_seed(700 + i)
    return torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)


def make(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = SmallNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt, dyrep_fx.DyRep(model, opt, **{**PAPER_SCHEDULE, **kw})


def train(model, opt, units: int, start: int = 0, ctl=None, ema=None) -> list:
    results = []
    for i in range(start, start + units):
        x, y = batch(i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        if ctl is not None:
            results.append(ctl.step())
    return results


# -- user-written policies ------------------------------------------------------------------------------
class OnlyStrided(CandidateRule):
    """Offers the strided convs only, and keeps its own record of what grew (saved with the controller)."""

    def __init__(self) -> None:
        self.grown: list[str] = []

    def offers(self, site, model) -> bool:
        return any(s > 1 for s in site.stride)

    def on_grown(self, name, block, step) -> None:
        self.grown.append(name)

    def state_dict(self) -> dict:
        return {"grown": list(self.grown)}

    def load_state_dict(self, state: dict) -> None:
        self.grown = list(state.get("grown", []))


class CutTheWeakest:
    """Cuts a block's weakest branch whenever it has two or more (no spread gate, no threshold)."""

    def judge(self, importance) -> Verdict:
        if len(importance) < 2:
            return Verdict([], 0.0, "fewer than two branches")
        weakest = min(importance, key=importance.get)
        return Verdict([weakest], 0.0, f"{weakest} is the weakest")


def test_a_user_written_candidate_rule_decides_what_is_scored_grown_and_saved():
    model, opt, ctl = make(interval=2, candidates=OnlyStrided())
    assert ctl.candidates() == ["conv2"] and ctl.saliency.names == ["conv2"]
    (_, result) = train(model, opt, 2, ctl=ctl)
    assert list(result.grown) == ["conv2"] and ctl.candidate_rule.grown == ["conv2"]
    # its inner kxk conv has stride 2 too; DyRep's own gate (births) is not consulted by a user rule
    assert ctl.candidates() == ["conv2.branches.1x1_kxk.conv2"] and ctl.births == {}
    state = copy.deepcopy(ctl.state_dict())
    assert state["candidate_rule"] == {"grown": ["conv2"]}
    model2, opt2, fresh = make(seed=1, interval=2, candidates=OnlyStrided())
    fresh.load_state_dict(state)
    assert fresh.candidate_rule.grown == ["conv2"]


def test_a_plain_function_is_a_candidate_rule():
    model, opt, ctl = make(interval=1, candidates=lambda site, model: site.name == "conv3")
    assert ctl.candidates() == ["conv3"]
    (result,) = train(model, opt, 1, ctl=ctl)
    assert list(result.grown) == ["conv3"]


def test_a_user_written_cut_criterion_cuts_and_its_reason_is_recorded():
    model, opt, ctl = make(interval=1, candidates=lambda site, model: site.name == "conv1",
                           criterion=CutTheWeakest())
    (grew,) = train(model, opt, 1, ctl=ctl)
    assert list(grew.grown) == ["conv1"] and grew.cut == {}
    set_importance(model.conv1, {k: 0.5 - 0.01 * i for i, k in enumerate(model.conv1.kinds)})
    weakest = model.conv1.kinds[-1]
    plan = ctl.decide()  # no iteration since the last step: no scores, so nothing grows
    assert dict(plan.grow) == {} and dict(plan.cut) == {"conv1": (weakest,)}
    assert plan.verdicts["conv1"]["reason"] == f"{weakest} is the weakest"
    result = ctl.apply(plan)
    assert result.cut == {"conv1": [weakest]} and weakest not in model.conv1.kinds
    assert ctl.history[-1]["cut"] == {"conv1": [weakest]}
    assert ctl.history[-1]["verdicts"]["conv1"]["reason"] == f"{weakest} is the weakest"


def test_the_default_policies_are_the_documented_objects():
    _, _, ctl = make(nested="open", pointwise=True, std_gate=0.3, threshold=0.2)
    assert isinstance(ctl.candidate_rule, DyRepCandidates)
    assert (ctl.candidate_rule.nested, ctl.candidate_rule.pointwise) == ("open", True)
    assert ctl.criterion == dyrep_fx.DepCriterion(0.3, 0.2)


@pytest.mark.parametrize(("kw", "error", "message"), [
    ({"candidates": OnlyStrided(), "nested": "open"}, ValueError, "nested and pointwise"),
    ({"candidates": OnlyStrided(), "pointwise": True}, ValueError, "nested and pointwise"),
    ({"criterion": CutTheWeakest(), "threshold": 0.5}, ValueError, "std_gate and threshold"),
    ({"criterion": object()}, TypeError, "judge"),
    ({"candidates": 3}, TypeError, "CandidateRule"),
    ({"nested": "sometimes"}, ValueError, "nested must be one of"),
])
def test_settings_a_user_policy_would_ignore_are_refused(kw, error, message):
    with pytest.raises(error, match=message):
        make(**kw)


# -- decide, then apply ---------------------------------------------------------------------------------
def test_decide_then_apply_is_the_step():
    """The same run through step() and through decide() + apply() grows, cuts and records the same."""
    runs = []
    for by_hand in (False, True):
        model, opt, ctl = make(interval=2, criterion=CutTheWeakest())
        for unit in range(6):
            train(model, opt, 1, start=unit)
            if by_hand and ctl.is_due():
                plan = ctl.decide()
                assert plan.unit == ctl.units + 1 and plan.step == ctl.steps_done
                ctl.apply(plan)
                ctl.units += 1  # apply leaves the unit count to step()
            elif by_hand:
                ctl.units += 1
            else:
                ctl.step()
        runs.append((dyrep_fx.structure(model), dict(model.state_dict()), ctl.history, ctl.units))
    (structure, weights, history, units), (structure2, weights2, history2, units2) = runs
    assert structure == structure2 and history == history2 and units == units2 == 6
    assert any(e["cut"] for e in history) and all(e["grown"] for e in history)
    assert_same(weights2, weights, "decide + apply vs step")


def test_the_plan_is_frozen_plain_data():
    model, opt, ctl = make(interval=1)
    train(model, opt, 1)
    plan = ctl.decide()
    assert list(plan.grow) == [max(plan.scores, key=plan.scores.get)]
    with pytest.raises(AttributeError):
        plan.grow = {}
    with pytest.raises(TypeError):
        plan.grow["conv1"] = ("1x1",)
    data = plan.to_dict()
    assert StepPlan.from_dict(data) == plan
    assert pickle.loads(pickle.dumps(plan)) == plan and copy.deepcopy(plan) == plan
    assert plan.decision() == {"grow": [[name, list(kinds)] for name, kinds in plan.grow.items()], "cut": {}}
    result = ctl.apply(plan)
    assert result.plan is plan and result.grown == data["grow"]
    with pytest.raises(ValueError, match="decided at step 0"):
        ctl.apply(plan)  # a plan of a step already taken


@pytest.mark.parametrize("where", ["growth", "ema growth", "optimizer"])
def test_a_step_failing_midway_puts_everything_back(where, monkeypatch):
    """Model, EMA copy, optimizer (groups and momentum), counters, the rule's records and the interval's
    saliency are as before the step; the same unit is then due again and goes through."""
    model, opt, ctl = make(interval=2, candidates=lambda site, model: site.name != "conv2")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    ctl.attach_ema(ema.module)
    train(model, opt, 2, ctl=ctl, ema=ema)  # one block grown: the failing step has a block to cut
    (name, block), = dyrep_fx.blocks(model).items()
    set_importance(block, {k: (0.5 if i % 2 else 0.001) for i, k in enumerate(block.kinds)})
    train(model, opt, 1, start=2, ctl=ctl, ema=ema)
    train(model, opt, 1, start=3, ema=ema)  # the iteration of unit 4; its step() fails below
    plan = ctl.decide()
    assert plan.grow and plan.cut == {name: plan.verdicts[name]["cut"]} and plan.cut[name]
    before = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.module.state_dict(),
                            "saliency": ctl.saliency.state_dict(), "births": ctl.births,
                            "counters": [ctl.units, ctl.steps_done, len(ctl.history)]})
    groups = [list(g["params"]) for g in opt.param_groups]
    fail_in = {"growth": (dyrep_fx.Handle, "grow"), "ema growth": (dyrep_fx.Handle, "grow_block"),
               "optimizer": (optim_sync, "sync_optimizer")}[where]
    real = getattr(*fail_in)

    def call_then_fail(*args, **kwargs):
        real(*args, **kwargs)  # the change happened: the transaction must undo it
        raise RuntimeError("injected failure")

    monkeypatch.setattr(*fail_in, call_then_fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        ctl.step()
    monkeypatch.undo()
    assert set(dyrep_fx.blocks(model)) == set(dyrep_fx.blocks(ema.module)) == {name}
    assert model.get_submodule(name) is block and block.kinds == list(plan.verdicts[name]["importance"])
    after = {"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.module.state_dict(),
             "saliency": ctl.saliency.state_dict(), "births": ctl.births,
             "counters": [ctl.units, ctl.steps_done, len(ctl.history)]}
    assert_same(after, before, "after the failed step")
    assert [list(g["params"]) for g in opt.param_groups] == groups
    result = ctl.step()  # the same unit is due again and now goes through
    assert result.due and result.changed and ctl.steps_done == before["counters"][1] + 1


# -- checkpoints -------------------------------------------------------------------------------------------
def test_a_state_saved_before_candidate_rules_were_pluggable_still_loads():
    """Such a state kept the nesting gate's records under "births" and had no "candidate_rule" entry."""
    model, opt, ctl = make(interval=2)
    train(model, opt, 4, ctl=ctl)
    assert ctl.births
    state = copy.deepcopy(ctl.state_dict())
    state["births"] = state.pop("candidate_rule")["births"]
    fresh_model, _, fresh = make(seed=1, interval=2)
    fresh.load_state_dict(state)
    fresh_model.load_state_dict(model.state_dict())  # the gate reads the loaded branch values
    assert fresh.births == ctl.births and fresh.saliency.names == ctl.saliency.names
    assert fresh.candidates() == ctl.candidates()
    assert fresh.state_dict()["candidate_rule"] == {"births": ctl.births}


# -- the documented example --------------------------------------------------------------------------------
def test_the_readme_example_of_your_own_policies_runs():
    """The code block under "Your own policies" in dyrep_fx/README.md, run as written."""
    text = (Path(__file__).resolve().parents[1] / "dyrep_fx" / "README.md").read_text()
    section = text[text.index("**Your own policies**"):]
    code = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 3)]
    torch.manual_seed(0)
    model = SmallNet().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scope = {"dyrep_fx": dyrep_fx, "model": model, "optimizer": optimizer}
    exec(compile(code, "dyrep_fx/README.md", "exec"), scope)  # noqa: S102 - the README's own example
    ctl, plan = scope["ctl"], scope["plan"]
    assert ctl.candidates() == ["conv2"] and isinstance(plan, StepPlan)
    assert scope["CutTheWeakest"]().judge({"a": 0.1, "b": 0.3}).cut == ["a"]


def test_ranks_compare_the_kinds_of_a_growth_too():
    """Two ranks about to grow the same site with different kinds decided differently."""
    mine = StepPlan(unit=1, step=0, seed=0, grow={"conv1": ("1x1", "prior")})
    other = StepPlan(unit=1, step=0, seed=0, grow={"conv1": ("1x1",)})
    assert mine.decision() != other.decision()
    assert mine.decision() == StepPlan.from_dict(mine.to_dict()).decision()
    assert StepPlan(unit=1, step=0, seed=0, grow={"a": ("1x1",), "b": ("1x1",)}).decision() != \
        StepPlan(unit=1, step=0, seed=0, grow={"b": ("1x1",), "a": ("1x1",)}).decision()  # the order too


class LowestScores(GrowthSelection):
    """A user's growth selection: the lowest scores, one kind each."""

    def choose(self, scores, kinds, count, cut, blocks):
        ranked = sorted((v, n) for n, v in scores.items() if n in kinds)
        return {name: kinds[name][:1] for _, name in ranked[:count]}


def test_a_user_growth_selection_decides_what_grows():
    model, opt, ctl = make(interval=1, topk=2, growth=LowestScores())
    train(model, opt, 1)
    plan = ctl.decide()
    assert list(plan.grow) == sorted(plan.scores, key=plan.scores.get)[:2]
    assert all(len(kinds) == 1 for kinds in plan.grow.values())
    assert ctl.apply(plan).grown == {name: list(kinds) for name, kinds in plan.grow.items()}


def test_top_scores_takes_the_best_growable_sites_ties_by_name():
    kinds = {"a": ["1x1"], "b": ["1x1", "prior"], "c": ["1x1"]}
    scores = {"b": 2.0, "a": 2.0, "c": 1.0, "not_growable": 9.0}
    assert TopScores().choose(scores, kinds, 2, {}, {}) == {"a": ["1x1"], "b": ["1x1", "prior"]}
    assert list(TopScores().choose(scores, kinds, 5, {}, {})) == ["a", "b", "c"]


def test_a_growth_selection_is_refused_beside_a_budget_or_when_it_is_none():
    with pytest.raises(ValueError, match="budget configures the default growth selection"):
        make(growth=TopScores(), budget=1.5, example_inputs=(batch(0)[0],))
    with pytest.raises(TypeError, match="growth must be a dyrep_fx.policies.GrowthSelection, got function"):
        make(growth=lambda *a: {})

