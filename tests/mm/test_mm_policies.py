"""DyRepHook's ``dyrep`` block in a real mmengine Runner (the toy classifier of tests/helpers/mm_toy.py):
a user's candidate rule, cut criterion and scorer built from config (``dict(type=...)`` through
``dyrep_fx.mm.POLICIES`` or a dotted import path) decide the run; a policy or option that does not build
stops the Runner before training, named; a DyRep option the hook never listed reaches the controller."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from helpers.mm_data import find_hook
from helpers.mm_policies import register_policies
from helpers.mm_toy import toy_cfg, train_toy
from mmengine.runner import Runner

from dyrep_fx import api
from dyrep_fx.mm import DyRepHook
from dyrep_fx.passes.dep import DepCriterion
from dyrep_fx.policies import DyRepCandidates

#: The toy backbone's convs: 3->8, 8->8, 8->8 (stride 2).
SITES = ("backbone.0", "backbone.3", "backbone.6")


def user_policies(name: str = "backbone.3") -> dict:
    """The three user policies, the rule by dotted path (no registration), the others by registered name."""
    return dict(candidates=dict(type="helpers.mm_policies.OnlySite", name=name),
                criterion=dict(type="CutKind", kind="1x1"), metric=dict(type="OutChannels", offset=0.5))


@pytest.mark.slow
def test_user_policies_from_config_decide_a_runner_s_steps(tmp_path: Path):
    register_policies()
    cfg = toy_cfg(tmp_path, 4, 2, hook_options=user_policies())
    runner = train_toy(cfg)
    ctl = find_hook(runner, "DyRepHook").controller
    first, second = ctl.history
    # the rule: the only candidate, although snip would score the others too
    assert list(first["grown"]) == ["backbone.3"]
    assert first["candidates"] == 1
    # the scorer: offset + output channels, the interval's mean of a constant
    assert first["scores"] == [["backbone.3", 8.5]]
    # the criterion: the freshly grown block loses its 1x1 branch at once (Dep's spread gate would keep it)
    assert second["cut"] == {"backbone.3": ["1x1"]}
    assert second["verdicts"]["backbone.3"]["reason"] == "CutKind('1x1')"
    block = api.blocks(runner.model)["backbone.3"]
    assert "1x1" not in block.kinds and block.kinds
    assert set(api.blocks(runner.model)) == {"backbone.3"}


@pytest.mark.slow
def test_an_option_the_hook_never_listed_reaches_the_controller(tmp_path: Path):
    """``grow_at_start`` (added to DyRep after the hook's own argument list): every candidate grows at the
    first iteration, then nothing more (topk=0)."""
    cfg = toy_cfg(tmp_path, 2, 100, hook_options=dict(grow_at_start=1.0, topk=0))
    runner = train_toy(cfg)
    ctl = find_hook(runner, "DyRepHook").controller
    assert ctl.schedule.grow_at_start == 1.0 and ctl.schedule.topk == 0
    assert [e["unit"] for e in ctl.history] == [1]  # the first iteration
    assert set(api.blocks(runner.model)) == set(SITES)


def runner_error(tmp_path: Path, **dyrep) -> str:
    """What building the Runner with these DyRep options raises (nothing may train)."""
    register_policies()
    cfg = toy_cfg(tmp_path, 2, 1, hook_options=dyrep)
    with pytest.raises((ValueError, TypeError)) as caught:
        Runner.from_cfg(cfg)
    assert not (tmp_path / "iter_2.pth").exists()
    return str(caught.value)


@pytest.mark.parametrize(("dyrep", "named"), [
    (dict(candidates=dict(type="NoSuchRule")), ["dyrep.candidates", "NoSuchRule", "register_module"]),
    (dict(candidates=dict(type="OnlySite", nme="backbone.3")), ["dyrep.candidates", "OnlySite", "nme"]),
    (dict(criterion=dict(type="OnlySite", name="backbone.3")), ["dyrep.criterion", "judge"]),
    (dict(criterion=dict(kind="1x1")), ["dyrep.criterion", "no 'type'"]),
    (dict(metric="snipp"), ["dyrep.metric", "'snipp'"]),
    (dict(metric=dict(type="helpers.mm_policies.NoScorer")), ["dyrep.metric", "NoScorer"]),
])
def test_a_policy_that_does_not_build_stops_the_runner_before_training(tmp_path: Path, dyrep: dict, named: list):
    message = runner_error(tmp_path, **dyrep)
    assert all(part in message for part in named), message


def test_options_dyrep_does_not_take_or_the_hook_supplies_are_refused_by_name():
    with pytest.raises(ValueError, match=r"does not take: \['intreval'\]"):
        DyRepHook(dyrep=dict(intreval=3))
    with pytest.raises(ValueError, match=r"supplies from the Runner.*targets=\[\.\.\.\]"):
        DyRepHook(dyrep=dict(targets=["backbone"]))
    with pytest.raises(TypeError, match=r"unexpected arguments \['intreval'\]"):
        DyRepHook(intreval=3)


def test_policies_by_name_string_and_object_build_to_the_same_policies():
    register_policies()
    by_name = DyRepHook(dyrep=dict(candidates="DyRepCandidates", criterion=dict(type="DepCriterion", std_gate=0.1),
                                   metric="snip_per_weight")).dyrep_options
    assert isinstance(by_name["candidates"], DyRepCandidates)
    assert by_name["criterion"] == DepCriterion(std_gate=0.1)
    assert by_name["metric"] == "snip_per_weight"
    rule = DyRepCandidates(pointwise=True)
    assert DyRepHook(dyrep=dict(candidates=rule)).dyrep_options["candidates"] is rule
    assert DyRepHook().dyrep_options["interval"] == 1000  # the hook's default, not DyRep's 5
    # the paper's schedule for pretrained backbones, not DyRep's growth at the first call
    assert DyRepHook().dyrep_options["grow_at_start"] == 0.0 and DyRepHook().dyrep_options["metric"] == "snip"


def test_options_as_hook_arguments_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"\['interval', 'mode'\]\) are deprecated"):
        old = DyRepHook(interval=7, mode="dbb")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = DyRepHook(dyrep=dict(interval=7, mode="dbb"))
    assert old.dyrep_options == new.dyrep_options
    with pytest.raises(ValueError, match=r"\['interval'\] given both"):
        DyRepHook(interval=7, dyrep=dict(interval=8))


def test_the_growth_selection_is_a_policy_from_config_too():
    from dyrep_fx.policies import TopScores

    assert isinstance(DyRepHook(dyrep=dict(growth=dict(type="TopScores"))).dyrep_options["growth"], TopScores)
    with pytest.raises(ValueError, match=r"dyrep.growth=\{'type': 'DepCriterion'\} does not build.*GrowthSelection"):
        DyRepHook(dyrep=dict(growth=dict(type="DepCriterion")))
