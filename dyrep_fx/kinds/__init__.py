"""Branch kinds: the registry (:mod:`dyrep_fx.kinds.registry`) and the library's large-kernel kinds.

A kind is defined in one place and registered; see :mod:`dyrep_fx.kinds.registry` for what a kind holds
and :mod:`dyrep_fx.kinds.builtin` for the library's own.
"""

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

__all__ = ["KIND_SETS", "BranchKind", "applies_everywhere", "get_kind", "kind_names", "kinds_in", "register_kind",
           "unregister_kind"]
