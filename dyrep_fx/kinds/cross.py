"""``cross``: ACNet's asymmetric pair as one branch, a 1 x kw conv on the window's centre row and a kh x 1 conv
on its centre column, summed (then one BatchNorm in dbb mode), whose kernel is a cross in the window.

Opt-in: the library does not register it, so no default set, ``grow()``'s default or canonical order
changes; register it as any user kind, ``register_kind(dyrep_fx.kinds.cross.KIND)``. It comes after the
library's kinds then.

Online, the pair is one term of its own shape, :class:`CrossTerm`: two sub-windows under one per-channel
scale, so the scale's gradient is one sum over both and the branch joins the block's one kernel like any
other. (The pair as two ``1xk`` / ``kx1`` branches would carry two scales and two importances.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import Tensor, nn

from .. import kernels
from ..assembly import Term, channel_dot, per_channel, scaled
from ..dbb_ops import window_conv
from ..geometry import ConvGeometry
from .applies import needs_both_axes
from .branch import Branch, fuse_with_bn, init_conv
from .registry import BranchKind

__all__ = ["CrossBranch", "CrossTerm", "KIND"]


@dataclasses.dataclass(frozen=True)
class CrossTerm(Term):
    """``scale[o] * (row at (centre[0], 0) + column at (0, centre[1]))``: ``row`` is ``[O, I, 1, kw]``,
    ``column`` ``[O, I, kh, 1]``; backward reads only the centre row and column of the kernel's gradient."""

    row: Tensor
    column: Tensor
    scale: Tensor
    centre: tuple[int, int]

    tensors_of = ("row", "column", "scale")

    def _row_of(self, kernel: Tensor) -> Tensor:
        r = self.centre[0]
        return kernel[:, :, r:r + 1, :]

    def _column_of(self, kernel: Tensor) -> Tensor:
        c = self.centre[1]
        return kernel[:, :, :, c:c + 1]

    def add_to(self, kernel: Tensor) -> None:
        self._row_of(kernel).addcmul_(per_channel(self.scale), self.row)
        self._column_of(kernel).addcmul_(per_channel(self.scale), self.column)

    def grads(self, grad: Tensor, wanted: Sequence[bool]) -> list[Tensor | None]:
        g_row, g_column = self._row_of(grad), self._column_of(grad)
        return [scaled(g_row, self.scale, self.row) if wanted[0] else None,
                scaled(g_column, self.scale, self.column) if wanted[1] else None,
                channel_dot(g_row, self.row) + channel_dot(g_column, self.column) if wanted[2] else None]


class CrossBranch(Branch):
    """``cross``: a centred row conv and a centred column conv of the window, summed."""

    kind = "cross"

    def __init__(self, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> None:
        super().__init__(geom, mode, init_scale, like)
        kh, kw = geom.kernel_size
        self.sizes = ((1, kw), (kh, 1))
        self.row, self.column = (init_conv(nn.Conv2d(geom.in_channels, geom.out_channels, size, geom.stride, 0,
                                                     geom.dilation, geom.groups, bias=False, device=like.device,
                                                     dtype=like.dtype)) for size in self.sizes)
        self.offsets = tuple(geom.centre(size) for size in self.sizes)

    def raw_kernel(self) -> Tensor:
        size = self.geom.kernel_size
        return (kernels.embed_kernel(self.row.weight, size, self.offsets[0])
                + kernels.embed_kernel(self.column.weight, size, self.offsets[1]))

    def term(self) -> Term:
        # the row sits at the centre row (column 0), the column at the centre column (row 0)
        return CrossTerm(self.row.weight, self.column.weight, self.scale, (self.offsets[0][0], self.offsets[1][1]))

    def dbb_kernel(self) -> tuple[Tensor, Tensor]:
        return fuse_with_bn(self.raw_kernel(), None, self.bn)

    def forward(self, x: Tensor, xp: Tensor | None, recompute: bool = False) -> Tensor:
        out = None
        for conv, size, offset in zip((self.row, self.column), self.sizes, self.offsets):
            if xp is None:
                y = window_conv(self.geom, x, conv.weight, size, offset)
            else:
                y = self.geom.conv_valid(self.geom.window(xp, size, offset), conv.weight)
            out = y if out is None else out + y
        return self.bn(out)


#: The kind, not registered: ``register_kind(KIND)`` adds it (after the library's kinds).
KIND = BranchKind(CrossBranch.kind, CrossBranch, needs_both_axes)
