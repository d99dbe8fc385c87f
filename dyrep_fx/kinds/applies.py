"""Where kinds apply: the conditions on a conv's geometry that several kinds share.

Each returns ``None`` where a kind can be made exact for the geometry, else the reason it cannot (a kind's
``applies``, see :class:`~dyrep_fx.kinds.registry.BranchKind`).
"""

from __future__ import annotations

from ..geometry import ConvGeometry

__all__ = ["needs_window", "needs_both_axes"]


def needs_window(geom: ConvGeometry) -> str | None:
    """A window of more than one tap: on a 1x1 conv the branch would duplicate the main kernel."""
    kh, kw = geom.kernel_size
    return None if kh * kw > 1 else "the conv is 1x1, so this branch would duplicate the main kernel"


def needs_both_axes(geom: ConvGeometry) -> str | None:
    """A kernel larger than 1 in both axes: a row or a column of it is then no copy of the kernel."""
    kh, kw = geom.kernel_size
    return None if kh > 1 and kw > 1 else f"needs a kernel larger than 1 in both axes (has {kh}x{kw})"
