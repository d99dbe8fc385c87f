"""The DyRep controller: when it grows, what it grows, what it cuts, and that the function is kept.

Also the EMA support (``DyRep.attach_ema``) with ``torch.optim.swa_utils.AveragedModel``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.nets import SmallNet, set_importance, small_batch
from helpers.numerics import rel_err
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import dyrep_fx
from dyrep_fx.controller import DYREP_KINDS
from dyrep_fx.defaults import PAPER_SCHEDULE

# float64 / tiny convs on CPU: one intra-op thread is much faster than two here.
pytestmark = pytest.mark.usefixtures("one_thread")



def Net() -> SmallNet:  # noqa: N802 - keeps the tests' call sites short
    return SmallNet()


SITES = ["conv1", "conv2", "conv3"]


def batch(i: int):
    return small_batch(1000 + i)


def make(mode: str = "online", seed: int = 0, build_ctl: bool = True, **kw):
    torch.manual_seed(seed)
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctl = dyrep_fx.DyRep(model, opt, mode=mode, **{**PAPER_SCHEDULE, **kw}) if build_ctl else None
    return model, opt, ctl


def train(model, opt, iters: int, start: int = 0, ema=None) -> float:
    loss = torch.zeros(())
    for i in range(start, start + iters):
        x, y = batch(i)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
    return float(loss.detach())


X_EVAL = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


@torch.no_grad()
def run_eval(model, x=X_EVAL):
    was = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was)




# -- when and what grows --------------------------------------------------------------------------


def test_interval_and_top1():
    model, opt, ctl = make(interval=3, nested="open")
    for unit in range(1, 7):
        train(model, opt, 2, start=2 * unit)
        assert ctl.is_due() == (unit % 3 == 0)
        candidates = ctl.candidates()
        result = ctl.step()
        assert result.unit == unit and result.due == (unit % 3 == 0)
        if not result.due:
            assert not result.changed and result.saliency == {}
            continue
        eligible = {n: v for n, v in result.saliency.items() if n in candidates}
        assert set(eligible) == set(candidates)
        top = max(eligible, key=eligible.get)
        assert list(result.grown) == [top]
        site = next(s for s in dyrep_fx.sites(model) if s.name == top)
        assert result.grown[top] == [k for k in DYREP_KINDS if k in site.grown]
        assert isinstance(model.get_submodule(top), dyrep_fx.RepConv2d)
    assert [e["unit"] for e in ctl.history] == [3, 6]
    assert len(dyrep_fx.blocks(model)) == 2


def test_saliency_ranking_decides_not_the_order():
    # The choice follows the interval's saliency, not the module order: raise the least salient site's
    # running sum so that it becomes the most salient one.
    model, opt, ctl = make(interval=1)
    train(model, opt, 2)
    mean = ctl.saliency.mean()
    low = min(mean, key=mean.get)
    idx = ctl.saliency.names.index(low)
    ctl.saliency.total[idx] += 1e6
    result = ctl.step()
    assert list(result.grown) == [low]


def test_until_stops_growth_and_cuts():
    model, opt, ctl = make(interval=1, until=2)
    grown = []
    for unit in range(1, 5):
        train(model, opt, 2, start=2 * unit)
        if unit == 3:  # would be cut if the controller still acted
            block = dyrep_fx.blocks(model)[grown[0]]
            set_importance(block, {k: (0.5 if k == "1x1" else 0.001) for k in block.kinds})
        result = ctl.step()
        assert result.due == (unit <= 2)
        if unit <= 2:
            assert len(result.grown) == 1
            grown += list(result.grown)
        else:
            assert not result.changed
    assert len(dyrep_fx.blocks(model)) == 2
    assert ctl.units == 4 and ctl.steps_done == 2


def test_topk_two():
    model, opt, ctl = make(interval=2, topk=2)
    train(model, opt, 2)
    assert ctl.step().due is False
    train(model, opt, 2, start=2)
    result = ctl.step()
    ranked = sorted(result.saliency, key=result.saliency.get, reverse=True)
    assert sorted(result.grown) == sorted(ranked[:2])
    assert len(dyrep_fx.blocks(model)) == 2


def test_nested_growth_stops_at_depth_two():
    model, opt, ctl = make(interval=1, topk=3, nested="open")
    before = run_eval(model)
    train(model, opt, 1)
    mid = run_eval(model)
    r1 = ctl.step()
    assert sorted(r1.grown) == SITES
    assert rel_err(run_eval(model), mid) < 1e-12
    inner = [f"{s}.branches.1x1_kxk.conv2" for s in SITES]
    assert sorted(ctl.candidates()) == sorted(inner)
    train(model, opt, 1, start=1)
    mid = run_eval(model)
    r2 = ctl.step()
    assert sorted(r2.grown) == sorted(inner)
    assert rel_err(run_eval(model), mid) < 1e-12
    for name in inner:
        assert isinstance(model.get_submodule(name), dyrep_fx.RepConv2d)
        assert model.get_submodule(name).grown
    deep = [s for s in dyrep_fx.sites(model) if s.depth == 2]
    assert sorted(s.name for s in deep) == sorted(f"{n}.branches.1x1_kxk.conv2" for n in inner)
    assert not any(s.eligible for s in deep)
    assert ctl.candidates() == []
    train(model, opt, 1, start=2)
    r3 = ctl.step()
    assert r3.due and not r3.grown
    assert not any(isinstance(model.get_submodule(s.name), dyrep_fx.RepConv2d) for s in deep)
    # nested blocks are described inside their outer block
    spec = dyrep_fx.structure(model)["sites"]
    assert sorted(spec) == SITES
    assert all("branches.1x1_kxk.conv2" in spec[s]["nested"] for s in SITES)
    assert not torch.equal(before, run_eval(model))  # it did train


# -- the Dep criterion ----------------------------------------------------------------------------


def grown_at_conv3(mode: str, **kw):
    """conv3 grown with DyRep's kinds before the optimizer is built; the controller cuts only."""
    torch.manual_seed(0)
    model = Net().double()
    dyrep_fx.transform(model, mode=mode)
    dyrep_fx.grow(model, ["conv3"], list(DYREP_KINDS))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, opt, 2)  # BN statistics and momentum that are not trivial
    ctl = dyrep_fx.DyRep(model, opt, interval=1, **{**PAPER_SCHEDULE, **kw})
    assert ctl.saliency.mean() == {}  # no iteration since: step() grows nothing, only cuts
    return model, opt, ctl, model.conv3


CUT_CASES = [
    # values per kind, main scale, expected cut (importance = value / main; online: a share of the
    # block's kernel, so the values are ones a kernel can have)
    pytest.param({"1x1": .25, "1x1_kxk": .02, "1x1_avg": .2, "1xk": .15, "kx1": .04, "identity": .11}, 1.0,
                 {"1x1_kxk", "kx1"}, id="low-and-below-mean"),
    pytest.param({"1x1": .05, "1x1_kxk": .06, "1x1_avg": .04, "1xk": .05, "kx1": .055, "identity": .045}, 1.0,
                 set(), id="std-gate"),
    pytest.param({"1x1": .3, "1x1_kxk": .25, "1x1_avg": .15, "1xk": .25, "kx1": .21, "identity": .18}, 1.0,
                 set(), id="above-threshold"),
    pytest.param({"1x1": .3, "1x1_kxk": .25, "1x1_avg": .15, "1xk": .25, "kx1": .21, "identity": .18}, 2.0,
                 {"1x1_avg", "identity"}, id="relative-to-main"),
    pytest.param({"1x1": .09, "1x1_kxk": .01, "1x1_avg": .09, "1xk": .09, "kx1": .09, "identity": .01}, 1.0,
                 {"1x1_kxk", "identity"}, id="below-threshold-above-mean-kept"),
]


@pytest.mark.parametrize("mode", ["online", "dbb"])
@pytest.mark.parametrize(("values", "main", "expected"), CUT_CASES)
def test_dep_criterion(mode, values, main, expected):
    model, opt, ctl, block = grown_at_conv3(mode)
    set_importance(block, values, main)
    importance = block.importance()
    assert importance == pytest.approx({k: v / main for k, v in values.items()}, rel=1e-12)
    cut_params = {id(p) for k in expected for p in block.branches[k].parameters()}
    before = run_eval(model)
    result = ctl.step()
    assert not result.grown
    if expected:
        assert set(result.cut) == {"conv3"} and set(result.cut["conv3"]) == expected
    else:
        assert result.cut == {}
    assert block.kinds == [k for k in DYREP_KINDS if k not in expected]
    assert model.conv3 is block
    # the cut branches are absorbed exactly (eval mode) and leave the optimizer
    assert rel_err(run_eval(model), before) < 1e-12
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not cut_params & in_opt
    assert not cut_params & {id(p) for p in opt.state}
    assert in_opt == {id(p) for p in model.parameters()}
    assert ctl.history[-1]["cut"] == result.cut


def test_cut_of_every_branch_gives_a_plain_block_that_can_grow_again():
    model, opt, ctl, block = grown_at_conv3("online")
    set_importance(block, {k: (0.9 if k == "1x1" else 0.001) for k in block.kinds})
    before = run_eval(model)
    result = ctl.step()
    assert set(result.cut["conv3"]) == set(DYREP_KINDS) - {"1x1"}
    assert block.kinds == ["1x1"]
    assert rel_err(run_eval(model), before) < 1e-12


def test_fresh_blocks_are_not_cut_in_the_step_that_grows_them():
    model, opt, ctl = make(interval=1, topk=3)
    train(model, opt, 1)
    result = ctl.step()
    assert sorted(result.grown) == SITES and result.cut == {}
    train(model, opt, 1, start=1)
    result = ctl.step()
    # one iteration of training spreads the scales by far less than the std gate
    assert result.cut == {}


def favour(ctl, name: str) -> None:
    """Make ``name`` the most salient site of the interval (raise its running sum)."""
    ctl.saliency.total[ctl.saliency.names.index(name)] += 1e6


INNER = "conv1.branches.1x1_kxk.conv2"


def partly_cut_conv1(mode: str = "online", ema: bool = False, keep: float = 0.5, **kw):
    """conv1 grown at step 1, three of its branches cut at step 2 (two kept at scale ``keep``).

    Returns what step 3 needs: conv1 does not regrow the cut kinds (as in DyRep, a grown block grows
    further through its inner kxk conv), and that inner conv is the most salient site.
    """
    model, opt, ctl = make(mode, interval=1, **kw)
    averaged = None
    if ema:
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))
        ctl.attach_ema(averaged.module)
    train(model, opt, 1, ema=averaged)
    favour(ctl, "conv1")
    assert list(ctl.step().grown) == ["conv1"]
    train(model, opt, 1, start=1, ema=averaged)
    set_importance(model.conv1, {"1x1": .001, "1x1_kxk": keep, "1x1_avg": .001, "1xk": keep, "kx1": .001})
    favour(ctl, "conv2")
    result = ctl.step()
    assert result.cut == {"conv1": ["1x1", "1x1_avg", "kx1"]}
    assert model.conv1.kinds == ["1x1_kxk", "1xk"]
    assert "conv1" not in ctl.candidates() and INNER in ctl.candidates()
    train(model, opt, 1, start=2, ema=averaged)
    favour(ctl, INNER)
    return model, opt, ctl, averaged


def test_a_partly_cut_block_does_not_regrow_its_cut_branches():
    """Regrowing cut kinds would let the top site regrow and lose the same branches at every step."""
    model, opt, ctl, _ = partly_cut_conv1()
    for unit in range(3):
        assert "conv1" not in ctl.candidates()
        offered = ctl.candidates()  # (the nesting gate may close them all for an interval)
        if offered:
            favour(ctl, offered[0])
        result = ctl.step()
        assert "conv1" not in result.grown
        assert model.conv1.kinds == ["1x1_kxk", "1xk"]
        train(model, opt, 1, start=3 + unit)


def test_blocks_grown_in_a_step_are_protected_from_that_steps_cut():
    model, opt, ctl, _ = partly_cut_conv1()
    result = ctl.step()
    assert list(result.grown) == [INNER] and INNER not in result.cut
    inner = model.get_submodule(INNER)
    set_importance(inner, {k: (0.5 if i % 2 else 0.001) for i, k in enumerate(inner.kinds)})
    assert INNER in dyrep_fx.passes.dep.checked_request(model)
    assert INNER not in dyrep_fx.passes.dep.checked_request(model, protect=[INNER])


def test_ema_in_step_when_a_site_grows_and_another_is_cut():
    model, opt, ctl, ema = partly_cut_conv1(ema=True)
    set_importance(model.conv1, {"1x1_kxk": 0.5, "1xk": 0.001})
    ema_before = run_eval(ema.module)
    result = ctl.step()  # must not fail syncing the EMA
    assert list(result.grown) == [INNER] and result.cut == {"conv1": ["1xk"]}
    assert dyrep_fx.structure(ema.module) == dyrep_fx.structure(model)
    assert names_and_shapes(ema.module) == names_and_shapes(model)
    assert rel_err(run_eval(ema.module), ema_before) < 1e-12
    ema.update_parameters(model)


def test_ema_keeps_its_own_averages_of_surviving_branches_when_a_site_grows():
    """Only *new* branches start from the live values in the EMA; survivors keep their averages."""
    model, opt, ctl, ema = partly_cut_conv1(ema=True, keep=0.04)
    # the inner kxk's own kernel is re-balanced when it grows; every other survivor must stay as it is
    survivors = {n: p.detach().clone() for n, p in ema.module.conv1.branches.named_parameters()
                 if n != "1x1_kxk.conv2.weight"}
    live = dict(model.conv1.branches.named_parameters())
    assert sorted({n.split(".")[0] for n in survivors}) == ["1x1_kxk", "1xk"]
    assert any(not torch.equal(v, live[n]) for n, v in survivors.items())  # the EMA lags the live model
    ema_before = run_eval(ema.module)
    result = ctl.step()
    assert list(result.grown) == [INNER]
    assert dyrep_fx.structure(ema.module) == dyrep_fx.structure(model)
    now = dict(ema.module.conv1.branches.named_parameters())
    for n, v in survivors.items():
        assert torch.equal(now[n], v), f"the EMA's surviving {n} was overwritten"
    inner_live = model.get_submodule(INNER).branches
    inner_ema = ema.module.get_submodule(INNER).branches
    for kind in result.grown[INNER]:
        for (_, a), (_, b) in zip(inner_live[kind].named_parameters(), inner_ema[kind].named_parameters()):
            assert torch.equal(a, b), "new EMA branches start from the live values"
    assert rel_err(run_eval(ema.module), ema_before) < 1e-12


def test_dbb_growth_calibrates_only_the_new_branches():
    """Calibration fits the new branches' BatchNorms; the surviving branches keep their statistics."""
    model, opt, ctl, _ = partly_cut_conv1("dbb", calib_loader=Batches(10), calib_batches=2)
    survivors = {k: v.clone() for k, v in model.conv1.branches.state_dict().items()
                 if not k.startswith("1x1_kxk.conv2.")}
    before = run_eval(model)
    result = ctl.step()
    assert list(result.grown) == [INNER] and result.calibrated_batches == 2
    assert rel_err(run_eval(model), before) < 1e-9
    now = model.conv1.branches.state_dict()
    for key, value in survivors.items():
        assert torch.equal(now[key], value), f"surviving {key} changed"
    fresh = [m for m in model.get_submodule(INNER).branches.modules() if isinstance(m, nn.BatchNorm2d)]
    assert fresh and all(int(bn.num_batches_tracked) == 2 for bn in fresh)


# -- the function across a step -------------------------------------------------------------------


def test_online_step_keeps_function_in_eval_and_train_mode():
    model, opt, ctl = make(interval=1)
    x, _ = batch(99)
    for unit in range(6):
        train(model, opt, 2, start=2 * unit)
        if unit == 4:  # force a cut too
            block = next(iter(dyrep_fx.blocks(model).values()))
            set_importance(block, {k: (0.5 if i % 2 else 0.001) for i, k in enumerate(block.kinds)})
        with torch.no_grad():
            t_before = model(x)  # train mode: batch statistics (and it updates the running ones)
        e_before = run_eval(model)
        result = ctl.step()
        assert result.changed
        assert rel_err(run_eval(model), e_before) < 1e-12
        with torch.no_grad():
            assert rel_err(model(x), t_before) < 1e-12
        assert model.training
    assert any(e["cut"] for e in ctl.history)
    assert any("branches" in name for e in ctl.history for name in e["grown"])


class Batches:
    """A loader that counts how many batches were taken from it."""

    def __init__(self, n: int, dict_batches: bool = False) -> None:
        self.n, self.dict_batches, self.taken = n, dict_batches, 0

    def __iter__(self):
        for i in range(self.n):
            self.taken += 1
            x, y = batch(500 + i)
            yield {"img": x, "label": y} if self.dict_batches else (x, y)


@pytest.mark.parametrize(("n_batches", "calib_batches", "expected"), [(6, 3, 3), (2, 5, 2)])
def test_dbb_calibration(n_batches, calib_batches, expected):
    loader = Batches(n_batches)
    model, opt, ctl = make("dbb", interval=1, calib_loader=loader, calib_batches=calib_batches)
    train(model, opt, 3)
    others = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("bn")}
    before = run_eval(model)
    seen: dict[nn.Module, list[torch.Tensor]] = {}

    def capture(module, args):  # what every BatchNorm in train mode sees during the step
        if isinstance(module, nn.BatchNorm2d) and module.training:
            seen.setdefault(module, []).append(args[0].detach().clone())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(capture)
    try:
        result = ctl.step()
    finally:
        handle.remove()
    (name,) = result.grown
    assert result.calibrated_batches == expected
    assert loader.taken == expected
    assert rel_err(run_eval(model), before) < 1e-9
    # the rest of the network ran in eval mode: its BatchNorms did not move
    for k, v in others.items():
        assert torch.equal(model.state_dict()[k], v), k
    block = model.get_submodule(name)
    new_bns = [bn for branch in block.branches.values() for bn in branch.modules() if isinstance(bn, nn.BatchNorm2d)]
    assert set(seen) == set(new_bns)  # only the new branches' BatchNorms were in train mode
    for bn in new_bns:
        # a plain average over the calibration batches of each batch's mean and unbiased variance
        inputs = seen[bn]
        assert len(inputs) == expected
        mean = torch.stack([t.mean((0, 2, 3)) for t in inputs]).mean(0)
        var = torch.stack([t.transpose(0, 1).reshape(t.shape[1], -1).var(1) for t in inputs]).mean(0)
        assert torch.allclose(bn.running_mean, mean, rtol=1e-9, atol=1e-12)
        assert torch.allclose(bn.running_var, var, rtol=1e-9, atol=1e-12)
        assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == expected
    assert all(m.training for m in model.modules())
    train(model, opt, 2, start=10)


def test_dbb_without_calibration_data_keeps_function():
    model, opt, ctl = make("dbb", interval=1)
    train(model, opt, 3)
    before = run_eval(model)
    result = ctl.step()
    assert result.grown and result.calibrated_batches == 0
    assert rel_err(run_eval(model), before) < 1e-9


def test_dbb_custom_forward_fn():
    loader = Batches(4, dict_batches=True)
    calls = []

    def forward_fn(model, b):
        calls.append(b["img"].shape[0])
        return model(b["img"])

    model, opt, ctl = make("dbb", interval=1, calib_loader=loader, calib_batches=4, forward_fn=forward_fn)
    train(model, opt, 2)
    before = run_eval(model)
    result = ctl.step()
    assert result.calibrated_batches == 4 and calls == [8] * 4
    assert rel_err(run_eval(model), before) < 1e-9


# -- EMA ------------------------------------------------------------------------------------------


def names_and_shapes(module):
    return [(n, tuple(p.shape)) for n, p in module.named_parameters()], \
           [(n, tuple(b.shape)) for n, b in module.named_buffers()]


@pytest.mark.parametrize("use_buffers", [False, True])
@pytest.mark.parametrize("ema_first", [True, False], ids=["ema-before-dyrep", "ema-after-dyrep"])
@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_ema_follows_every_change(mode, ema_first, use_buffers):
    decay = 0.99
    model, opt, _ = make(mode, build_ctl=False)
    if ema_first:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=use_buffers)
    calib = Batches(100)
    ctl = dyrep_fx.DyRep(model, opt, interval=1, mode=mode, calib_loader=calib, calib_batches=2, **PAPER_SCHEDULE)
    if not ema_first:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=use_buffers)
    ctl.attach_ema(ema.module)
    ema.update_parameters(model)
    changes = 0
    for unit in range(5):
        train(model, opt, 2, start=2 * unit, ema=ema)
        if unit == 4:  # the last step: a cut too (a cut site that regrows is another test's matter)
            block = next(iter(dyrep_fx.blocks(model).values()))
            set_importance(block, {k: (0.5 if i % 2 else 0.001) for i, k in enumerate(block.kinds)})
        ema_before = run_eval(ema.module)
        result = ctl.step()
        assert result.changed
        changes += 1
        assert dyrep_fx.structure(ema.module) == dyrep_fx.structure(model)
        assert names_and_shapes(ema.module) == names_and_shapes(model)
        # the EMA's own function is unchanged by the sync
        assert rel_err(run_eval(ema.module), ema_before) < (1e-12 if mode == "online" else 1e-9)
        # the EMA keeps averaging, pairing each of its tensors with the same-named live tensor
        old = copy.deepcopy(ema.module)
        ema.update_parameters(model)
        for (name, e), m, o in zip(ema.module.named_parameters(), model.parameters(), old.parameters()):
            assert torch.allclose(e, o + (m - o) * (1 - decay), rtol=1e-12, atol=1e-15), name
    assert any(e["cut"] for e in ctl.history) and changes == 5
    train(model, opt, 2, start=50, ema=ema)
    assert torch.isfinite(run_eval(ema.module)).all()


# -- bad input ------------------------------------------------------------------------------------
def test_an_optimizer_of_another_model_is_refused_naming_what_it_lacks():
    model, _, _ = make(build_ctl=False)
    other, other_opt, _ = make(build_ctl=False)  # e.g. built for a copy of the model
    with pytest.raises(ValueError, match=r"holds none of the \d+ trainable parameters.*'conv1.weight'"):
        dyrep_fx.DyRep(model, other_opt)
    assert not dyrep_fx.api.is_transformed(model)  # refused before anything changed
    # frozen parameters need not be in it: only the trainable ones count
    model.conv1.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    dyrep_fx.DyRep(model, opt)


def test_an_optimizer_lacking_some_growable_weights_is_accepted_with_a_warning(caplog):
    model, _, _ = make(build_ctl=False)
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("conv2.")], lr=0.1)
    with caplog.at_level("WARNING", logger="dyrep_fx.controller"):
        ctl = dyrep_fx.DyRep(model, opt)
    warned = [r.getMessage() for r in caplog.records if r.name == "dyrep_fx.controller"]
    assert len(warned) == 1 and "lacks the weights of 1 growable conv(s) ['conv2']" in warned[0], warned
    assert "requires_grad=False" in warned[0]
    assert "conv2" in ctl.candidates()  # still a candidate, as the warning says
    caplog.clear()
    with caplog.at_level("WARNING", logger="dyrep_fx.controller"):
        dyrep_fx.DyRep(*make(build_ctl=False)[:2])  # a complete optimizer: no warning
    assert not [r for r in caplog.records if r.name == "dyrep_fx.controller"]


def test_a_misspelt_kind_is_refused_before_the_model_changes():
    model, opt, _ = make(build_ctl=False)
    with pytest.raises(ValueError, match="'idenity' is not a branch kind; did you mean 'identity'"):
        dyrep_fx.DyRep(model, opt, kinds=["1x1", "idenity"])
    assert not dyrep_fx.api.is_transformed(model)
