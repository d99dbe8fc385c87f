"""``1x1_avg``: a 1x1 conv then average pooling over the window (DBB)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..geometry import ConvGeometry
from .applies import needs_window
from .filtered import FilteredBranch
from .registry import BranchKind, register_kind

__all__ = ["AvgBranch", "KIND"]


class AvgBranch(FilteredBranch):
    """``1x1_avg``: the fixed filter is the window's average."""

    kind = "1x1_avg"

    @staticmethod
    def make_filter(geom: ConvGeometry) -> Tensor:
        kh, kw = geom.kernel_size
        return torch.full((geom.out_channels, kh, kw), 1.0 / (kh * kw), dtype=torch.float64)


#: DBB's, OREPA's and DyRep's.
KIND = register_kind(BranchKind(AvgBranch.kind, AvgBranch, needs_window, 30, frozenset({"dbb", "orepa", "dyrep"})))
