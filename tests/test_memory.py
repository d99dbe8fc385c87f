"""Activation memory by structure: what a block saves for backward, counted in bytes (no timing).

* A dbb-mode block saves less than a plain DBB block with the same branches (``ReferenceDBB``: conv +
  BatchNorm per branch, summed): no padded copy of the input, a 1x1 stage's BatchNorm keeps the unpadded
  map, not the padded one (``dbb_ops._PaddedMapBatchNorm``), the average filter keeps nothing of its
  input (``dbb_ops._FixedFilter``), and with ``recompute`` a 1x1 stage keeps nothing of its output's
  size: it runs its conv again in backward (``dbb_ops._PointwiseNorm``).
* That forward computes what the padded-input formulation computes, in training too (outputs,
  gradients, running statistics), for every padding mode and geometry.
* An online block running ``1x1_kxk`` as convolutions keeps no padded copy of its input either.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.memory import ReferenceDBB, saved_bytes, saved_tensors
from helpers.numerics import randomise_bns, rel_err
from helpers.profiles import examples
from helpers.strategies import conv_cfgs, perturb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dyrep_fx import dbb_ops
from dyrep_fx.block import RepConv2d
from dyrep_fx.geometry import ConvGeometry
from dyrep_fx.kinds import LARGE_KERNEL_KINDS

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
DBB = ("1x1", "1x1_kxk", "1x1_avg")
F64_TOL = 1e-10


# ------------------------------------------------------------------ the BatchNorm of the padded map
def padded_geometry(pads, padding_mode: str = "zeros", groups: int = 1, channels: int = 5) -> ConvGeometry:
    """A geometry with these pads per side (asymmetric ones too, as 'same' or same-from-input give)."""
    (top, bottom), (left, right) = pads
    conv = nn.Conv2d(channels, channels, (top + bottom + 1, left + right + 1), padding=(top, left),
                     padding_mode=padding_mode, groups=groups)
    return ConvGeometry(**{**vars(ConvGeometry.from_conv(conv)), "pads": pads})


@pytest.mark.parametrize("pads,stride,groups", [(((1, 1), (1, 1)), (1, 1), 1), (((0, 2), (1, 0)), (1, 1), 5),
                                                 (((3, 3), (2, 2)), (1, 1), 1), (((0, 0), (0, 0)), (2, 1), 1)])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("recompute", [False, True])
def test_pointwise_norm_is_the_batchnorm_of_the_padded_conv_output(pads, stride, groups, momentum, recompute):
    """Three training steps and an eval one: output, gradients, running statistics; the padded map is not
    kept for backward, and with ``recompute`` the 1x1 conv's output is not either."""
    torch.manual_seed(0)
    ours = nn.BatchNorm2d(5, momentum=momentum, dtype=torch.float64)
    randomise_bns(ours, seed=1, signed=True)
    ref = copy.deepcopy(ours)
    geom = padded_geometry(pads, groups=groups)
    w = torch.randn(5, 5 // groups, 1, 1, dtype=torch.float64, requires_grad=True)
    padded = pads != ((0, 0), (0, 0))
    for step in range(4):
        training = step < 3
        ours.train(training)
        ref.train(training)
        x = (torch.randn(3, 5, 4, 6, dtype=torch.float64) + step).requires_grad_()
        z = F.conv2d(x, w, None, stride, 0, 1, groups)
        want = ref(geom.pad_input(z))
        if training:
            state = copy.deepcopy(ours.state_dict())
            shapes = [s for _, s, _ in saved_tensors(lambda t: dbb_ops.pointwise_norm(ours, t, w, geom, stride,
                                                                                        padded, recompute), x)]
            assert (tuple(z.shape) in shapes) is not recompute, shapes
            assert not padded or tuple(want.shape) not in shapes, shapes
            ours.load_state_dict(state)  # (that forward counted a batch)
        out = dbb_ops.pointwise_norm(ours, x, w, geom, stride, padded, recompute)
        assert rel_err(out, want) <= F64_TOL
        g = torch.randn_like(want)
        got = torch.autograd.grad(out, [x, w, ours.weight, ours.bias], g)
        exp = torch.autograd.grad(want, [x, w, ref.weight, ref.bias], g)
        for a, e in zip(got, exp):
            assert rel_err(a, e) <= F64_TOL
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-12, atol=1e-12)


def test_padded_map_batchnorm_and_fixed_filter_gradcheck(device):
    torch.manual_seed(0)
    z = torch.randn(2, 3, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: dbb_ops._PaddedMapBatchNorm.apply(*t, ((1, 2), (2, 1)), 1e-5)[0], (z, w, b))
    filt = torch.rand(3, 1, 2, 3, dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda t: dbb_ops._FixedFilter.apply(t, filt, (2, 1), (1, 1)), (z,))
    saved = saved_tensors(lambda t: dbb_ops._FixedFilter.apply(t, filt, (1, 1), (1, 1)), z)
    assert saved == [("leaf", tuple(filt.shape), filt.numel() * 8)], saved  # the filter, nothing of z


def test_pointwise_norm_gradcheck(device):
    torch.manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)

    x = rand(2, 4, 3, 4)
    assert torch.autograd.gradcheck(  # padded on every side differently
        lambda *t: dbb_ops._PointwiseNorm.apply(*t, (1, 1), 1, ((1, 2), (2, 1)), 1e-5)[0],
        (x, rand(3, 4, 1, 1), rand(3), rand(3)))
    assert torch.autograd.gradcheck(  # grouped and strided, unpadded
        lambda *t: dbb_ops._PointwiseNorm.apply(*t, (2, 1), 2, ((0, 0), (0, 0)), 1e-5)[0],
        (x, rand(4, 2, 1, 1), rand(4), rand(4)))


@pytest.mark.parametrize("recompute", [False, True])
def test_pointwise_norm_under_autocast_runs_in_the_forward_dtype(recompute):
    """bfloat16 autocast (CPU): the conv runs in bfloat16 in forward (and with ``recompute`` again in
    backward); the gradients equal those of the same modules run as written under autocast."""
    torch.manual_seed(0)
    ours = nn.BatchNorm2d(6).train()
    ref = copy.deepcopy(ours)
    geom = padded_geometry(((1, 1), (1, 1)), channels=6)
    w = torch.randn(6, 6, 1, 1, requires_grad=True)
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dbb_ops.pointwise_norm(ours, x, w, geom, recompute=recompute)
        want = ref(geom.pad_input(F.conv2d(x, w)))
    assert out.dtype == want.dtype
    g = torch.randn_like(want.float())
    got = torch.autograd.grad(out.float(), [x, w], g)
    exp = torch.autograd.grad(want.float(), [x, w], g)
    for a, e in zip(got, exp):
        assert a.dtype == e.dtype and rel_err(a, e) <= 2e-2


@pytest.mark.parametrize("recompute", [False, True])
def test_a_watched_batchnorm_runs_as_a_module_on_the_padded_map(recompute):
    """Forward hooks on the norm (or on every module) see what they always saw: the padded map."""
    bn = nn.BatchNorm2d(5, dtype=torch.float64).train()
    geom = padded_geometry(((1, 1), (1, 1)))
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    w = torch.randn(5, 5, 1, 1, dtype=torch.float64)
    seen = []
    handle = bn.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    dbb_ops.pointwise_norm(bn, x, w, geom, recompute=recompute)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: seen.append(tuple(args[0].shape)))
    dbb_ops.pointwise_norm(bn, x, w, geom, recompute=recompute)
    handle.remove()
    assert seen == [(2, 5, 6, 6)] * 2


# ------------------------------------------------------------- dbb training: the same function as before
def padded_input_forward(blk: RepConv2d, x: torch.Tensor) -> torch.Tensor:
    """The dbb block as first written: every branch on the explicitly padded input, BatchNorms as modules."""
    geom = blk.geometry
    xp = geom.pad_input(x)
    out = blk.main_bn(geom.conv_valid(xp, blk.main_weight, blk.main_bias))
    for kind, br in blk.branches.items():
        if kind == "identity":
            y = br.bn(x)
        elif kind == "1x1_kxk":
            z = br.bn1(F.conv2d(xp, br.conv1.weight, None, 1, 0, 1, geom.groups))
            y = br.bn(padded_input_forward(br.conv2, z) if isinstance(br.conv2, RepConv2d)
                      else geom.conv_valid(z, br.conv2.weight))
        elif kind in ("1x1_avg", "prior"):
            z = br.bn1(F.conv2d(xp, br.conv1.weight, None, 1, 0, 1, geom.groups))
            y = br.bn(geom.conv_valid(z, br.spatial.unsqueeze(1), groups=geom.out_channels))
        else:
            y = br.bn(geom.conv_valid(geom.window(xp, br.size, br.offset), br.conv.weight))
        out = out + y
    return out


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cfg=conv_cfgs(padding_modes=("zeros", "reflect", "replicate", "circular")), seed=st.integers(0, 2**31 - 1),
       recompute=st.booleans())
def test_dbb_training_forward_equals_the_padded_input_formulation(cfg, seed, recompute, device):
    """Train mode: outputs, every parameter's gradient and every running statistic, nested blocks included,
    with and without ``recompute``."""
    torch.manual_seed(seed)
    blk = RepConv2d(cfg.build().to(device), "dbb").train()
    # (the formulation above knows the seven classic kinds; the large-kernel kinds: tests/test_kinds.py)
    blk.grow([k for k in blk.available_kinds() if k not in LARGE_KERNEL_KINDS])
    blk.recompute = recompute
    if "1x1_kxk" in blk.branches:
        inner = RepConv2d(blk.branches["1x1_kxk"].conv2, "dbb").train()
        blk.branches["1x1_kxk"].conv2 = inner
        inner.grow([k for k in inner.available_kinds() if k not in LARGE_KERNEL_KINDS])
        inner.recompute = recompute
    randomise_bns(blk, seed=None, signed=True)
    perturb(blk)
    ref = copy.deepcopy(blk)
    x = cfg.input(batch=3).to(device)
    out, want = blk(x), padded_input_forward(ref, x)
    assert rel_err(out, want) <= F64_TOL
    g = torch.randn_like(want)
    (out * g).sum().backward()
    (want * g).sum().backward()
    # Train-mode BatchNorms cancel most of some gradients (to ~1e-12): compare on the largest one's scale.
    scale = max(float(q.grad.abs().max()) for q in ref.parameters() if q.grad is not None)
    for (name, p), q in zip(blk.named_parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10 * scale, msg=name)
    for (name, a), b in zip(blk.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------------ saved bytes
def dbb_block(cin: int, cout: int, stride: int, kinds=DBB, recompute: bool = False) -> RepConv2d:
    blk = RepConv2d(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), "dbb").train()
    blk.grow(list(kinds))
    blk.recompute = recompute
    return blk


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("kinds", [DBB, ("1x1",), ("1x1_kxk",), ("1x1_avg",)], ids="+".join)
@pytest.mark.parametrize("cin,cout,size,stride", [(16, 16, 14, 1), (8, 16, 14, 2), (32, 32, 3, 1)])
def test_dbb_block_saves_a_plain_dbb_block_less_what_it_needs_not(cin, cout, size, stride, kinds, recompute):
    """Feature maps saved: exactly the plain DBB block's less the average filter's input, and with
    ``recompute`` less each 1x1 stage's output (per-channel statistics left out); in all, fewer bytes."""
    torch.manual_seed(0)
    n = 4
    x = torch.randn(n, cin, size, size)
    ours = dbb_block(cin, cout, stride, kinds, recompute)
    ref = ReferenceDBB(cin, cout, 3, stride, kinds=kinds).train()

    def map_bytes(module: nn.Module) -> int:
        return sum(b for _, shape, b in saved_tensors(module, x) if len(shape) == 4 and shape[0] == n)

    out = (size + 2 - 3) // stride + 1
    not_needed = {"1x1_avg": cout * (size + 2) ** 2}  # the average filter's padded input
    if recompute:
        stage_maps = {"1x1": cout * out * out, "1x1_kxk": cin * size * size, "1x1_avg": cout * size * size}
        not_needed = {k: not_needed.get(k, 0) + stage_maps[k] for k in stage_maps}
    assert map_bytes(ref) - map_bytes(ours) == 4 * n * sum(not_needed.get(k, 0) for k in kinds), saved_tensors(ours, x)
    assert saved_bytes(ours, x) <= saved_bytes(ref, x)


@pytest.mark.parametrize("mode,execution", [("dbb", "auto"), ("online", "convs")])
def test_no_padded_copy_of_the_input_is_saved(mode, execution):
    """Neither a dbb block nor an online one running 1x1_kxk as convolutions keeps ``pad(x)`` (zero padding)."""
    blk = RepConv2d(nn.Conv2d(8, 8, 3, 1, 1, bias=False), mode).train()
    blk.grow()
    blk.execution = execution
    saved = saved_tensors(blk, torch.randn(2, 8, 6, 6, requires_grad=True))
    assert saved and not [s for s in saved if s[0].startswith("ConstantPadNd")], saved
