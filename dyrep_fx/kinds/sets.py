"""The named kind sets, and which kinds apply to a conv geometry.

``BRANCH_KINDS`` is every kind registered when it is read, in canonical order; ``DBB_KINDS`` DBB's branch
set beside the kxk kernel (the static baseline DyRep compares to); ``OREPA_KINDS`` OREPA's linear set
(DBB's plus the frequency prior); ``DYREP_KINDS`` what ``DyRep`` grows (DyRep's DBB variant, the main kxk
being the block's own kernel; OREPA's ``prior`` is opt-in through ``kinds=``); ``LARGE_KERNEL_KINDS`` the
RepLKNet / UniRepLKNet / MobileOne kinds, which only large depthwise kernels take (``grow()``'s default
includes them there; DyRep through ``kinds=DYREP_KINDS + LARGE_KERNEL_KINDS``). Each is read from the
registry when asked for (a module attribute computed on access), so it holds the kinds registered by then.
"""

from __future__ import annotations

from ..geometry import ConvGeometry
from .registry import get_kind, kind_names, kinds_in

__all__ = ["BRANCH_KINDS", "DBB_KINDS", "OREPA_KINDS", "DYREP_KINDS",  # noqa: F822 (see __getattr__)
           "LARGE_KERNEL_KINDS", "applicable_kinds", "inapplicable_kinds"]

#: Each named tuple and the set it reads (``None``: every kind).
SET_NAMES = {"BRANCH_KINDS": None, "DBB_KINDS": "dbb", "OREPA_KINDS": "orepa", "DYREP_KINDS": "dyrep",
             "LARGE_KERNEL_KINDS": "large_kernel"}


def __getattr__(name: str) -> tuple[str, ...]:
    # (computed on access, so that a kind registered later is in BRANCH_KINDS)
    if name not in SET_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    set_name = SET_NAMES[name]
    return kind_names() if set_name is None else kinds_in(set_name)


def applicable_kinds(geometry: ConvGeometry) -> list[str]:
    """The registered kinds that can be made exact for a conv of ``geometry``, in canonical order."""
    return [name for name in kind_names() if get_kind(name).applies(geometry) is None]


def inapplicable_kinds(geometry: ConvGeometry) -> dict[str, str]:
    """The registered kinds that cannot be made exact for a conv of ``geometry``, each with the reason."""
    reasons = {name: get_kind(name).applies(geometry) for name in kind_names()}
    return {name: why for name, why in reasons.items() if why is not None}
