"""The branch kinds a :class:`~dyrep_fx.block.RepConv2d` can carry beside its main kernel.

Each branch is a small module that knows two things about itself:

* ``kernel()``: its exact equivalent ``(W, b)`` in the block's own ``kh x kw`` window (eval mode);
* ``forward(x, xp)``: the feature-map computation used in ``dbb`` mode, on the block input ``x``
  and the block's explicitly padded input ``xp`` (``1x1_kxk`` also in online mode, see
  :mod:`dyrep_fx.execution`).

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
from .geometry import ConvGeometry

__all__ = ["Branch", "make_branch", "BRANCH_CLASSES"]


def _init_conv(conv: nn.Conv2d) -> nn.Conv2d:
    # He-normal, fan-out, as DyRep initialises new branches.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _new_bn(channels: int, gamma: float, like: Tensor) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        bn.weight.fill_(gamma)
    return bn


def _fuse(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    return kernels.fuse_bn(weight, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


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
        w, b = _fuse(self.conv.weight, None, self.bn)
        return kernels.embed_kernel(w, self.geom.kernel_size, self.offset), b

    def term(self) -> Term:
        return WindowTerm(self.conv.weight, self.scale, self.offset)

    def forward(self, x: Tensor, xp: Tensor) -> Tensor:
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
        return _fuse(self.eye, None, self.bn)

    def term(self) -> Term:
        (r, c) = self.offset
        return WindowTerm(self.eye[:, :, r:r + 1, c:c + 1], self.scale, self.offset)

    def forward(self, x: Tensor, xp: Tensor) -> Tensor:
        return self.bn(x)


class ComposedBranch(Branch):
    """``1x1_kxk``: a 1x1 conv (C -> C, grouped) then a kxk conv (DBB); the kxk may itself grow.

    In dbb mode the 1x1 runs on the padded input, so the intermediate map's border holds the 1x1's
    (BatchNorm) bias, which is DBB's pad-with-bias condition and keeps the merge exact.
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

    def term(self) -> Term:
        return ComposedTerm(self.conv1.weight, self.inner_kernel()[0], self.scale, self.geom.groups)

    def dbb_kernel(self) -> tuple[Tensor, Tensor]:
        w1, b1 = _fuse(self.conv1.weight, None, self.bn1)
        w2, b2 = self.inner_kernel()
        w, b = kernels.merge_1x1_kxk(w1, b1, w2, b2, self.geom.groups)
        return _fuse(w, b, self.bn)

    def forward(self, x: Tensor, xp: Tensor) -> Tensor:
        # Also the online block's execution on small feature maps (see dyrep_fx.execution): there the branch
        # is linear, so the 1x1 commutes with any padding mode and ``scale`` goes on the kxk kernel.
        z = nn.functional.conv2d(xp, self.conv1.weight, None, 1, 0, 1, self.geom.groups)
        if self.mode == "dbb":
            z = self.bn1(z)
        if hasattr(self.conv2, "equivalent"):
            y = self.conv2(z)
            return self.bn(y) if self.mode == "dbb" else self.scale.reshape(1, -1, 1, 1) * y
        if self.mode == "dbb":
            return self.bn(self.geom.conv_valid(z, self.conv2.weight))
        return self.geom.conv_valid(z, self.scale.reshape(-1, 1, 1, 1) * self.conv2.weight)


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
        w1, b1 = _fuse(self.conv1.weight, None, self.bn1)
        w, b = kernels.merge_1x1_depthwise(w1, b1, self.spatial)
        return _fuse(w, b, self.bn)

    def forward(self, x: Tensor, xp: Tensor) -> Tensor:
        z = self.bn1(nn.functional.conv2d(xp, self.conv1.weight, None, 1, 0, 1, self.geom.groups))
        return self.bn(self.geom.conv_valid(z, self.spatial.unsqueeze(1), groups=self.geom.out_channels))


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


BRANCH_CLASSES: dict[str, type[Branch]] = {
    cls.kind: cls
    for cls in (PointwiseBranch, ComposedBranch, AvgBranch, RowBranch, ColumnBranch, IdentityBranch, PriorBranch)
}


def make_branch(kind: str, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> Branch:
    """Build a new, randomly initialised branch of ``kind`` for a block of geometry ``geom``."""
    return BRANCH_CLASSES[kind](geom, mode, init_scale, like)
