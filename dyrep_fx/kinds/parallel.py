"""``parallel_kxk``: MobileOne's over-parameterized parallel branches, ``COPIES`` more convs of the block's
own kernel size beside its main kernel (with it, MobileOne-S0's factor of 4).

Where it applies: large depthwise kernels (:func:`~dyrep_fx.kinds.window.large_depthwise`; MobileOne's own
3x3 depthwise stage takes it through :func:`parallel_kind`). The copies sum to one kernel; the branch scales
the sum (online) or normalises it with one BatchNorm (dbb mode, where MobileOne has one per copy: here the
branch's ``gamma`` is its importance, as for every kind).
"""

from __future__ import annotations

from ..geometry import ConvGeometry
from .registry import BranchKind, applies_everywhere, register_kind
from .window import SummedWindowBranch, large_depthwise, with_specs

__all__ = ["ParallelBranch", "COPIES", "parallel_kind"]

#: Parallel copies beside the main kernel.
COPIES = 3


class ParallelBranch(SummedWindowBranch):
    """``parallel_kxk``: :data:`COPIES` convs of the full window, summed."""

    kind = "parallel_kxk"
    specs_of = staticmethod(lambda geom: [(geom.kernel_size[0], 1)] * COPIES)


def parallel_kind(copies: int, name: str, anywhere: bool = False, order: float = 100) -> BranchKind:
    """A parallel kind of ``copies`` convs; ``anywhere``: on every square odd kernel, not only large
    depthwise ones."""
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    branch = with_specs(ParallelBranch, name, lambda geom: [(geom.kernel_size[0], 1)] * copies)
    return BranchKind(name, branch, _square_odd if anywhere else large_depthwise, order)


def _square_odd(geom: ConvGeometry) -> str | None:
    kh, kw = geom.kernel_size
    return applies_everywhere(geom) if kh == kw and kh % 2 else f"needs a square odd kernel (has {kh}x{kw})"


register_kind(BranchKind(ParallelBranch.kind, ParallelBranch, large_depthwise, 100,
                         frozenset({"large_kernel"})))
