"""The one all-or-nothing unit of a DyRep step, a checkpoint load or a structure load: a
:class:`~dyrep_fx.passes.base.Transaction` over the model that also puts back the optimizer's groups and
state, the candidate rule's records and the saliency interval (EMA copies join it through ``txn.child``)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .optim_sync import optimizer_rollback
from .passes.base import Transaction
from .policies import CandidateRule
from .saliency import SaliencyCollector

__all__ = ["step_transaction"]


@contextmanager
def step_transaction(model: nn.Module, optimizer: torch.optim.Optimizer, rule: CandidateRule,
                     saliency: SaliencyCollector, watch: Callable[[list[str]], None]) -> Iterator[Transaction]:
    """A transaction over ``model`` whose rollback also restores ``optimizer``, ``rule``'s records and the
    interval ``saliency`` has summed so far, watching its sites again through ``watch(names)``."""
    watched, interval = list(saliency.names), saliency.state_dict()
    rule_state = copy.deepcopy(rule.state_dict())

    def rewatch() -> None:
        watch(watched)
        saliency.load_state_dict(interval)

    with Transaction(model) as txn:
        # Registered first, undone last: the watched weights are the restored model's.
        txn.on_rollback(rewatch)
        txn.on_rollback(lambda: rule.load_state_dict(rule_state))
        txn.on_rollback(optimizer_rollback(optimizer))
        yield txn
