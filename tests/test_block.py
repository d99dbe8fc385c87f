"""Property tests of :class:`dyrep_fx.block.RepConv2d`: growth, pruning, nesting and folding keep the function.

Exactness is promised in online mode (train and eval) and in dbb mode in eval mode; every check below
compares against the block's own output just before the change, with BatchNorm statistics and all
parameters randomised first, so that no check can pass because something is still at its initial value.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from helpers.numerics import randomise_bns, rel_err
from helpers.profiles import examples
from helpers.strategies import ConvCfg, conv_cfgs, perturb, shuffle_state
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dyrep_fx.block import RepConv2d
from dyrep_fx.execution import EXECUTIONS
from dyrep_fx.kinds import BRANCH_KINDS

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

F64_TOL = 1e-10
F32_TOL = 1e-5
MAX_DEPTH = 3  # outer block, a nested block, and one nested inside that
EXACT_MODES = [("online", True), ("online", False), ("dbb", False)]  # (mode, train)
SLOW_OK = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
seeds = st.integers(0, 2**31 - 1)


# ------------------------------------------------------------------------------------------ helpers
def all_blocks(root: RepConv2d, depth: int = 1):
    """Every RepConv2d in the tree with its depth (the root is depth 1)."""
    yield root, depth
    for inner in root.inner_convs().values():
        if isinstance(inner, RepConv2d):
            yield from all_blocks(inner, depth + 1)


def nestable(root: RepConv2d) -> list[RepConv2d]:
    return [b for b, d in all_blocks(root) if d < MAX_DEPTH and "1x1_kxk" in b.branches
            and not isinstance(b.branches["1x1_kxk"].conv2, RepConv2d)]


def nest(block: RepConv2d, mode: str) -> RepConv2d:
    """Replace the kxk conv of ``block``'s 1x1_kxk branch by a RepConv2d around it (nested growth)."""
    branch = block.branches["1x1_kxk"]
    inner = RepConv2d(branch.conv2, mode)
    branch.conv2 = inner
    return inner


def grow_everything(block: RepConv2d, mode: str, depth: int = 2) -> None:
    """Grow every available kind, then nest and grow again down to ``depth`` levels."""
    block.grow()
    if depth > 1 and "1x1_kxk" in block.branches:
        grow_everything(nest(block, mode), mode, depth - 1)


def set_execution(root: RepConv2d, plan: str) -> None:
    """Run every block of the tree with ``plan`` (see dyrep_fx.execution)."""
    for b, _ in all_blocks(root):
        b.execution = plan


def draw_subset(data, kinds: list[str], label: str) -> list[str]:
    return data.draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=len(kinds), unique=True), label=label)


def random_step(blk: RepConv2d, mode: str, data) -> str:
    """Apply one random grow / cut / nest(+grow) anywhere in the tree; returns a description."""
    blocks = [b for b, _ in all_blocks(blk)]
    growable = [i for i, b in enumerate(blocks) if b.available_kinds()]
    cuttable = [i for i, b in enumerate(blocks) if b.kinds]
    ops = ["grow"] * bool(growable) + ["cut"] * bool(cuttable) + ["nest"] * bool(nestable(blk))
    op = data.draw(st.sampled_from(ops), label="op")
    if op == "grow":
        target = blocks[data.draw(st.sampled_from(growable), label="block")]
        kinds = draw_subset(data, target.available_kinds(), "grow kinds")
        target.grow(kinds)
        return f"grow {kinds}"
    if op == "cut":
        target = blocks[data.draw(st.sampled_from(cuttable), label="block")]
        kinds = draw_subset(data, target.kinds, "cut kinds")
        target.cut(kinds)
        return f"cut {kinds}"
    candidates = nestable(blk)
    target = candidates[data.draw(st.integers(0, len(candidates) - 1), label="block")]
    inner = nest(target, mode)
    kinds = draw_subset(data, inner.available_kinds(), "nested kinds")
    inner.grow(kinds)
    return f"nest+grow {kinds}"


def run_sequence(cfg: ConvCfg, mode: str, train: bool, dtype: torch.dtype, tol: float, data,
                 device: torch.device | str = "cpu") -> None:
    conv = cfg.build(dtype).to(device)
    weight, bias = conv.weight, conv.bias
    blk = RepConv2d(conv, mode).train(train)
    x = cfg.input(dtype).to(device)
    n_steps = data.draw(st.integers(1, 5), label="steps")
    plan = data.draw(st.sampled_from(EXECUTIONS), label="plan")
    history = []
    for _ in range(n_steps):
        shuffle_state(blk)
        set_execution(blk, plan)
        with torch.no_grad():
            ref = blk(x)
        history.append(random_step(blk, mode, data))
        set_execution(blk, plan)
        with torch.no_grad():
            out = blk(x)
            err = rel_err(out, ref)
            assert err <= tol, f"{history}: function changed by {err:.2e}"
            folded = blk.to_conv()
            assert folded.training == train
            fold_err = rel_err(folded(x), out)
            assert fold_err <= tol, f"{history}: fold differs by {fold_err:.2e}"
        assert blk.main_weight is weight, f"{history}: main kernel Parameter replaced"
        if bias is not None:
            assert blk.main_bias is bias, f"{history}: bias Parameter replaced"
        for b, _ in all_blocks(blk):
            assert b.training == train


# ------------------------------------------------------------------------------- exactness: float64
@pytest.mark.parametrize("mode,train", EXACT_MODES)
@settings(max_examples=examples(50), **SLOW_OK)
@given(cfg=conv_cfgs(), data=st.data(), seed=seeds)
def test_sequence_exact_float64(mode, train, cfg, data, seed, device):
    torch.manual_seed(seed)
    run_sequence(cfg, mode, train, torch.float64, F64_TOL, data, device)


@pytest.mark.parametrize("mode,train", EXACT_MODES)
@settings(max_examples=examples(12), **SLOW_OK)
@given(cfg=conv_cfgs(padding_modes=("reflect", "replicate", "circular")), data=st.data(), seed=seeds)
def test_sequence_exact_other_padding_modes(mode, train, cfg, data, seed):
    torch.manual_seed(seed)
    run_sequence(cfg, mode, train, torch.float64, F64_TOL, data)


@pytest.mark.parametrize("mode,train", EXACT_MODES)
@settings(max_examples=examples(10), **SLOW_OK)
@given(cfg=conv_cfgs(padding_modes=("zeros", "zeros", "reflect", "replicate", "circular")), data=st.data(),
       seed=seeds)
def test_sequence_exact_float32(mode, train, cfg, data, seed, device):
    torch.manual_seed(seed)
    run_sequence(cfg, mode, train, torch.float32, F32_TOL, data, device)


@pytest.mark.parametrize("mode", ["online", "dbb"])
@settings(max_examples=examples(15), **SLOW_OK)
@given(cfg=conv_cfgs(padding_modes=("zeros", "reflect")), seed=seeds)
def test_full_growth_then_full_cut_back_to_a_plain_conv(mode, cfg, seed):
    """Grow everything (nested twice), randomise, cut everything: the block equals a plain conv again."""
    torch.manual_seed(seed)
    conv = cfg.build()
    blk = RepConv2d(conv, mode).eval()
    x = cfg.input()
    grow_everything(blk, mode, depth=3)
    shuffle_state(blk)
    with torch.no_grad():
        ref = blk(x)
        blk.cut(blk.kinds)
        assert not blk.grown and blk.structure() == {"kinds": []}
        assert rel_err(blk(x), ref) <= F64_TOL
        # The un-grown block is a plain conv of the original geometry with its (updated) own parameters.
        plain = dataclasses.replace(cfg, bias=blk.bias is not None).build()
        plain.weight.copy_(blk.weight)
        if blk.bias is not None:
            plain.bias.copy_(blk.bias)
        assert rel_err(plain(x), ref) <= F64_TOL


def test_dbb_calibrate_then_rebalance_workflow():
    """grow() in dbb mode, calibrate the fresh BatchNorms on data, then rebalance to the pre-growth kernel."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, 1, 1, dtype=torch.float64)
    x = torch.randn(4, 4, 9, 9, dtype=torch.float64)
    blk = RepConv2d(conv, "dbb")
    with torch.no_grad():
        ref = conv(x)
        w0, b0 = blk.equivalent()
        w0, b0 = w0.clone(), b0.clone()
        blk.grow()
        blk.train()
        for _ in range(3):
            blk(torch.randn(4, 4, 9, 9, dtype=torch.float64) * 3 + 1)  # moves every running statistic
        blk.eval()
        assert rel_err(blk(x), ref) > 1e-3  # calibration changed the function ...
        blk.rebalance(w0, b0)
        assert rel_err(blk(x), ref) <= F64_TOL  # ... and rebalance restores it exactly
        w, b = blk.equivalent()
        assert rel_err(w, w0) <= F64_TOL and rel_err(b, b0) <= F64_TOL


def conv_holding(cfg: ConvCfg, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """The configuration's own conv class and hyper-parameters holding ``weight`` and ``bias``."""
    conv = cfg.build()
    conv.weight = nn.Parameter(weight)
    conv.bias = None if bias is None else nn.Parameter(bias)
    return conv


@pytest.mark.parametrize("mode", ["online", "dbb"])
@settings(max_examples=examples(15), **SLOW_OK)
@given(cfg=conv_cfgs(), seed=seeds)
def test_rebalance_sets_the_equivalent(mode, cfg, seed):
    torch.manual_seed(seed)
    blk = RepConv2d(cfg.build(), mode).eval()
    grow_everything(blk, mode)
    shuffle_state(blk)
    w = torch.randn_like(blk.weight)
    b = torch.randn(cfg.cout, dtype=torch.float64)
    blk.rebalance(w, b if blk.bias is not None else None)
    ew, eb = blk.equivalent()
    assert rel_err(ew, w) <= F64_TOL
    if blk.bias is not None:
        assert rel_err(eb, b) <= F64_TOL
    x = cfg.input()
    with torch.no_grad():
        assert rel_err(blk(x), conv_holding(cfg, w, eb)(x)) <= F64_TOL


# ---------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("mode", ["online", "dbb"])
@settings(max_examples=examples(12), **SLOW_OK)
@given(cfg=conv_cfgs(padding_modes=("zeros", "reflect")), seed=seeds)
def test_gradients_reach_every_branch_parameter(mode, cfg, seed):
    if mode == "dbb":
        # With one input channel per group every 1x1 stage is a per-channel scale, which a train-mode
        # BatchNorm normalises away: those gradients are zero by mathematics, not by a bug.
        assume(cfg.cin // cfg.groups >= 2)
    torch.manual_seed(seed)
    blk = RepConv2d(cfg.build(), mode).train()
    grow_everything(blk, mode, depth=3)
    perturb(blk)
    x = cfg.input(batch=3)
    out = blk(x)
    (out * torch.randn_like(out)).sum().backward()
    params = [(n, p) for n, p in blk.named_parameters() if p.requires_grad]
    assert any(n.startswith("branches.") for n, _ in params)
    nonzero = 0
    for name, p in params:
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        big = bool(p.grad.abs().max() > 1e-8)
        nonzero += int(big)
        if mode == "online":  # no BatchNorm anywhere: every parameter moves the output
            assert big, f"{name} has an all-zero gradient"
        elif name.endswith(("bn.weight", "main_bn.weight")):  # every branch's scale (its last BN's gamma)
            assert big, f"{name} has an all-zero gradient"
    # dbb: a train-mode BatchNorm removes constants and per-channel scales, so biases in front of one and
    # depthwise 1x1 weights (a pure per-channel scale) legitimately get ~0; everything else must move.
    assert nonzero >= 0.6 * len(params)
    for kind in blk.kinds:
        assert any(n.startswith(f"branches.{kind}.") and p.grad.abs().max() > 1e-8 for n, p in params)


# ---------------------------------------------------------------------------------- one convolution
class ConvCounter(TorchDispatchMode):
    """Counts forward convolutions over a batch of ``batch`` feature maps at the ATen dispatch level (the
    online assembly runs its kernel merges as convolutions over kernels, whose batch is a channel count)."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch
        self.count = 0
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.lstrip("_")
        if ("convolution" in name or name.startswith(("conv", "slow_conv", "thnn_conv"))) and not (
            "backward" in name or name.startswith("convert")
        ) and args[0].shape[0] == self.batch:
            self.count += 1
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def count_convs(module: nn.Module, x: torch.Tensor) -> int:
    """Feature-map convolutions of one forward of ``x`` (give ``x`` a batch size no channel count has)."""
    with ConvCounter(x.shape[0]) as counter:
        module(x)
    return counter.count


@settings(max_examples=examples(20), **SLOW_OK)
@given(cfg=conv_cfgs(padding_modes=("zeros", "reflect", "replicate", "circular")), seed=seeds)
def test_online_block_runs_exactly_one_convolution(cfg, seed, device):
    torch.manual_seed(seed)
    conv = cfg.build().to(device)
    x = cfg.input(batch=max(cfg.cin, cfg.cout) + 1).to(device)
    assert count_convs(conv, x) == 1  # the counter sees a plain conv
    blk = RepConv2d(conv, "online")
    assert count_convs(blk, x) == 1
    grow_everything(blk, "online", depth=3)
    assert len(list(all_blocks(blk))) >= 2 or "1x1_kxk" not in blk.branches
    perturb(blk)
    set_execution(blk, "assemble")  # "auto" may run 1x1_kxk as two convs on small maps (tested below)
    for train in (True, False):
        blk.train(train)
        assert count_convs(blk, x) == 1
        assert count_convs(blk.to_conv(), x) == 1


@settings(max_examples=examples(25), **SLOW_OK)
@given(cfg=conv_cfgs(padding_modes=("zeros", "reflect", "replicate", "circular")), seed=seeds)
def test_online_plans_compute_the_same_function_and_gradients(cfg, seed, device):
    """Running 1x1_kxk as convolutions (nested blocks included) equals assembling one kernel."""
    torch.manual_seed(seed)
    blk = RepConv2d(cfg.build().to(device), "online").train()
    grow_everything(blk, "online", depth=3)
    perturb(blk)
    x = cfg.input(batch=3).to(device).requires_grad_()
    grad_out = None
    results = {}
    for plan in ("assemble", "convs"):
        set_execution(blk, plan)
        blk.zero_grad(set_to_none=True)
        x.grad = None
        out = blk(x)
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        (out * grad_out).sum().backward()
        results[plan] = (out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in blk.named_parameters()})
    (out_a, gx_a, grads_a), (out_c, gx_c, grads_c) = results["assemble"], results["convs"]
    assert rel_err(out_c, out_a) <= F64_TOL
    assert rel_err(gx_c, gx_a) <= F64_TOL
    for name, g in grads_a.items():
        assert rel_err(grads_c[name], g) <= F64_TOL, name
    if "1x1_kxk" in blk.branches:
        assert count_convs(blk, x) >= 3  # the main conv plus the branch's 1x1 and kxk


@settings(max_examples=examples(10), **SLOW_OK)
@given(cfg=conv_cfgs(), seed=seeds)
def test_dbb_block_runs_several_convolutions(cfg, seed):
    torch.manual_seed(seed)
    blk = RepConv2d(cfg.build(), "dbb").eval()
    blk.grow()
    x = cfg.input()
    n = count_convs(blk, x)
    assert n > 1
    assert n >= 1 + len([k for k in blk.kinds if k != "identity"])
    assert count_convs(blk.to_conv(), x) == 1


# --------------------------------------------------------------------------------------- importance
@pytest.mark.parametrize("init_scale", [0.01, 0.3])
@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_importance_of_fresh_branches_is_init_scale(mode, init_scale):
    torch.manual_seed(0)
    blk = RepConv2d(nn.Conv2d(4, 4, 3, 1, 1, dtype=torch.float64), mode, init_scale=init_scale)
    blk.grow(["1x1", "1xk"])
    imp = blk.importance()
    assert set(imp) == {"1x1", "1xk"}
    assert all(v == pytest.approx(init_scale, rel=1e-12) for v in imp.values())
    # After training moves everything, a second growth gives the new branches init_scale again
    # (the main scale is reset to the identity by rebalancing).
    perturb(blk)
    randomise_bns(blk, seed=None, signed=True)
    blk.grow(["1x1_kxk", "identity", "prior"])
    imp = blk.importance()
    assert set(imp) == set(blk.kinds)
    for k in ["1x1_kxk", "identity", "prior"]:
        assert imp[k] == pytest.approx(init_scale, rel=1e-12)
    assert imp["1x1"] != pytest.approx(init_scale, rel=1e-3)  # the old branch kept its trained scale
    inner = nest(blk, mode)
    inner.grow()
    assert all(v == pytest.approx(0.01, rel=1e-12) for v in inner.importance().values())


@pytest.mark.parametrize("mode", ["online", "dbb"])
@settings(max_examples=examples(15), **SLOW_OK)
@given(cfg=conv_cfgs(), seed=seeds)
def test_importance_matches_the_parameters(mode, cfg, seed):
    torch.manual_seed(seed)
    blk = RepConv2d(cfg.build(), mode)
    blk.grow()
    shuffle_state(blk)
    imp = blk.importance()
    assert list(imp) == blk.kinds
    if mode == "online":
        # the branch kernel's share of the block's: mean per-channel Frobenius norms, written out
        def norms(k):
            return k.detach().reshape(k.shape[0], -1).pow(2).sum(1).sqrt().mean()

        whole = norms(blk.equivalent()[0])
        for kind, branch in blk.branches.items():
            scaled = branch.scale.detach().reshape(-1, 1, 1, 1) * branch.raw_kernel().detach()
            assert imp[kind] == pytest.approx(float(norms(scaled) / whole), rel=1e-12)
    else:
        main = blk.main_bn.weight.detach().abs().mean()
        for kind, branch in blk.branches.items():
            # The *last* BatchNorm's gamma (1x1_kxk / 1x1_avg / prior also have an inner bn1).
            assert imp[kind] == pytest.approx(float(branch.bn.weight.detach().abs().mean() / main), rel=1e-12)
            if hasattr(branch, "bn1"):
                with torch.no_grad():
                    branch.bn1.weight.mul_(7.0)
                assert blk.importance()[kind] == pytest.approx(imp[kind], rel=1e-12)


@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_importance_of_ungrown_block_is_empty(mode):
    blk = RepConv2d(nn.Conv2d(4, 4, 3, 1, 1), mode)
    assert blk.importance() == {}
    blk.grow(["1x1"])
    blk.cut(["1x1"])
    assert blk.importance() == {}


# ------------------------------------------------------------------- parameters, state_dict, to_conv
class TaggedConv(nn.Conv2d):
    """A user's Conv2d subclass: folding must give this class back."""

    tag = "user"


@pytest.mark.parametrize("mode", ["online", "dbb"])
@settings(max_examples=examples(15), **SLOW_OK)
@given(cfg=conv_cfgs(padding_modes=("zeros", "reflect", "replicate", "circular")), data=st.data(), seed=seeds)
def test_parameters_state_dict_and_to_conv(mode, cfg, data, seed):
    torch.manual_seed(seed)
    conv = cfg.build(cls=TaggedConv)
    keys = set(conv.state_dict())
    weight, bias = conv.weight, conv.bias
    blk = RepConv2d(conv, mode).eval()
    assert set(blk.state_dict()) == keys
    assert {n for n, _ in blk.named_parameters()} == {n for n, _ in conv.named_parameters()}
    blk.grow(draw_subset(data, blk.available_kinds(), "kinds"))
    assert blk.main_weight is weight and (bias is None or blk.main_bias is bias)
    assert any(id(p) == id(weight) for p in blk.parameters())
    shuffle_state(blk)
    x = cfg.input()
    folded = blk.to_conv()
    assert type(folded) is TaggedConv and folded.tag == "user"
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(folded, attr) == getattr(conv, attr), attr
    assert folded.weight is not blk.weight
    assert folded.weight.dtype == torch.float64 and folded.weight.requires_grad
    if mode == "online":
        assert (folded.bias is None) == (bias is None)
    else:
        assert folded.bias is not None
    with torch.no_grad():
        assert rel_err(folded(x), blk(x)) <= F64_TOL
    blk.cut(blk.kinds)
    assert blk.main_weight is weight and (bias is None or blk.main_bias is bias)
    if mode == "online":
        assert set(blk.state_dict()) == keys
        assert {n for n, _ in blk.named_parameters()} == {n for n, _ in conv.named_parameters()}
    else:  # a bias-free conv may have gained a bias in dbb mode, nothing else remains
        assert set(blk.state_dict()) <= {"weight", "bias"}
    # The template conv is untouched by folding: it still holds the original Parameters.
    assert conv.weight is weight and conv._parameters.get("bias") is bias


def test_to_conv_results_are_independent_modules():
    """Two folds and the original conv are separate modules: a hook on one must not fire on the others."""
    torch.manual_seed(0)
    conv = TaggedConv(4, 4, 3, padding=1)
    blk = RepConv2d(conv)
    blk.grow(["1x1"])
    first, second = blk.to_conv(), blk.to_conv()
    assert first is not second and first.weight is not second.weight
    seen = []
    first.register_forward_hook(lambda m, i, o: seen.append(m))
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        second(x)
        conv(x)
        blk(x)
    assert seen == [], "a hook registered on one folded conv fired on another module"
    with torch.no_grad():
        first(x)
    assert seen == [first]


# --------------------------------------------------------------------------------- available kinds
def _identity_tap_exists(cfg: ConvCfg) -> bool:
    """Brute force: does a one-hot kernel make this conv return its input through a tap that reads each
    output pixel's own input pixel directly, whatever the map size?

    The conv runs with zero padding on two map sizes: a tap that only reads the own pixel through the
    padding (circular wrap, reflection) of one particular map reads zeros here, so it is no identity. The
    library must not offer one there: the same conv on another map size would read another pixel.
    """
    if cfg.cin != cfg.cout:
        return False
    return all(_one_hot_returns_input(dataclasses.replace(cfg, padding_mode="zeros", h=h, w=w))
               for h, w in ((cfg.h, cfg.w), (cfg.h + 7, cfg.w + 5)))


def _one_hot_returns_input(cfg: ConvCfg) -> bool:
    """Whether some one-hot kernel (one tap, each output channel reading its own input channel) returns
    the input exactly."""
    conv = cfg.build()
    x = cfg.input()
    kh, kw = conv.kernel_size
    per_group = cfg.cin // cfg.groups
    for th in range(kh):
        for tw in range(kw):
            w = torch.zeros_like(conv.weight)
            idx = torch.arange(cfg.cout)
            w[idx, idx % per_group, th, tw] = 1.0
            with torch.no_grad():
                conv.weight.copy_(w)
                if conv.bias is not None:
                    conv.bias.zero_()
                y = conv(x)
            if y.shape == x.shape and torch.equal(y, x):
                return True
    return False


@settings(max_examples=examples(80), **SLOW_OK)
@given(cfg=conv_cfgs(padding_modes=("zeros", "reflect", "replicate", "circular"), max_kernel=4))
# once falsified the oracle: the only tap reading the own pixel does so through the wrap of a 5-pixel map
@example(cfg=ConvCfg(cin=1, cout=1, kernel=(4, 4), stride=1, dilation=3, groups=1, padding="same", bias=False,
                     padding_mode="circular", h=5, w=5))
def test_available_kinds(cfg):
    blk = RepConv2d(cfg.build())
    kinds = blk.available_kinds()
    kh, kw = blk.geometry.kernel_size
    stride = blk.geometry.stride
    assert kinds == [k for k in BRANCH_KINDS if k in kinds]  # canonical order
    assert "1x1_kxk" in kinds
    assert ("identity" in kinds) == _identity_tap_exists(cfg)
    if stride != (1, 1) or cfg.cin != cfg.cout:
        assert "identity" not in kinds
    if (kh, kw) == (1, 1):
        assert set(kinds) <= {"1x1_kxk", "identity"}
        pads_zero = blk.geometry.pads == ((0, 0), (0, 0))
        assert ("identity" in kinds) == (cfg.cin == cfg.cout and stride == (1, 1) and pads_zero)
    for k in ("1x1", "1x1_avg", "prior"):
        assert (k in kinds) == (kh * kw > 1)
    for k in ("1xk", "kx1"):
        assert (k in kinds) == (kh > 1 and kw > 1)
    refused = [k for k in BRANCH_KINDS if k not in kinds]
    for k in refused:
        with pytest.raises(ValueError, match=f"branch '{k}' does not apply"):
            blk.grow([k])
        assert not blk.grown
    if kinds:
        blk.grow(kinds[:1])
        assert blk.available_kinds() == kinds[1:]


@pytest.mark.parametrize(
    "conv,kind,reason",
    [
        (nn.Conv2d(4, 4, 3, 2, 1), "identity", "stride"),
        (nn.Conv2d(4, 8, 3, 1, 1), "identity", "in_channels 4 != out_channels 8"),
        (nn.Conv2d(4, 4, 3, 1, 0), "identity", "padding"),
        (nn.Conv2d(4, 4, 1, 1, 1), "identity", "padding"),
        (nn.Conv2d(4, 4, 1), "1x1", "1x1"),
        (nn.Conv2d(4, 4, 1), "1x1_avg", "1x1"),
        (nn.Conv2d(4, 4, 1), "prior", "1x1"),
        (nn.Conv2d(4, 4, (1, 3), padding=(0, 1)), "1xk", "larger than 1 in both axes"),
        (nn.Conv2d(4, 4, (3, 1), padding=(1, 0)), "kx1", "larger than 1 in both axes"),
    ],
)
def test_refused_kind_names_the_reason(conv, kind, reason):
    blk = RepConv2d(conv)
    assert kind not in blk.available_kinds()
    with pytest.raises(ValueError, match=f"does not apply.*{reason}"):
        blk.grow([kind])
    # A refused request changes nothing, even next to valid kinds.
    with pytest.raises(ValueError):
        blk.grow(["1x1_kxk", kind])
    assert not blk.grown and set(blk.state_dict()) == {"weight", "bias"}


def test_invalid_grow_and_cut_requests():
    blk = RepConv2d(nn.Conv2d(4, 4, 3, 1, 1))
    with pytest.raises(ValueError, match="unknown branch kind"):
        blk.grow(["3x3"])
    with pytest.raises(ValueError, match="cannot cut"):
        blk.cut(["1x1"])
    blk.grow(["1x1"])
    with pytest.raises(ValueError, match="already present"):
        blk.grow(["1x1"])
    with pytest.raises(ValueError, match="mode"):
        RepConv2d(nn.Conv2d(4, 4, 3), "offline")
    with pytest.raises(TypeError):
        RepConv2d(nn.Linear(4, 4))


# -------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_structure(mode):
    blk = RepConv2d(nn.Conv2d(4, 4, 3, 1, 1), mode)
    assert blk.structure() == {"kinds": []}
    blk.grow(["1x1_kxk", "1x1"])
    assert blk.structure() == {"kinds": ["1x1", "1x1_kxk"]}
    assert list(blk.inner_convs()) == ["branches.1x1_kxk.conv2"]
    assert blk.get_submodule("branches.1x1_kxk.conv2") is blk.inner_convs()["branches.1x1_kxk.conv2"]
    inner = nest(blk, mode)
    inner.grow(["kx1", "1x1_kxk"])
    nest(inner, mode).grow(["1x1"])
    spec = blk.structure()
    assert json.loads(json.dumps(spec)) == spec
    assert spec == {
        "kinds": ["1x1", "1x1_kxk"],
        "nested": {"branches.1x1_kxk.conv2": {
            "kinds": ["1x1_kxk", "kx1"],
            "nested": {"branches.1x1_kxk.conv2": {"kinds": ["1x1"]}},
        }},
    }
    blk.cut(["1x1_kxk"])
    assert blk.structure() == {"kinds": ["1x1"]} and blk.inner_convs() == {}


@settings(max_examples=examples(20), **SLOW_OK)
@given(cfg=conv_cfgs(), data=st.data(), mode=st.sampled_from(["online", "dbb"]), seed=seeds)
def test_structure_is_json_and_tracks_the_tree(cfg, data, mode, seed):
    torch.manual_seed(seed)
    blk = RepConv2d(cfg.build(), mode).eval()
    for _ in range(data.draw(st.integers(1, 4))):
        random_step(blk, mode, data)

    def expected(b: RepConv2d) -> dict:
        spec = {"kinds": b.kinds}
        nested = {p: expected(m) for p, m in b.inner_convs().items() if isinstance(m, RepConv2d)}
        if nested:
            spec["nested"] = nested
        return spec

    spec = blk.structure()
    assert json.loads(json.dumps(spec)) == spec == expected(blk)
    depth = max(d for _, d in all_blocks(blk))
    text = json.dumps(spec)
    assert text.count('"nested"') == depth - 1


def test_defaults():
    blk = RepConv2d(nn.Conv2d(2, 2, 3, padding=1))
    assert blk.mode == "online" and math.isclose(blk.init_scale, 0.01)


@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_a_nested_block_survives_its_parents_cut_with_its_parameters(mode):
    """Cutting other branches of the parent keeps the nested block's parameters and statistics as they
    were (objects and values): the reference re-initialises them."""
    torch.manual_seed(0)
    blk = RepConv2d(nn.Conv2d(4, 4, 3, 1, 1, dtype=torch.float64), mode)
    blk.grow(["1x1", "1x1_kxk", "1x1_avg"])
    inner = nest(blk, mode)
    inner.grow(["1x1", "1xk"])
    perturb(blk)
    randomise_bns(blk, seed=None, signed=True)
    kept = {n: (t, t.detach().clone()) for n, t in inner.state_dict(keep_vars=True).items()}
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    blk.eval()
    before = blk(x)
    blk.cut(["1x1", "1x1_avg"])
    assert blk.branches["1x1_kxk"].conv2 is inner and inner.kinds == ["1x1", "1xk"]
    after = inner.state_dict(keep_vars=True)
    assert list(after) == list(kept)
    for name, (obj, value) in kept.items():
        assert after[name] is obj and torch.equal(after[name], value), name
    assert rel_err(blk(x), before) < 1e-12
