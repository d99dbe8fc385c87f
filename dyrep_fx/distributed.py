"""Distributed helpers: identical structure changes on every rank, and DDP re-wrapping.

Decisions are taken from saliencies reduced once per step, so every rank grows the same sites;
the new parameters are then broadcast from rank 0 so that every rank holds identical values
whatever its random state. DDP registers its parameters at construction, so after a structural
change the DDP wrapper must be rebuilt (:func:`rewrap_ddp`).
"""

from __future__ import annotations

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
    """Raise on every rank if ``value`` (small, JSON-serialisable) differs between ranks, naming ``what``.

    Call it before changing anything: the error then leaves every rank as it was. The message names the
    entries of a dict ``value`` that differ and which ranks hold which version, e.g.
    ``cut: {} on ranks [0]; {"layer1.0.conv1": ["1x1"]} on ranks [1]``.
    """
    if not is_distributed():
        return
    text = json.dumps(value, sort_keys=True, default=str)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, text)
    if len(set(gathered)) > 1:
        raise RuntimeError(f"{what} differs between ranks ({_describe_difference(gathered)}); refusing a "
                           "change that would leave the ranks with different models (nothing was changed)")


def _by_value(texts: list[str]) -> str:
    """``"<value> on ranks [0, 2]; <other> on ranks [1]"`` for one JSON text per rank."""
    ranks: dict[str, list[int]] = {}
    for rank, text in enumerate(texts):
        ranks.setdefault(text, []).append(rank)
    return "; ".join(f"{text} on ranks {r}" for text, r in ranks.items())


def _describe_difference(texts: list[str]) -> str:
    """Which entries differ between the ranks' JSON texts, and which ranks hold which version."""
    values = [json.loads(t) for t in texts]
    if not all(isinstance(v, dict) for v in values):
        return _by_value(texts)
    keys = sorted({k for v in values for k in v})
    parts = []
    for key in keys:
        entries = [json.dumps(v.get(key), sort_keys=True) for v in values]
        if len(set(entries)) > 1:
            parts.append(f"{key}: {_by_value(entries)}")
    return " | ".join(parts)


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
