"""Names across a model's targets: the DyRep controller trains one or several submodules of a model (its
*targets*, e.g. a detector's ``backbone``, ``neck`` and ``bbox_head``), each known by its prefix, the
qualified name of the submodule in the model (``""`` for the whole model). Sites and blocks are named
model-relative in plans, history and checkpoints, and target-relative inside each target's handle.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["join_name", "split_name"]


def join_name(prefix: str, name: str) -> str:
    """The model-relative name of ``name`` inside target ``prefix`` (``""`` is the whole model)."""
    return f"{prefix}.{name}" if prefix else name


def split_name(prefixes: Iterable[str], name: str) -> tuple[str, str]:
    """``(target prefix, name inside it)`` of a model-relative ``name``; the innermost target wins.

    Raises ``KeyError`` naming ``name`` and the targets when it lies in none of them.
    """
    prefixes = list(prefixes)
    for prefix in sorted(prefixes, key=len, reverse=True):
        if not prefix:
            return "", name
        if name.startswith(prefix + "."):
            return prefix, name[len(prefix) + 1:]
    raise KeyError(f"{name!r} is in none of the targets {prefixes}")
