"""The contract shared by every pass: a report out, and module surgery that can be undone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["PassReport", "PassError", "get_module", "set_module", "Transaction"]


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
    """Records module replacements and parameter values so that a failed pass can undo them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._modules: list[tuple[str, nn.Module]] = []
        self._tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._dicts: list[tuple[nn.Module, dict, dict, dict]] = []

    def replace(self, name: str, module: nn.Module) -> None:
        """Replace the module at ``name``, remembering the old one (only once the replacement took)."""
        old = get_module(self.model, name)
        set_module(self.model, name, module)
        self._modules.append((name, old))

    def record_replacement(self, name: str, old: nn.Module) -> None:
        """Note that the module at ``name`` was replaced by other code; rollback puts ``old`` back."""
        self._modules.append((name, old))

    def save(self, module: nn.Module) -> None:
        """Remember ``module``'s tree (which parameters, buffers, children) and every tensor's value."""
        for m in module.modules():
            self._dicts.append((m, dict(m._parameters), dict(m._buffers), dict(m._modules)))
        for t in list(module.parameters()) + list(module.buffers()):
            self._tensors.append((t, t.detach().clone()))

    @torch.no_grad()
    def rollback(self) -> None:
        """Undo: old values back into saved tensors, old modules back at their names."""
        for m, params, buffers, children in reversed(self._dicts):
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
            m._modules.clear()
            m._modules.update(children)
        for t, value in reversed(self._tensors):
            t.copy_(value)
        errors = []
        for name, module in reversed(self._modules):
            try:
                set_module(self.model, name, module)
            except Exception as exc:  # keep restoring the others, then report
                errors.append(f"{name}: {exc}")
        if errors:
            raise PassError("could not put back every module: " + "; ".join(errors))
