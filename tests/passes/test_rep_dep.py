"""``passes.rep`` (grow) and ``passes.dep`` (cut, DyRep's cut criterion ``DepCriterion`` and ``judge_blocks``)."""

from __future__ import annotations

import pytest
import torch
from helpers.nets import set_importance as set_block_importance
from helpers.numerics import randomise_bns, rel_err
from torch import nn

import dyrep_fx
from dyrep_fx.passes import PassError, analysis, dep, rep

TOL = 1e-9
X = torch.randn(2, 4, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(6)
        self.pw = nn.Conv2d(6, 6, 1, stride=2, bias=False)
        self.bn_pw = nn.BatchNorm2d(6)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.relu(self.bn_b(self.b(x)))
        return self.bn_pw(self.pw(x))




def build(mode: str = "online") -> nn.Module:
    torch.manual_seed(0)
    model = Net().double()
    randomise_bns(model)
    dyrep_fx.transform(model, mode=mode)
    return model


def out(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(X)




def traced(model: nn.Module):
    return dyrep_fx.api.state_of(model).traced


# -- rep ------------------------------------------------------------------------------------------------
def test_rep_plan():
    model = build()
    sites = analysis.analyse(traced(model), model)
    assert rep.checked_request(sites, None, None) == {
        "a": ["1x1", "1x1_kxk", "1x1_avg", "1xk", "kx1", "prior"],
        "b": ["1x1", "1x1_kxk", "1x1_avg", "1xk", "kx1", "identity", "prior"],
        "pw": ["1x1_kxk"],
    }
    assert rep.checked_request(sites, ["b"], ["identity"]) == {"b": ["identity"]}
    with pytest.raises(PassError, match=r"'identity' does not apply to site 'a'.*in_channels|'identity'.*'a'"):
        rep.checked_request(sites, ["b", "a"], ["identity"])
    with pytest.raises(PassError, match="no conv site named 'c'"):
        rep.checked_request(sites, ["c"], None)


@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_rep_run_report_and_new_modules(mode):
    model = build(mode)
    ref = out(model)
    report = rep.run(traced(model), model, names=["a", "pw"], mode=mode, init_scale=0.05)
    assert report.name == "rep"
    assert report.changed == {"a": ["1x1", "1x1_kxk", "1x1_avg", "1xk", "kx1", "prior"], "pw": ["1x1_kxk"]}
    new = report.details["new_modules"]
    assert [b.kind for b in new["a"]] == ["1x1", "1x1_kxk", "1x1_avg", "1xk", "kx1", "prior"]
    assert all(b.mode == mode for b in new["a"] + new["pw"])
    for branch in new["a"]:  # every new branch starts at importance init_scale (its gamma in dbb mode)
        assert model.a.importance()[branch.kind] == pytest.approx(0.05, rel=1e-12)
        if mode == "dbb":
            assert torch.equal(branch.gamma().detach(), torch.full((6,), 0.05, dtype=torch.float64))
    assert isinstance(model.a, dyrep_fx.RepConv2d) and model.a.branches["1x1"] is new["a"][0]
    assert type(model.b) is nn.Conv2d
    assert rel_err(out(model), ref) <= TOL
    # a site that has every kind already is skipped with a reason, the others grow
    report = rep.run(traced(model), model, names=["pw", "b"], mode=mode)
    assert "already present" in report.skipped["pw"] and "b" in report.changed


def test_rep_run_refuses_ineligible_and_changes_nothing():
    model = build()
    model.b.weight.requires_grad_(False)
    with pytest.raises(PassError, match="'b' cannot grow: frozen"):
        rep.run(traced(model), model, names=["a", "b"])
    assert not dyrep_fx.blocks(model)


# -- dep: the criterion ---------------------------------------------------------------------------------
@pytest.mark.parametrize("importance, expected", [
    ({}, []),
    ({"1x1": 0.0}, []),                                           # one branch: nothing to compare
    ({"1x1": 0.01, "prior": 0.01, "1xk": 0.01}, []),              # fresh block: all equal, std 0
    ({"1x1": 0.05, "prior": 0.06, "1xk": 0.07}, []),              # std 0.01 <= 0.02: not spread out
    ({"1x1": 0.0, "prior": 0.028}, []),                           # std 0.0198 <= 0.02
    ({"1x1": 0.0, "prior": 0.029}, ["1x1"]),                      # std 0.0205 > 0.02; 0 < mean, < 0.1
    ({"1x1": 0.01, "prior": 0.5, "1xk": 0.6}, ["1x1"]),
    ({"1x1": 0.2, "prior": 0.9}, []),                             # below the mean but not below 0.1
    ({"1x1": 0.06, "prior": 0.09, "1xk": 0.0}, ["1xk"]),          # 0.06, 0.09 < 0.1 but above the mean 0.05
    ({"a": 0.01, "b": 0.02, "c": 0.9, "d": 0.8}, ["a", "b"]),
])
def test_dep_criterion_cuts(importance, expected):
    assert dep.DepCriterion().judge(importance).cut == expected


def test_dep_criterion_parameters():
    imp = {"1x1": 0.15, "prior": 0.6, "1xk": 0.7}
    assert dep.DepCriterion().judge(imp).cut == []
    assert dep.DepCriterion(threshold=0.2).judge(imp).cut == ["1x1"]
    assert dep.DepCriterion(std_gate=0.5, threshold=0.2).judge(imp).cut == []


# -- dep: run -------------------------------------------------------------------------------------------
def set_importance(block: dyrep_fx.RepConv2d, values: dict[str, float]) -> None:
    set_block_importance(block, {k: 2.0 * v for k, v in values.items()}, main=2.0)


@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_dep_run_with_criterion(mode):
    model = build(mode)
    dyrep_fx.grow(model, ["a", "b"])
    if mode == "dbb":
        randomise_bns(model, seed=4)  # the branches' BatchNorms too
    set_importance(model.b, {k: 0.01 for k in model.b.kinds})
    set_importance(model.a, {"1x1": 0.01, "1x1_kxk": 0.5, "1x1_avg": 0.05, "1xk": 0.6, "kx1": 0.4, "prior": 0.3})
    ref = out(model)
    kept_1xk = model.a.branches["1xk"].gamma().detach().clone()
    report = dep.run(traced(model), model)
    assert report.name == "dep"
    assert report.changed == {"a": ["1x1", "1x1_avg"]}  # b's branches all have the same importance
    assert report.details["importance"]["a"]["1x1"] == pytest.approx(0.01)
    assert report.details["importance"]["b"] == {k: pytest.approx(0.01) for k in model.b.kinds}
    assert model.a.kinds == ["1x1_kxk", "1xk", "kx1", "prior"]
    assert rel_err(out(model), ref) <= TOL
    # surviving branches keep their parameters
    assert torch.equal(model.a.branches["1xk"].gamma().detach(), kept_1xk)
    # a second run finds nothing more to cut in a (spread, but nothing below 0.1), nothing in b
    assert dep.run(traced(model), model).changed == {}


class CutTheWeakest:
    """A user criterion returning its own verdict type (duck-typed: cut, std, reason)."""

    def judge(self, importance):
        weakest = min(importance, key=importance.get)
        return type("MyVerdict", (), {"cut": (weakest,), "std": 1, "reason": 7})()


def test_judge_blocks_gives_every_block_its_importances_and_the_criterion_s_verdict_as_plain_data():
    model = build()
    dyrep_fx.grow(model, ["a", "b"], ["1x1", "prior"])
    set_importance(model.a, {"1x1": 0.01, "prior": 0.5})
    set_importance(model.b, {"1x1": 0.3, "prior": 0.3})
    judged = dyrep_fx.Handle.of(model).judge(dep.DepCriterion())
    assert judged["a"]["importance"] == {"1x1": pytest.approx(0.01), "prior": pytest.approx(0.5)}
    assert judged["a"]["cut"] == ["1x1"] and judged["b"]["cut"] == []
    assert judged["b"]["reason"].startswith("std") and isinstance(judged["b"]["std"], float)
    assert list(dep.judge_blocks(model, dep.DepCriterion(), protect=["a"])) == ["b"]
    mine = dep.judge_blocks(model, CutTheWeakest())["a"]
    assert (mine["cut"], mine["std"], mine["reason"]) == (["1x1"], 1.0, "7")


def test_dep_run_named_cuts_inner_before_outer():
    model = build()
    dyrep_fx.grow(model, ["b"], ["1x1", "1x1_kxk"])
    dyrep_fx.grow(model, ["b.branches.1x1_kxk.conv2"], ["1x1", "kx1"])
    with torch.no_grad():
        for p in model.b.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref = out(model)
    report = dep.run(traced(model), model, cuts={"b": ["1x1_kxk"], "b.branches.1x1_kxk.conv2": ["kx1"]})
    assert list(report.changed) == ["b.branches.1x1_kxk.conv2", "b"]
    assert model.b.kinds == ["1x1"] and "1x1_kxk" not in model.b.branches
    assert rel_err(out(model), ref) <= TOL


def test_dep_plan_errors_and_atomicity():
    model = build()
    dyrep_fx.grow(model, ["a"], ["1x1"])
    with pytest.raises(PassError, match="'b' is not a grown site"):
        dep.run(traced(model), model, cuts={"a": ["1x1"], "b": ["1x1"]})
    with pytest.raises(PassError, match=r"no \['prior'\] branch"):
        dep.run(traced(model), model, cuts={"a": ["prior"]})
    assert model.a.kinds == ["1x1"]


def test_a_misspelt_kind_is_named_as_no_kind_with_the_closest_suggested():
    model = build()
    with pytest.raises(PassError, match=r"'idenity' is not a branch kind; did you mean 'identity'\?") as err:
        dyrep_fx.grow(model, ["a"], kinds=["idenity"])
    assert all(k in str(err.value) for k in ("1x1_kxk", "prior"))  # every kind is listed
    assert "does not apply" not in str(err.value)
    with pytest.raises(PassError, match="'conv' is not a branch kind; the kinds are"):
        dyrep_fx.grow(model, kinds=["conv"])  # nothing close: no suggestion
    with pytest.raises(PassError, match=r"not the string '1x1': write \['1x1'\]"):
        dyrep_fx.grow(model, ["a"], kinds="1x1")
    assert not dyrep_fx.blocks(model)  # refused before anything changed
