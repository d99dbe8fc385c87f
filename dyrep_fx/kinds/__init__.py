"""Branch kinds: the registry (:mod:`dyrep_fx.kinds.registry`), the library's kinds (one module each), the
named kind sets and which kinds apply where (:mod:`dyrep_fx.kinds.sets`).

Importing this package registers the library's kinds (each module registers its own kind), in the
canonical order their ``order`` gives. A kind defined elsewhere registers with :func:`register_kind`.
"""

# (each library kind registers itself when its module is imported)
from . import avg, column, composed, dilated, identity, parallel, pointwise, prior, row, sets, small_kernel  # noqa: F401
from .registry import (
    KIND_SETS,
    BranchKind,
    applies_everywhere,
    get_kind,
    kind_names,
    kinds_in,
    register_kind,
    unregister_kind,
)
from .sets import applicable_kinds, inapplicable_kinds

__all__ = ["KIND_SETS", "BranchKind", "applies_everywhere", "get_kind", "kind_names", "kinds_in", "register_kind",
           "unregister_kind", "applicable_kinds", "inapplicable_kinds", "BRANCH_KINDS", "DBB_KINDS",  # noqa: F822
           "OREPA_KINDS", "DYREP_KINDS", "LARGE_KERNEL_KINDS"]


def __getattr__(name: str) -> tuple[str, ...]:
    # (the named kind sets, read from the registry on access: see dyrep_fx.kinds.sets)
    if name not in sets.SET_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(sets, name)
