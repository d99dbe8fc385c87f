"""``dilated_kxk``: dilated small kernels whose footprints fit the large kernel (UniRepLKNet's Dilated Reparam
Block: e.g. 3x3 with dilation 2 and 3 beside a 7x7), each exactly a zero-inserted kernel centred in it.

Where it applies: large depthwise kernels (:func:`~dyrep_fx.kinds.window.large_depthwise`). Its convs are
UniRepLKNet's settings for the kernel size without the undilated one (that is ``small_kxk``'s); a kernel
between two settings takes the smaller one, beyond 17 the one of 17 (every footprint fits).
"""

from __future__ import annotations

from ..geometry import ConvGeometry
from .registry import BranchKind, register_kind
from .window import SummedWindowBranch, large_depthwise

__all__ = ["DilatedBranch", "DILATED_SETTINGS", "dilated_specs"]

#: Kernel size -> the ``(size, dilation)`` of its dilated branches (UniRepLKNet's settings, dilation >= 2).
DILATED_SETTINGS: dict[int, tuple[tuple[int, int], ...]] = {
    5: ((3, 2),),
    7: ((3, 2), (3, 3)),
    9: ((5, 2), (3, 3), (3, 4)),
    11: ((5, 2), (3, 3), (3, 4), (3, 5)),
    13: ((7, 2), (3, 3), (3, 4), (3, 5)),
    15: ((7, 2), (3, 3), (3, 5), (3, 7)),
    17: ((9, 2), (3, 4), (3, 5), (3, 7)),
}


def dilated_specs(geom: ConvGeometry) -> list[tuple[int, int]]:
    """The dilated convs beside ``geom``'s kernel: the setting of the largest listed size that fits."""
    size = max(k for k in DILATED_SETTINGS if k <= geom.kernel_size[0])
    return list(DILATED_SETTINGS[size])


class DilatedBranch(SummedWindowBranch):
    """``dilated_kxk``: the sum of :func:`dilated_specs`' dilated convs (then a BatchNorm in dbb mode)."""

    kind = "dilated_kxk"
    specs_of = staticmethod(dilated_specs)


register_kind(BranchKind(DilatedBranch.kind, DilatedBranch, large_depthwise, 90,
                         frozenset({"large_kernel"})))
