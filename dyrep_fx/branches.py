"""The branch kinds a :class:`~dyrep_fx.block.RepConv2d` can carry beside its main kernel.

Each branch is a small module that knows two things about itself:

* ``kernel()``: its exact equivalent ``(W, b)`` in the block's own ``kh x kw`` window (eval mode);
* ``forward(x, xp, recompute)``: the feature-map computation used in ``dbb`` mode, on the block input ``x``
  and the block's explicitly padded input ``xp`` (``1x1_kxk`` also in online mode, see
  :mod:`dyrep_fx.execution`). ``xp`` is ``None`` when the conv pads with zeros (:func:`~dyrep_fx.dbb_ops.pads_with_zeros`).

Memory: a branch saves no more for backward than a plain DBB block does. With zero padding no branch
reads a padded copy of the input: window convolutions pad (or crop) inside the convolution, and a 1x1
stage runs on the unpadded input, since a 1x1 conv without bias maps the padding to itself (zeros to
zeros, reflected pixels to reflected outputs), and its output is padded after it. The dbb-mode stages
that keep less than their plain modules would are in :mod:`dyrep_fx.dbb_ops`.

Modes:

* ``online`` (OREPA): the branch is linear and bias-free, scaled per output channel by ``scale``;
  the block adds ``scale * raw_kernel()`` into one kernel and runs one convolution.
* ``dbb`` (DBB / DyRep): the branch ends in its own BatchNorm ``bn`` whose ``weight`` is the scale.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from . import kernels
from .assembly import ComposedTerm, FilterTerm, Term, WindowTerm
from .dbb_ops import fixed_filter, pointwise_norm
from .execution import run_composed_as_convs
from .geometry import ConvGeometry
from .kinds.registry import BranchKind, applies_everywhere, get_kind, register_kind

__all__ = ["Branch", "make_branch", "BRANCH_CLASSES", "fuse_with_bn", "window_edges"]


def _init_conv(conv: nn.Conv2d) -> nn.Conv2d:
    # He-normal, fan-out, as DyRep initialises new branches.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _new_bn(channels: int, gamma: float, like: Tensor) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        bn.weight.fill_(gamma)
    return bn


def fuse_with_bn(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """``(weight, bias)`` followed by ``bn`` (eval mode) as one kernel and bias."""
    return kernels.fuse_bn(weight, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def _pointwise(x: Tensor, weight: Tensor, groups: int) -> Tensor:
    """A bias-free 1x1 conv on the unpadded input (it commutes with the block's padding, any mode)."""
    return nn.functional.conv2d(x, weight, None, 1, 0, 1, groups)


def window_edges(geom: ConvGeometry, map_size: tuple[int, int], size: tuple[int, int],
                 offset: tuple[int, int]) -> list[int]:
    """Top, bottom, left and right edge of a ``size`` kernel's window at ``offset`` relative to the unpadded
    map: positive pads it, negative crops it."""
    (top, bottom), (left, right) = geom.pads_for(map_size)
    (kh, kw), (dh, dw) = geom.kernel_size, geom.dilation
    return [top - offset[0] * dh, bottom - (kh - size[0] - offset[0]) * dh,
            left - offset[1] * dw, right - (kw - size[1] - offset[1]) * dw]


def _window_conv(geom: ConvGeometry, x: Tensor, weight: Tensor, size: tuple[int, int],
                 offset: tuple[int, int]) -> Tensor:
    """``geom.window(zero-padded x)`` convolved with ``weight``, without a padded copy of ``x`` where possible.

    The window's edges, relative to ``x``, are the block's pads less the taps the ``size`` kernel skips:
    a negative one crops ``x`` (a view), and equal ones on both sides go to the convolution itself,
    which then keeps ``x`` for backward (the layer before keeps it anyway).
    """
    edges = window_edges(geom, (x.shape[-2], x.shape[-1]), size, offset)
    crop_t, crop_b, crop_l, crop_r = (max(-e, 0) for e in edges)
    x = x[..., crop_t: x.shape[-2] - crop_b, crop_l: x.shape[-1] - crop_r]
    pad_t, pad_b, pad_l, pad_r = (max(e, 0) for e in edges)
    if pad_t == pad_b and pad_l == pad_r:
        return nn.functional.conv2d(x, weight, None, geom.stride, (pad_t, pad_l), geom.dilation, geom.groups)
    return geom.conv_valid(nn.functional.pad(x, (pad_l, pad_r, pad_t, pad_b)), weight)


class Branch(nn.Module):
    """Base class: holds the block geometry and the branch's scale (``scale`` or ``bn.weight``)."""

    kind: ClassVar[str] = ""

    def __init__(self, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> None:
        super().__init__()
        self.geom = geom
        self.mode = mode
        if mode == "online":
            self.scale = nn.Parameter(torch.full((geom.out_channels,), float(init_scale),
                                                 device=like.device, dtype=like.dtype))
        else:
            self.bn = _new_bn(geom.out_channels, init_scale, like)

    def raw_kernel(self) -> Tensor:
        """The branch's unscaled linear kernel in the block window (online mode)."""
        raise NotImplementedError

    def inner_convs(self) -> dict[str, nn.Module]:
        """The branch's growable inner convs by path relative to the branch (for nested growth)."""
        return {}

    @classmethod
    def inner_geometries(cls, geom: ConvGeometry) -> dict[str, ConvGeometry]:
        """The geometries of the convs :meth:`inner_convs` holds in a block of ``geom`` (structure checks)."""
        return {}

    def runs_apart(self, shape: tuple[int, ...], execution: str) -> bool:
        """Online mode: whether the branch runs as its own convolutions on an input of ``shape`` instead of
        joining the block's one kernel (see :mod:`dyrep_fx.execution`)."""
        return False

    def dbb_kernel(self) -> tuple[Tensor, Tensor]:
        """The branch's equivalent kernel and bias with every BatchNorm fused (dbb mode, eval)."""
        raise NotImplementedError

    def kernel(self) -> tuple[Tensor, Tensor | None]:
        """Exact eval-mode equivalent ``(W, b)`` of this branch in the block window."""
        if self.mode == "online":
            return self.scale.reshape(-1, 1, 1, 1) * self.raw_kernel(), None
        return self.dbb_kernel()

    def term(self) -> Term:
        """This branch's share ``scale * raw_kernel()`` of the online kernel, for :mod:`dyrep_fx.assembly`."""
        raise NotImplementedError

    def gamma(self) -> Tensor:
        """The per-channel scale of this branch (its ``scale`` or its last BatchNorm's ``weight``)."""
        return self.scale if self.mode == "online" else self.bn.weight

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, mode={self.mode!r}"


class _WindowConvBranch(Branch):
    """A single conv of a sub-window (``size``) of the block window: the 1x1, 1xk and kx1 kinds."""

    def __init__(self, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> None:
        super().__init__(geom, mode, init_scale, like)
        self.size = self.window_size(geom)
        self.offset = geom.centre(self.size)
        self.conv = _init_conv(nn.Conv2d(geom.in_channels, geom.out_channels, self.size, geom.stride, 0,
                                         geom.dilation, geom.groups, bias=False,
                                         device=like.device, dtype=like.dtype))

    @staticmethod
    def window_size(geom: ConvGeometry) -> tuple[int, int]:
        raise NotImplementedError

    def raw_kernel(self) -> Tensor:
        return kernels.embed_kernel(self.conv.weight, self.geom.kernel_size, self.offset)

    def dbb_kernel(self) -> tuple[Tensor, Tensor]:
        w, b = fuse_with_bn(self.conv.weight, None, self.bn)
        return kernels.embed_kernel(w, self.geom.kernel_size, self.offset), b

    def term(self) -> Term:
        return WindowTerm(self.conv.weight, self.scale, self.offset)

    def forward(self, x: Tensor, xp: Tensor | None, recompute: bool = False) -> Tensor:
        if xp is None:
            if recompute and self.size == (1, 1) and not any(window_edges(self.geom, x.shape[-2:], self.size,
                                                                           self.offset)):
                # the centred 1x1 reads the input as it is: a 1x1 stage (see dbb_ops.pointwise_norm)
                return pointwise_norm(self.bn, x, self.conv.weight, self.geom, self.geom.stride, False, True)
            return self.bn(_window_conv(self.geom, x, self.conv.weight, self.size, self.offset))
        window = self.geom.window(xp, self.size, self.offset)
        return self.bn(self.geom.conv_valid(window, self.conv.weight))


class PointwiseBranch(_WindowConvBranch):
    """``1x1``: a 1x1 conv at the centre tap of the window."""

    kind = "1x1"

    @staticmethod
    def window_size(geom: ConvGeometry) -> tuple[int, int]:
        return (1, 1)


class RowBranch(_WindowConvBranch):
    """``1xk``: a 1 x kw conv on the centre row of the window (ACNet)."""

    kind = "1xk"

    @staticmethod
    def window_size(geom: ConvGeometry) -> tuple[int, int]:
        return (1, geom.kernel_size[1])


class ColumnBranch(_WindowConvBranch):
    """``kx1``: a kh x 1 conv on the centre column of the window (ACNet)."""

    kind = "kx1"

    @staticmethod
    def window_size(geom: ConvGeometry) -> tuple[int, int]:
        return (geom.kernel_size[0], 1)


class IdentityBranch(Branch):
    """``identity``: the input itself (RepVGG); in dbb mode a bare BatchNorm on the input."""

    kind = "identity"

    def __init__(self, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> None:
        super().__init__(geom, mode, init_scale, like)
        offset = geom.identity_offset()
        if offset is None:
            raise ValueError("the identity branch does not apply to this conv geometry")
        self.offset = offset
        self.register_buffer("eye", kernels.identity_kernel(
            geom.out_channels, geom.groups, geom.kernel_size, offset, like.dtype, like.device), persistent=False)

    def raw_kernel(self) -> Tensor:
        return self.eye

    def dbb_kernel(self) -> tuple[Tensor, Tensor]:
        return fuse_with_bn(self.eye, None, self.bn)

    def term(self) -> Term:
        (r, c) = self.offset
        return WindowTerm(self.eye[:, :, r:r + 1, c:c + 1], self.scale, self.offset)

    def forward(self, x: Tensor, xp: Tensor | None, recompute: bool = False) -> Tensor:
        return self.bn(x)


class ComposedBranch(Branch):
    """``1x1_kxk``: a 1x1 conv (C -> C, grouped) then a kxk conv (DBB); the kxk may itself grow.

    In dbb mode the intermediate map is the 1x1's output on the padded input, BatchNorm included, so
    its border holds the 1x1's (BatchNorm) bias, which is DBB's pad-with-bias condition and keeps the
    merge exact. It is computed from the 1x1 on the unpadded input (see the module docstring).
    """

    kind = "1x1_kxk"

    def __init__(self, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> None:
        super().__init__(geom, mode, init_scale, like)
        mid = geom.in_channels
        self.conv1 = _init_conv(nn.Conv2d(geom.in_channels, mid, 1, 1, 0, 1, geom.groups, bias=False,
                                          device=like.device, dtype=like.dtype))
        self.conv2 = _init_conv(nn.Conv2d(mid, geom.out_channels, geom.kernel_size, geom.stride, 0,
                                          geom.dilation, geom.groups, bias=False,
                                          device=like.device, dtype=like.dtype))
        if mode == "dbb":
            self.bn1 = _new_bn(mid, 1.0, like)

    def inner_kernel(self) -> tuple[Tensor, Tensor | None]:
        """The kxk stage's equivalent kernel (a grown inner block reports its own)."""
        if hasattr(self.conv2, "equivalent"):
            return self.conv2.equivalent()
        return self.conv2.weight, None

    def raw_kernel(self) -> Tensor:
        w2, _ = self.inner_kernel()  # an online inner block has no bias
        return kernels.merge_1x1_kxk(self.conv1.weight, None, w2, None, self.geom.groups)[0]

    def inner_convs(self) -> dict[str, nn.Module]:
        return {"conv2": self.conv2}

    @classmethod
    def inner_geometries(cls, geom: ConvGeometry) -> dict[str, ConvGeometry]:
        # the kxk stage reads the padded intermediate map: the outer window, unpadded
        return {"conv2": ConvGeometry.from_conv(nn.Conv2d(
            geom.in_channels, geom.out_channels, geom.kernel_size, geom.stride, 0, geom.dilation, geom.groups,
            bias=False, device="meta"))}

    def runs_apart(self, shape: tuple[int, ...], execution: str) -> bool:
        return run_composed_as_convs(self.geom, shape, execution)

    def term(self) -> Term:
        return ComposedTerm(self.conv1.weight, self.inner_kernel()[0], self.scale, self.geom.groups)

    def dbb_kernel(self) -> tuple[Tensor, Tensor]:
        w1, b1 = fuse_with_bn(self.conv1.weight, None, self.bn1)
        w2, b2 = self.inner_kernel()
        w, b = kernels.merge_1x1_kxk(w1, b1, w2, b2, self.geom.groups)
        return fuse_with_bn(w, b, self.bn)

    def forward(self, x: Tensor, xp: Tensor | None, recompute: bool = False) -> Tensor:
        nested = hasattr(self.conv2, "equivalent")  # a grown inner block: a conv without padding of its own
        if self.mode == "dbb":
            zp = pointwise_norm(self.bn1, x, self.conv1.weight, self.geom, recompute=recompute)
            return self.bn(self.conv2(zp) if nested else self.geom.conv_valid(zp, self.conv2.weight))
        z = _pointwise(x, self.conv1.weight, self.geom.groups)
        # Online: the online block's execution on small feature maps (see dyrep_fx.execution). The branch is
        # linear, so the padding moves past the 1x1 (into the kxk conv itself, which then keeps the unpadded
        # map for backward) and ``scale`` goes on the kxk kernel or on the output, whichever is smaller
        # (on the small maps this runs on, the output often is: one pass over it instead of the kernel).
        if nested:
            return self.scale.reshape(1, -1, 1, 1) * self.conv2(self.geom.pad_input(z))
        w2 = self.conv2.weight
        ho, wo = self.geom.output_size((z.shape[-2], z.shape[-1]))
        if z.shape[0] * self.geom.out_channels * ho * wo < w2.numel():
            return self.geom.conv(z, w2, None) * self.scale.reshape(1, -1, 1, 1)
        return self.geom.conv(z, self.scale.reshape(-1, 1, 1, 1) * w2, None)


class _SpatialFilterBranch(Branch):
    """A 1x1 conv (C_in -> C_out, grouped) then a fixed per-channel filter over the window."""

    def __init__(self, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> None:
        super().__init__(geom, mode, init_scale, like)
        self.conv1 = _init_conv(nn.Conv2d(geom.in_channels, geom.out_channels, 1, 1, 0, 1, geom.groups,
                                          bias=False, device=like.device, dtype=like.dtype))
        self.register_buffer("spatial", self.make_filter(geom).to(like), persistent=False)
        if mode == "dbb":
            self.bn1 = _new_bn(geom.out_channels, 1.0, like)

    @staticmethod
    def make_filter(geom: ConvGeometry) -> Tensor:
        raise NotImplementedError

    def raw_kernel(self) -> Tensor:
        return kernels.merge_1x1_depthwise(self.conv1.weight, None, self.spatial)[0]

    def term(self) -> Term:
        return FilterTerm(self.conv1.weight, self.scale, self.spatial)

    def dbb_kernel(self) -> tuple[Tensor, Tensor]:
        w1, b1 = fuse_with_bn(self.conv1.weight, None, self.bn1)
        w, b = kernels.merge_1x1_depthwise(w1, b1, self.spatial)
        return fuse_with_bn(w, b, self.bn)

    def forward(self, x: Tensor, xp: Tensor | None, recompute: bool = False) -> Tensor:
        zp = pointwise_norm(self.bn1, x, self.conv1.weight, self.geom, recompute=recompute)
        return self.bn(fixed_filter(zp, self.spatial, self.geom))


class AvgBranch(_SpatialFilterBranch):
    """``1x1_avg``: a 1x1 conv then average pooling over the window (DBB)."""

    kind = "1x1_avg"

    @staticmethod
    def make_filter(geom: ConvGeometry) -> Tensor:
        kh, kw = geom.kernel_size
        return torch.full((geom.out_channels, kh, kw), 1.0 / (kh * kw), dtype=torch.float64)


class PriorBranch(_SpatialFilterBranch):
    """``prior``: a 1x1 conv then a fixed DCT frequency filter per channel (OREPA)."""

    kind = "prior"

    @staticmethod
    def make_filter(geom: ConvGeometry) -> Tensor:
        return kernels.frequency_prior(geom.out_channels, geom.kernel_size, dtype=torch.float64)


# -- where each kind applies ------------------------------------------------------------------------
def _needs_window(geom: ConvGeometry) -> str | None:
    kh, kw = geom.kernel_size
    return None if kh * kw > 1 else "the conv is 1x1, so this branch would duplicate the main kernel"


def _needs_both_axes(geom: ConvGeometry) -> str | None:
    kh, kw = geom.kernel_size
    return None if kh > 1 and kw > 1 else f"needs a kernel larger than 1 in both axes (has {kh}x{kw})"


def _needs_identity_tap(geom: ConvGeometry) -> str | None:
    if geom.identity_offset() is not None:
        return None
    if geom.in_channels != geom.out_channels:
        return f"in_channels {geom.in_channels} != out_channels {geom.out_channels}"
    if geom.stride != (1, 1):
        return f"stride {geom.stride} is not 1"
    return f"padding {geom.pads} and dilation {geom.dilation} shift the output against the input"


# The canonical order of these seven (10 .. 70) is the one state_dict keys and structure JSON have always had.
_DBB, _OREPA, _DYREP = "dbb", "orepa", "dyrep"
for _order, _cls, _applies, _sets in (
    (10, PointwiseBranch, _needs_window, {_DBB, _OREPA, _DYREP}),
    (20, ComposedBranch, applies_everywhere, {_DBB, _OREPA, _DYREP}),
    (30, AvgBranch, _needs_window, {_DBB, _OREPA, _DYREP}),
    (40, RowBranch, _needs_both_axes, {_DYREP}),
    (50, ColumnBranch, _needs_both_axes, {_DYREP}),
    (60, IdentityBranch, _needs_identity_tap, {_DYREP}),
    (70, PriorBranch, _needs_window, {_OREPA}),
):
    register_kind(BranchKind(_cls.kind, _cls, _applies, _order, frozenset(_sets)))

#: The library's first seven branch classes by kind (every kind, user kinds included: :mod:`dyrep_fx.kinds`).
BRANCH_CLASSES: dict[str, type[Branch]] = {
    cls.kind: cls
    for cls in (PointwiseBranch, ComposedBranch, AvgBranch, RowBranch, ColumnBranch, IdentityBranch, PriorBranch)
}


def make_branch(kind: str, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> Branch:
    """Build a new, randomly initialised branch of ``kind`` for a block of geometry ``geom``."""
    return get_kind(kind).make(geom, mode, init_scale, like)
