"""Shared machinery of the large-kernel kinds: branches that are sums of (dilated) square convs centred in the
block's window, and the geometry those kinds call for.

A branch here holds one or more square convs ``(size k, dilation r)``. Conv ``j`` reads the block's input
through a footprint of ``r * (k - 1) + 1`` block taps centred in the window; its exact equivalent in the
window is its kernel with ``r - 1`` zeros inserted between taps, zero-padded to the window. The branch is
their sum:

* online: ``scale * sum_j embedded_j``, one :class:`~dyrep_fx.kinds.window_term.WindowTerm` over the largest footprint
  (a single undilated conv is its own term, a leaf: the cheapest case);
* dbb: ``bn(sum_j conv_j(x))``; convs of the same size and dilation run as one conv of their summed kernel
  (the same function and gradients, one conv's multiply-adds). One BatchNorm per branch keeps DyRep's
  contract that a branch's ``gamma`` is its importance.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from .. import kernels
from ..assembly import Term
from ..dbb_ops import window_edges
from ..geometry import ConvGeometry
from .branch import Branch, fuse_with_bn
from .window_term import WindowTerm

__all__ = ["SummedWindowBranch", "footprint", "large_depthwise"]

#: The smallest kernel the large-kernel kinds take: below it a 3x3 beside the kernel is no smaller kernel.
MIN_LARGE = 5


def footprint(size: int, dilation: int) -> int:
    """The block taps a ``size``-tap kernel with ``dilation`` spans (UniRepLKNet: ``r * (k - 1) + 1``)."""
    return dilation * (size - 1) + 1


def large_depthwise(geom: ConvGeometry) -> str | None:
    """``None`` for a square, odd, depthwise kernel of :data:`MIN_LARGE` taps or more, else why not.

    The large-kernel kinds stay off ordinary convs: RepLKNet, UniRepLKNet and MobileOne re-parameterize
    depthwise kernels, and an odd square window centres every odd footprint exactly."""
    kh, kw = geom.kernel_size
    if kh != kw or kh % 2 == 0 or kh < MIN_LARGE:
        return f"needs a square odd kernel of {MIN_LARGE} or more taps (has {kh}x{kw})"
    if geom.groups != geom.in_channels:
        return f"needs a depthwise conv (groups {geom.groups} != in_channels {geom.in_channels})"
    return None


def zero_inserted(weight: Tensor, dilation: int) -> Tensor:
    """``weight`` with ``dilation - 1`` zeros between taps: the undilated kernel computing the same conv."""
    if dilation == 1:
        return weight
    k = weight.shape[-1]
    out = weight.new_zeros(*weight.shape[:2], footprint(k, dilation), footprint(k, dilation))
    out[..., ::dilation, ::dilation] = weight
    return out


class SummedWindowBranch(Branch):
    """A sum of centred square convs (``specs``: ``(size, dilation)`` each) ending in one scale or BatchNorm."""

    specs_of: ClassVar = None  # (set by subclasses: geometry -> list of (size, dilation))

    def __init__(self, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> None:
        super().__init__(geom, mode, init_scale, like)
        self.specs = [tuple(s) for s in type(self).specs_of(geom)]
        self.convs = nn.ModuleList(self._new_conv(geom, k, r, like) for k, r in self.specs)
        self.span = max(footprint(k, r) for k, r in self.specs)

    @staticmethod
    def _new_conv(geom: ConvGeometry, size: int, dilation: int, like: Tensor) -> nn.Conv2d:
        conv = nn.Conv2d(geom.in_channels, geom.out_channels, size, geom.stride, 0,
                         tuple(d * dilation for d in geom.dilation), geom.groups, bias=False,
                         device=like.device, dtype=like.dtype)
        # He-normal, fan-out, as DyRep initialises new branches.
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        return conv

    def _offset(self, span: int) -> tuple[int, int]:
        return self.geom.centre((span, span))

    def _span_kernel(self) -> Tensor:
        """The sum of the convs' zero-inserted kernels, each centred in the largest footprint."""
        total = None
        for (k, r), conv in zip(self.specs, self.convs):
            part = zero_inserted(conv.weight, r)
            gap = (self.span - footprint(k, r)) // 2
            part = kernels.embed_kernel(part, (self.span, self.span), (gap, gap))
            total = part if total is None else total + part
        return total

    def raw_kernel(self) -> Tensor:
        return kernels.embed_kernel(self._span_kernel(), self.geom.kernel_size, self._offset(self.span))

    def term(self) -> Term:
        if len(self.convs) == 1 and self.specs[0][1] == 1:
            return WindowTerm(self.convs[0].weight, self.scale, self._offset(self.span))
        return WindowTerm(self._span_kernel(), self.scale, self._offset(self.span))

    def dbb_kernel(self) -> tuple[Tensor, Tensor]:
        return fuse_with_bn(self.raw_kernel(), None, self.bn)

    def _grouped(self) -> dict[tuple[int, int], Tensor]:
        """The summed kernel of each distinct ``(size, dilation)``."""
        groups: dict[tuple[int, int], Tensor] = {}
        for spec, conv in zip(self.specs, self.convs):
            groups[spec] = conv.weight if spec not in groups else groups[spec] + conv.weight
        return groups

    def forward(self, x: Tensor, xp: Tensor | None, recompute: bool = False) -> Tensor:
        out = None
        for (k, r), weight in self._grouped().items():
            y = self._run(x, xp, weight, k, r)
            out = y if out is None else out + y
        return self.bn(out)

    def _run(self, x: Tensor, xp: Tensor | None, weight: Tensor, size: int, dilation: int) -> Tensor:
        """One (dilated) conv over its centred footprint of the window, without a padded copy where possible."""
        geom, span = self.geom, footprint(size, dilation)
        offset = self._offset(span)
        step = tuple(d * dilation for d in geom.dilation)
        if xp is not None:
            window = geom.window(xp, (span, span), offset)
            return nn.functional.conv2d(window, weight, None, geom.stride, 0, step, geom.groups)
        edges = window_edges(geom, (x.shape[-2], x.shape[-1]), (span, span), offset)
        crop_t, crop_b, crop_l, crop_r = (max(-e, 0) for e in edges)
        x = x[..., crop_t: x.shape[-2] - crop_b, crop_l: x.shape[-1] - crop_r]
        pad_t, pad_b, pad_l, pad_r = (max(e, 0) for e in edges)
        if pad_t == pad_b and pad_l == pad_r:
            return nn.functional.conv2d(x, weight, None, geom.stride, (pad_t, pad_l), step, geom.groups)
        x = nn.functional.pad(x, (pad_l, pad_r, pad_t, pad_b))
        return nn.functional.conv2d(x, weight, None, geom.stride, 0, step, geom.groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, convs={self.specs}"


def with_specs(base: type[SummedWindowBranch], kind: str, specs_of) -> type[SummedWindowBranch]:
    """A subclass of ``base`` named for ``kind`` whose convs are ``specs_of(geometry)`` (kind factories)."""
    return type(f"{base.__name__}_{kind}", (base,), {"kind": kind, "specs_of": staticmethod(specs_of),
                                                     "__doc__": base.__doc__})


