"""Fold pass: every re-parameterization block back to one conv of the original architecture.

Each outermost :class:`~dyrep_fx.block.RepConv2d` becomes a conv of the user's original conv class and
hyper-parameters holding the block's exact eval-mode kernel. A bias that the original conv did not
have (dbb mode) is absorbed into the BatchNorm that the conv feeds: in eval mode
``BN(x + b)`` equals ``BN'(x)`` with ``running_mean' = running_mean - b``. The folded model then has
exactly the original state_dict keys.
"""

from __future__ import annotations

import torch
from torch import nn

from ..block import find_blocks
from ..tracing import TracedModel
from .base import PassError, PassReport, Transaction, get_module

__all__ = ["run"]


def run(traced: TracedModel, model: nn.Module) -> PassReport:
    """Fold every block of ``model`` in place (eval-mode function kept exactly)."""
    report = PassReport("fold")
    names = list(find_blocks(model, outermost=True))
    absorb: dict[str, str] = {}
    for name in names:
        block = get_module(model, name)
        if block.template.bias is None and block.main_bias is not None:
            use = traced.convs.get(name)
            if use is None or use.next_bn is None:
                raise PassError(f"block {name!r} carries a bias its original conv lacks and does not feed "
                                "only a BatchNorm; it cannot fold into the original architecture")
            absorb[name] = use.next_bn
    with Transaction(model) as txn:  # all or nothing: any failure puts everything back
        for name in names:
            block = get_module(model, name)
            conv = block.to_conv()
            if name in absorb:
                bn = get_module(model, absorb[name])
                txn.save(bn)
                with torch.no_grad():
                    bn.running_mean.sub_(conv.bias)
                conv.bias = None
            txn.replace(name, conv)
            report.changed[name] = list(block.kinds)
            if name in absorb:
                report.details.setdefault("bias_absorbed_into", {})[name] = absorb[name]
    return report
