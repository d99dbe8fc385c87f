"""ConvGeometry.conv: exactly the original conv, also where it crops the kernel to the taps a tiny map reads."""

from __future__ import annotations

import torch
from helpers.numerics import rel_err
from helpers.profiles import examples
from helpers.strategies import conv_cfgs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dyrep_fx.geometry import ConvGeometry

F64_TOL = 1e-12
SLOW_OK = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
seeds = st.integers(0, 2**31 - 1)


@settings(max_examples=examples(60), **SLOW_OK)
@given(cfg=conv_cfgs(map_sizes=(1, 6)), seed=seeds)
def test_conv_equals_the_original_on_any_map_size(cfg, seed):
    """Output, input gradient and kernel gradient equal the module's (zeros for the taps that read padding)."""
    torch.manual_seed(seed)
    conv = cfg.build()
    geom = ConvGeometry.from_conv(conv)
    x = cfg.input(batch=2).requires_grad_()
    ref = conv(x)
    g = torch.randn_like(ref)
    ref_x, ref_w = torch.autograd.grad(ref, (x, conv.weight), g)
    out = geom.conv(x, conv.weight, conv.bias)
    got_x, got_w = torch.autograd.grad(out, (x, conv.weight), g)
    for got, want in ((out, ref), (got_x, ref_x), (got_w, ref_w)):
        if not want.any():  # a map so small that no tap reads it: everything is exactly zero (or the bias)
            assert torch.equal(got, want)
        else:
            assert rel_err(got, want) <= F64_TOL


class _Shapes(TorchDispatchMode):
    """The kernel shapes the convolutions reaching ATen run with."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.convolution:
            self.kernels.append(tuple(args[1].shape[-2:]))
        return func(*args, **(kwargs or {}))


def _kernel_run(conv: nn.Conv2d, size: int) -> tuple[int, ...]:
    geom = ConvGeometry.from_conv(conv)
    with _Shapes() as shapes, torch.no_grad():
        geom.conv(torch.randn(2, conv.in_channels, size, size), conv.weight, conv.bias)
    return shapes.kernels[0]


def test_tiny_maps_run_only_the_taps_that_read_them():
    """ResNet's layer4 at 32 px input: a 3x3 conv on 1x1 maps is a 1x1 conv of its centre tap; the strided
    3x3 from 2x2 to 1x1 reads its lower-right 2x2 taps; maps the whole window reads keep the kernel."""
    assert _kernel_run(nn.Conv2d(8, 8, 3, 1, 1), 1) == (1, 1)
    assert _kernel_run(nn.Conv2d(8, 8, 3, 2, 1), 2) == (2, 2)
    assert _kernel_run(nn.Conv2d(8, 8, 3, 1, 1), 2) == (3, 3)
    assert _kernel_run(nn.Conv2d(8, 8, 3, 1, 1, padding_mode="circular"), 1) == (3, 3)
    # what the cost model counts is what runs (no crop where the padding is not plain zeros)
    assert ConvGeometry.from_conv(nn.Conv2d(8, 8, 3, 1, 1)).taps_run((1, 1)) == (1, 1)
    assert ConvGeometry.from_conv(nn.Conv2d(8, 8, 3, 1, 1, padding_mode="circular")).taps_run((1, 1)) == (3, 3)
    # only the centre tap reads a 5 px map at dilation 3, but cropping to it would need padding -2
    assert _kernel_run(nn.Conv2d(8, 8, 3, 1, 1, dilation=3), 5) == (3, 3)
