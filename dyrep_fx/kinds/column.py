"""``kx1``: a kh x 1 conv on the centre column of the window (ACNet)."""

from __future__ import annotations

from ..geometry import ConvGeometry
from .applies import needs_both_axes
from .registry import BranchKind, register_kind
from .sub_window import SubWindowBranch

__all__ = ["ColumnBranch", "KIND"]


class ColumnBranch(SubWindowBranch):
    """``kx1``: a kh x 1 conv on the centre column of the window."""

    kind = "kx1"

    @staticmethod
    def window_size(geom: ConvGeometry) -> tuple[int, int]:
        return (geom.kernel_size[0], 1)


#: DyRep's.
KIND = register_kind(BranchKind(ColumnBranch.kind, ColumnBranch, needs_both_axes, 50, frozenset({"dyrep"})))
