"""BatchNorm calibration for newly grown dbb-mode branches (DyRep's ``recal_bn``).

The rest of the network runs in eval mode so that the new branches see the statistics of the
network as it is; only the new BatchNorms update, with a cumulative average (``momentum=None``)
because only a few batches are used. Statistics are averaged over ranks once at the end.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["calibrate_batchnorms", "default_forward"]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call the model on a batch: the first element of a tuple/list batch, else the batch itself."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    device = next(model.parameters()).device
    return model(inputs.to(device) if isinstance(inputs, torch.Tensor) else inputs)


@torch.no_grad()
def calibrate_batchnorms(
    model: nn.Module,
    batchnorms: Sequence[_BatchNorm],
    loader: Iterable,
    num_batches: int = 20,
    forward: Callable[[nn.Module, Any], Any] = default_forward,
) -> int:
    """Re-estimate the running statistics of ``batchnorms`` on up to ``num_batches`` batches.

    Every module's ``training`` flag and every BatchNorm's momentum are restored afterwards.
    Returns the number of batches used.
    """
    if not batchnorms:
        return 0
    flags = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in batchnorms}
    used = 0
    try:
        for m in model.modules():
            m.training = False
        for bn in batchnorms:
            bn.reset_running_stats()
            bn.momentum = None
            bn.training = True
        for batch in itertools.islice(loader, num_batches):
            forward(model, batch)
            used += 1
    finally:
        for m, flag in flags.items():
            m.training = flag
        for bn, momentum in momenta.items():
            bn.momentum = momentum
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        for bn in batchnorms:
            for stat in (bn.running_mean, bn.running_var):
                dist.all_reduce(stat)
                stat.div_(world)
    return used
