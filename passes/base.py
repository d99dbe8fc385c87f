"""The contract shared by every pass: a report out, and module surgery that can be undone (:class:`Transaction`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["PassReport", "PassError", "get_module", "set_module", "Transaction", "transaction_for"]


class PassError(ValueError):
    """A pass refused its input; the message names the module and what to do."""


#: How each pass's changes read in prose (``str(report)`` and logs only; callers read the data).
VERBS = {"rep": "grew", "dep": "cut", "fold": "folded", "fuse_bn": "absorbed", "analysis": "eligible"}


@dataclass
class PassReport:
    """What a pass changed and what it skipped, with the reason for each skip.

    ``changed`` is data: ``{module name: items}``, the branch kinds grown (rep), cut (dep) or folded
    (fold; empty for a block without branches), or the BatchNorm absorbed (fuse_bn). Prose is made
    only by :meth:`describe` and ``str()``.
    """

    name: str
    changed: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self, module: str) -> str:
        """One change in words, e.g. ``"grew 1x1, prior"``."""
        items = self.changed[module]
        return f"{VERBS.get(self.name, self.name)} {', '.join(items) if items else 'nothing'}"

    def __str__(self) -> str:
        lines = [f"{self.name}: {len(self.changed)} changed, {len(self.skipped)} skipped"]
        lines += [f"  {k}: {self.describe(k)}" for k in self.changed]
        lines += [f"  skipped {k}: {v}" for k, v in self.skipped.items()]
        return "\n".join(lines)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at qualified ``name`` ("" is the model), with an error naming what is missing."""
    try:
        return model.get_submodule(name) if name else model
    except AttributeError as exc:
        raise PassError(f"{type(model).__name__} has no submodule {name!r}") from exc


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at qualified ``name`` (works inside Sequential, ModuleList and ModuleDict)."""
    parent_name, _, attr = name.rpartition(".")
    parent = get_module(model, parent_name)
    setattr(parent, attr, module)


class Transaction:
    """Undo records for module surgery: module replacements, module trees and tensor values, and any
    other state a caller registers (an optimizer's groups, a policy's records).

    Use it as a context manager: leaving the block with an exception rolls every recorded change back, in
    reverse order, and re-raises; leaving it normally keeps the changes.

        with Transaction(model) as txn:
            txn.save(block)
            block.cut(kinds)

    Changes of another model (an EMA copy) join the same all-or-nothing unit through :meth:`child`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # One stack, undone last-first: a replacement and the saves around it undo in the right order.
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc_type is not None:
            self.rollback()  # a rollback failure is raised with the original error as its context
        return False

    def replace(self, name: str, module: nn.Module) -> None:
        """Replace the module at ``name``, remembering the old one (only once the replacement took)."""
        old = get_module(self.model, name)
        set_module(self.model, name, module)
        self.record_replacement(name, old)

    def record_replacement(self, name: str, old: nn.Module) -> None:
        """Note that the module at ``name`` was replaced by other code; rollback puts ``old`` back."""
        self._undo.append(lambda: set_module(self.model, name, old))

    def save(self, module: nn.Module) -> None:
        """Remember ``module``'s tree (which parameters, buffers, children) and every tensor's value."""
        trees = [(m, dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in module.modules()]
        values = [(t, t.detach().clone()) for t in list(module.parameters()) + list(module.buffers())]
        self._undo.append(lambda: _put_back(trees, values))

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` if the transaction rolls back (in reverse order with every other record)."""
        self._undo.append(undo)

    def child(self, model: nn.Module) -> Transaction:
        """A transaction over another model that rolls back with this one (e.g. an EMA copy's changes)."""
        child = Transaction(model)
        self.on_rollback(child.rollback)
        return child

    @torch.no_grad()
    def rollback(self) -> None:
        """Undo every record, last first; the records are then spent (a second rollback does nothing).

        Every record is undone even when one fails; the failures are then raised together.
        """
        errors = []
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:  # keep restoring the others, then report
                errors.append(str(exc))
        if errors:
            raise PassError("could not undo every change: " + "; ".join(errors))


def transaction_for(model: nn.Module, txn: Transaction | None = None) -> AbstractContextManager[Transaction]:
    """The context a pass rewrites ``model`` in: the caller's ``txn`` (left open: its owner decides about
    the rollback, and records nothing twice), or a transaction of the pass's own over ``model``."""
    return Transaction(model) if txn is None else nullcontext(txn)


@torch.no_grad()
def _put_back(trees: list[tuple[nn.Module, dict, dict, dict]],
              values: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Each module's saved parameters, buffers and children, then each tensor's saved value."""
    for m, params, buffers, children in trees:
        m._parameters.clear()
        m._parameters.update(params)
        m._buffers.clear()
        m._buffers.update(buffers)
        m._modules.clear()
        m._modules.update(children)
    for t, value in values:
        t.copy_(value)
