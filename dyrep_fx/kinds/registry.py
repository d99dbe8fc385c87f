"""The branch-kind registry: every kind a :class:`~dyrep_fx.block.RepConv2d` can grow, defined once.

A kind is a :class:`BranchKind`: its name (the key of its branch in ``block.branches``, hence in state_dict
keys and structure JSON), where it applies (``applies(geometry)``: ``None`` or the reason it does not), its
module (a :class:`~dyrep_fx.kinds.branch.Branch` subclass, which also holds its online term, its dbb-mode
forward and its nested convs), its place in the canonical order and the named default sets it joins.
Nothing else in the library names a kind by string: blocks, geometry, structure specs and the controller
read this registry.

Each of the library's kinds registers itself in its own module of :mod:`dyrep_fx.kinds`, and the package
imports them all, so the registry is complete once ``dyrep_fx.kinds`` is imported (importing this module
imports its package first). A user kind is one :func:`register_kind` call; :func:`unregister_kind` takes it
away again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from ..geometry import ConvGeometry
from .branch import Branch

__all__ = ["BranchKind", "applies_everywhere", "register_kind", "unregister_kind", "get_kind", "kind_names", "kinds_in", "KIND_SETS"]

#: The named default sets a kind can join (see :func:`kinds_in`).
KIND_SETS = ("dbb", "orepa", "dyrep", "large_kernel")


def applies_everywhere(geometry: ConvGeometry) -> str | None:
    """Where a kind applies to every conv geometry: never a reason."""
    return None


@dataclass(frozen=True)
class BranchKind:
    """One branch kind.

    Args:
        name: the kind's name, also its branch's key in ``block.branches``.
        branch: the branch module class, built as ``branch(geometry, mode, init_scale, like)``.
        applies: ``None`` where the kind can be made exact for a conv geometry, else the reason it cannot.
        order: position in the canonical order (blocks build and report kinds by it; ties: registration).
        sets: the named default sets (:data:`KIND_SETS`) the kind belongs to.
    """

    name: str
    branch: type[Branch]
    applies: Callable[[ConvGeometry], str | None] = applies_everywhere
    order: float = math.inf
    sets: frozenset[str] = field(default_factory=frozenset)

    def make(self, geometry: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> Branch:
        """A new, randomly initialised branch of this kind for a block of ``geometry``."""
        return self.branch(geometry, mode, init_scale, like)

    def nested(self, geometry: ConvGeometry) -> dict[str, ConvGeometry]:
        """The geometries of the kind's growable inner convs, by path relative to its branch."""
        return self.branch.inner_geometries(geometry)


_KINDS: dict[str, BranchKind] = {}
_SEQUENCE: dict[str, int] = {}


def register_kind(kind: BranchKind) -> BranchKind:
    """Add ``kind`` to the registry (refusing a name taken by another kind); returns it.

    Registering the very same kind again changes nothing (a module imported twice)."""
    if not kind.name or "." in kind.name:
        raise ValueError(f"a kind name must be non-empty and free of '.', got {kind.name!r}")
    unknown = set(kind.sets) - set(KIND_SETS)
    if unknown:
        raise ValueError(f"kind {kind.name!r} joins unknown sets {sorted(unknown)}; the sets are {KIND_SETS}")
    known = _KINDS.get(kind.name)
    if known is not None and known != kind:
        raise ValueError(f"a branch kind named {kind.name!r} is already registered")
    if getattr(kind.branch, "kind", kind.name) != kind.name:
        raise ValueError(f"kind {kind.name!r} builds {kind.branch.__name__}, whose kind is {kind.branch.kind!r}")
    _SEQUENCE.setdefault(kind.name, len(_SEQUENCE))
    _KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove the kind ``name`` (blocks that carry it keep their branches, but cannot grow or restore it)."""
    _KINDS.pop(name, None)
    _SEQUENCE.pop(name, None)


def _ordered() -> list[BranchKind]:
    return sorted(_KINDS.values(), key=lambda k: (k.order, _SEQUENCE[k.name]))


def kind_names() -> tuple[str, ...]:
    """Every registered kind, in canonical order."""
    return tuple(k.name for k in _ordered())


def kinds_in(set_name: str) -> tuple[str, ...]:
    """The registered kinds of the default set ``set_name`` (one of :data:`KIND_SETS`), in canonical order."""
    if set_name not in KIND_SETS:
        raise ValueError(f"unknown kind set {set_name!r}; the sets are {KIND_SETS}")
    return tuple(k.name for k in _ordered() if set_name in k.sets)


def get_kind(name: str) -> BranchKind:
    """The kind ``name``; ``KeyError`` naming the registered kinds when there is none."""
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"unknown branch kind {name!r}; kinds are {list(kind_names())}") from None
