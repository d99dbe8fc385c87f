"""Gradients come out in their parameters' layout, size-1 dimensions included.

Autograd's ``AccumulateGrad`` clones a gradient whose strides differ from its parameter's in a dimension
of size > 1 (a copy per step), and accepts one that differs only in size-1 dimensions, which then reaches
DDP, whose bucket check compares every stride and copies and warns ("Grad strides do not match bucket
view strides"). Checked here on the gradients a backward hands to autograd (``torch.autograd.grad``, before
any accumulation) and on ``.grad`` after ``backward()``, for every branch kind in both modes and both
online executions, at 1x1 and kxk sites, grouped and depthwise; and under DDP on 2 gloo ranks.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.launch import torchrun
from torch import nn

from dyrep_fx.block import RepConv2d
from dyrep_fx.geometry import ConvGeometry
from dyrep_fx.kinds import applicable_kinds

#: (in, out, kernel, stride, padding, groups): 1x1 and kxk sites, grouped and depthwise.
CONVS = {
    "3x3": (8, 8, 3, 1, 1, 1),
    "3x3_grouped": (8, 8, 3, 1, 1, 2),
    "3x3_depthwise": (8, 8, 3, 1, 1, 8),
    "3x3_stride2": (4, 8, 3, 2, 1, 1),
    "1x1": (8, 16, 1, 1, 0, 1),
    "1x1_grouped": (8, 8, 1, 1, 0, 4),
    "1x1_stride2": (8, 8, 1, 2, 0, 1),
}
#: (mode, execution of the online 1x1_kxk branch)
SETTINGS = [("online", "assemble"), ("online", "convs"), ("dbb", "auto")]


def make_conv(name: str) -> nn.Conv2d:
    cin, cout, k, s, p, g = CONVS[name]
    return nn.Conv2d(cin, cout, k, s, p, groups=g, bias=False)


def cases() -> list:
    """(conv, kinds) pairs: each kind that applies to the conv alone, then every kind with nesting (None)."""
    out = []
    for conv in CONVS:
        kinds = applicable_kinds(ConvGeometry.from_conv(make_conv(conv)))
        out += [pytest.param(conv, [k], id=f"{conv}-{k}") for k in kinds]
        out.append(pytest.param(conv, None, id=f"{conv}-all_nested"))
    return out


def grown_block(name: str, mode: str, execution: str, kinds: list[str] | None) -> RepConv2d:
    """A block at conv ``name`` grown with ``kinds`` (every kind when None, then its inner kxk again)."""
    blk = RepConv2d(make_conv(name), mode).train()
    blk.grow(kinds)
    if kinds is None and "1x1_kxk" in blk.branches:
        branch = blk.branches["1x1_kxk"]
        branch.conv2 = RepConv2d(branch.conv2, mode).train()
        branch.conv2.grow()
    for m in blk.modules():
        if isinstance(m, RepConv2d):
            m.execution = execution
    return blk


def layout_mismatches(blk: RepConv2d, grads: list[torch.Tensor]) -> list[str]:
    params = list(blk.named_parameters())
    return [f"{n}: param {tuple(p.stride())}, grad {tuple(g.stride())} (shape {tuple(p.shape)})"
            for (n, p), g in zip(params, grads) if g is not None and g.stride() != p.stride()]


@pytest.mark.parametrize("conv,kinds", cases())
@pytest.mark.parametrize("mode,execution", SETTINGS)
def test_gradients_have_their_parameters_strides(mode, execution, conv, kinds):
    torch.manual_seed(0)
    blk = grown_block(conv, mode, execution, kinds)
    cin = CONVS[conv][0]
    x = torch.randn(2, cin, 6, 6)
    params = [p for _, p in blk.named_parameters()]
    # What the backward graph produces, before autograd's accumulation could copy it into shape:
    out = blk(x)
    raw = torch.autograd.grad(out, params, torch.randn_like(out), allow_unused=True)
    assert not layout_mismatches(blk, list(raw))
    # And what an optimizer (and DDP) sees:
    out = blk(x)
    (out * torch.randn_like(out)).sum().backward()
    assert not layout_mismatches(blk, [p.grad for p in params])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_ddp_does_not_warn_about_gradient_strides(mode, tmp_path):
    """2 gloo ranks train a net with 1x1, grouped and depthwise convs, all grown, in DDP: no warning."""
    torchrun("ddp_grad_layout_worker.py", "--out", str(tmp_path), "--mode", mode)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["params"] > 20  # the net was grown
        assert not [w for w in result["warnings"] if "strides" in w], result["warnings"]
        assert not result["mismatched"], result["mismatched"]
