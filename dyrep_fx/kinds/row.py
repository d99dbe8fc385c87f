"""``1xk``: a 1 x kw conv on the centre row of the window (ACNet)."""

from __future__ import annotations

from ..geometry import ConvGeometry
from .applies import needs_both_axes
from .registry import BranchKind, register_kind
from .sub_window import SubWindowBranch

__all__ = ["RowBranch", "KIND"]


class RowBranch(SubWindowBranch):
    """``1xk``: a 1 x kw conv on the centre row of the window."""

    kind = "1xk"

    @staticmethod
    def window_size(geom: ConvGeometry) -> tuple[int, int]:
        return (1, geom.kernel_size[1])


#: DyRep's.
KIND = register_kind(BranchKind(RowBranch.kind, RowBranch, needs_both_axes, 40, frozenset({"dyrep"})))
