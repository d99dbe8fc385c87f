"""``small_kxk``: a smaller square kernel centred in a large one (RepLKNet: 5x5 beside 31x31; 3x3 beside
ConvNeXt's 7x7 depthwise).

Where it applies: large depthwise kernels (:func:`~dyrep_fx.kinds.window.large_depthwise`). Its size by
default: 5 beside kernels of 9 taps or more (RepLKNet's 5x5, UniRepLKNet's undilated 5x5), 3 beside 5 and
7. :func:`small_kernel_kind` builds the kind for any odd size that fits, to register under another name.
"""

from __future__ import annotations

from ..geometry import ConvGeometry
from .registry import BranchKind, register_kind
from .window import SummedWindowBranch, large_depthwise, with_specs

__all__ = ["SmallKernelBranch", "small_kernel_kind", "default_size"]


def default_size(geom: ConvGeometry) -> int:
    """The small kernel's size beside ``geom``'s kernel: 5 from 9 taps on, else 3."""
    return 5 if min(geom.kernel_size) >= 9 else 3


class SmallKernelBranch(SummedWindowBranch):
    """``small_kxk``: one k x k conv at the centre of the window (a conv + BatchNorm in dbb mode)."""

    kind = "small_kxk"
    specs_of = staticmethod(lambda geom: [(default_size(geom), 1)])


def _fits(size: int | None):
    def applies(geom: ConvGeometry) -> str | None:
        why = large_depthwise(geom)
        if why is not None or size is None:
            return why
        big = geom.kernel_size[0]
        return None if size % 2 == 1 and 1 < size < big else f"a {size}x{size} kernel is no odd smaller kernel in {big}x{big}"
    return applies


def small_kernel_kind(size: int | None = None, name: str = "small_kxk", order: float = 80) -> BranchKind:
    """The small-kernel kind of ``size`` (odd, smaller than the kernel; ``None``: :func:`default_size`)."""
    if size is None and name == SmallKernelBranch.kind:
        return BranchKind(name, SmallKernelBranch, _fits(None), order, frozenset({"large_kernel"}))
    if size is not None and (size % 2 == 0 or size < 3):
        raise ValueError(f"a small kernel's size must be odd and at least 3, got {size}")
    branch = with_specs(SmallKernelBranch, name, lambda geom: [(size or default_size(geom), 1)])
    return BranchKind(name, branch, _fits(size), order)


register_kind(small_kernel_kind())
