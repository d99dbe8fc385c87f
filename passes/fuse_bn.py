"""fuse_bn pass (deployment): conv followed only by a BatchNorm -> one conv with bias, BN -> Identity.

For inference only: the result computes the eval-mode function of the model, and its
state_dict no longer matches the original architecture (BN parameters are gone, convs gain biases).
Run it on a folded model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import conv_classes, kernels
from ..block import RepConv2d
from ..tracing import TracedModel
from .base import PassError, PassReport, Transaction, get_module

__all__ = ["run"]


def run(traced: TracedModel, model: nn.Module) -> PassReport:
    """Fuse every conv whose single output feeds only a single-use BatchNorm; in place."""
    report = PassReport("fuse_bn")
    if any(isinstance(m, RepConv2d) for m in model.modules()):
        raise PassError("fuse_bn runs on a folded model; call dyrep_fx.fold(model) first")
    with Transaction(model) as txn:  # all or nothing: any failure puts everything back
        for name, use in traced.convs.items():
            conv = get_module(model, name)
            if not isinstance(conv, nn.Conv2d):
                continue
            why = conv_classes.why_not_exact(conv)
            if why is not None:  # e.g. weight standardisation: a fused kernel would be standardised again
                report.skipped[name] = why
                continue
            if use.calls != 1 or use.next_bn is None:
                report.skipped[name] = "its output does not feed only a BatchNorm"
                continue
            bn = get_module(model, use.next_bn)
            if traced.norm_calls.get(use.next_bn, 0) != 1 or not isinstance(bn, _BatchNorm):
                report.skipped[name] = f"{use.next_bn} is used more than once"
                continue
            if not bn.track_running_stats or bn.running_mean is None:
                report.skipped[name] = f"{use.next_bn} keeps no running statistics"
                continue
            w, b = kernels.fuse_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight,
                                   bn.bias, bn.eps)
            txn.save(conv)
            with torch.no_grad():
                conv.weight.copy_(w)
                if conv.bias is None:
                    conv.bias = nn.Parameter(b.detach().clone())
                else:
                    conv.bias.copy_(b)
            txn.replace(use.next_bn, nn.Identity())
            report.changed[name] = [use.next_bn]
    return report
