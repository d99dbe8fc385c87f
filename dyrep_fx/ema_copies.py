"""EMA copies of a DyRep-trained model, kept in step with every structure change.

An EMA copy (``AveragedModel(model).module``, mmengine's ``EMAHook`` model) has the live model's
architecture but its own averaged values. :class:`EmaCopies` gives each copy the live model's growth
(new branches start from the live values; the copy's main kernels are re-balanced so its function is
unchanged), its cuts (absorbing the copy's own averaged values) and any restored structure, each change
recorded in the caller's :class:`~dyrep_fx.passes.base.Transaction` so that a failed step leaves the
copies as they were.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .block import RepConv2d, main_parameters
from .distributed import broadcast_module
from .handle import Handle
from .passes.base import Transaction
from .target_names import split_name

__all__ = ["EmaCopies", "restore_targets"]


def restore_targets(handles: dict[str, Handle], structures: dict[str, dict[str, Any]], txn: Transaction) -> None:
    """Rebuild each target's checked structure on its handle, recording every change in ``txn`` (a
    transaction over the model the handles belong to)."""
    for prefix, spec in structures.items():
        handles[prefix].restore(spec, txn, prefix)


class EmaCopies:
    """The EMA copies of a model whose targets are ``targets`` (the live handles, by prefix)."""

    def __init__(self, targets: dict[str, Handle]) -> None:
        self.targets = targets
        self.modules: list[nn.Module] = []

    def handles(self, ema: nn.Module) -> dict[str, Handle]:
        """The handles of ``ema``'s targets, sharing the live targets' traces (same architecture)."""
        return {prefix: target.share_with(ema.get_submodule(prefix) if prefix else ema)
                for prefix, target in self.targets.items()}

    def attach(self, ema: nn.Module) -> None:
        """Give ``ema`` the live structure (checked first; all or nothing) and keep it in step from now."""
        structures = {prefix: target.structure() for prefix, target in self.targets.items()}
        handles = self.handles(ema)
        for prefix, twin in handles.items():
            twin.check_structure(structures[prefix])
        with Transaction(ema) as txn:
            restore_targets(handles, structures, txn)
        self.modules.append(ema)

    def _twin(self, ema: nn.Module, name: str) -> tuple[Handle, str, str]:
        """``(the copy's handle of the target holding name, its prefix, the name inside it)``."""
        prefix, local = split_name(list(self.targets), name)
        return self.handles(ema)[prefix], prefix, local

    @torch.no_grad()
    def grow(self, live: nn.Module, grown: dict[str, list[str]], txn: Transaction) -> None:
        """Grow ``grown`` (``{site: kinds}``, as ``live`` just did) in every copy, starting from the live
        values; each copy's function is kept."""
        for ema in self.modules:
            ema_txn = txn.child(ema)
            for name, kinds in grown.items():
                twin, prefix, local = self._twin(ema, name)
                old = ema.get_submodule(name)
                function = old.equivalent() if isinstance(old, RepConv2d) else main_parameters(old)
                function = tuple(None if t is None else t.detach().clone() for t in function)
                # EMA copies are often frozen (mmengine's): grow them without the eligibility check.
                twin.grow_block(local, kinds, txn=ema_txn, prefix=prefix)
                block = ema.get_submodule(name)
                block.requires_grad_(main_parameters(old)[0].requires_grad)
                source = live.get_submodule(name)
                for kind in kinds:
                    dst, src = block.branches[kind].state_dict(), source.branches[kind].state_dict()
                    for key in dst:
                        dst[key].copy_(src[key])
                block.rebalance(*function)

    @torch.no_grad()
    def cut(self, cut: dict[str, list[str]], txn: Transaction) -> None:
        """Cut ``cut`` (``{block: kinds}``) in every copy, absorbing the copy's own averaged values."""
        for ema in self.modules:
            ema_txn = txn.child(ema)
            for name in sorted(cut, key=lambda n: -n.count(".")):
                twin, _, local = self._twin(ema, name)
                twin.cut({local: cut[name]}, txn=ema_txn)
                broadcast_module(ema.get_submodule(name))

    def restore(self, structures: dict[str, dict[str, Any]], txn: Transaction) -> None:
        """Rebuild the checked ``structures`` on every copy, each in a child of ``txn``."""
        for ema in self.modules:
            restore_targets(self.handles(ema), structures, txn.child(ema))
