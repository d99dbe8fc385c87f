"""``prior``: a 1x1 conv then a fixed DCT frequency filter per channel (OREPA's frequency prior)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from ..geometry import ConvGeometry
from .applies import needs_window
from .filtered import FilteredBranch
from .registry import BranchKind, register_kind

__all__ = ["PriorBranch", "KIND"]


class PriorBranch(FilteredBranch):
    """``prior``: the fixed filter is a DCT basis function per channel."""

    kind = "prior"

    @staticmethod
    def make_filter(geom: ConvGeometry) -> Tensor:
        return kernels.frequency_prior(geom.out_channels, geom.kernel_size, dtype=torch.float64)


#: OREPA's (DyRep's only through ``kinds=``).
KIND = register_kind(BranchKind(PriorBranch.kind, PriorBranch, needs_window, 70, frozenset({"orepa"})))
