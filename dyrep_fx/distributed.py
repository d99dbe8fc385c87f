"""Distributed helpers: identical structure changes on every rank, and DDP re-wrapping.

Decisions are taken from saliencies reduced once per step, so every rank grows the same sites;
the new parameters are then broadcast from rank 0 so that every rank holds identical values
whatever its random state. DDP registers its parameters at construction, so after a structural
change the DDP wrapper must be rebuilt (:func:`rewrap_ddp`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["is_distributed", "broadcast_module", "rewrap_ddp", "check_same_on_all_ranks"]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` to all ranks."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        if dist.get_backend() == "nccl" and not t.is_cuda:
            tmp = t.detach().cuda()
            dist.broadcast(tmp, src)
            t.copy_(tmp.to(t.device))
        else:
            dist.broadcast(t.data, src)


def check_same_on_all_ranks(value: Any, what: str) -> None:
    """Raise on every rank if ``value`` (JSON-serialisable) differs between ranks, naming ``what``."""
    if not is_distributed():
        return
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest)
    if len(set(gathered)) > 1:
        raise RuntimeError(f"{what} differs between ranks ({gathered}); refusing a change that would leave "
                           "the ranks with different models")


def rewrap_ddp(ddp: nn.parallel.DistributedDataParallel, **overrides: Any) -> nn.parallel.DistributedDataParallel:
    """A new ``DistributedDataParallel`` around ``ddp.module`` with the same settings (after a change)."""
    settings = dict(
        device_ids=ddp.device_ids,
        output_device=ddp.output_device,
        broadcast_buffers=ddp.broadcast_buffers,
        find_unused_parameters=ddp.find_unused_parameters,
        gradient_as_bucket_view=ddp.gradient_as_bucket_view,
        static_graph=getattr(ddp, "static_graph", False),
        bucket_cap_mb=ddp.bucket_bytes_cap / (1024 * 1024),
    )
    settings.update(overrides)
    return type(ddp)(ddp.module, process_group=ddp.process_group, **settings)
