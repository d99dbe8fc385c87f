"""``1x1``: a 1x1 conv at the centre tap of the window (DBB)."""

from __future__ import annotations

from ..geometry import ConvGeometry
from .applies import needs_window
from .registry import BranchKind, register_kind
from .sub_window import SubWindowBranch

__all__ = ["PointwiseBranch", "KIND"]


class PointwiseBranch(SubWindowBranch):
    """``1x1``: a 1x1 conv at the centre tap of the window."""

    kind = "1x1"

    @staticmethod
    def window_size(geom: ConvGeometry) -> tuple[int, int]:
        return (1, 1)


#: DBB's, OREPA's and DyRep's; first in the canonical order.
KIND = register_kind(BranchKind(PointwiseBranch.kind, PointwiseBranch, needs_window, 10,
                                frozenset({"dbb", "orepa", "dyrep"})))
