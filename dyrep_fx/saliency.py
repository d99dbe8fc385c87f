"""Synflow saliency of conv sites, collected from the optimizer without the training loop's help.

DyRep ranks convs by ``sum(grad * weight)`` over each conv's kernel, averaged over the iterations
since the last structural step. The collector registers an optimizer *step pre-hook*: it runs right
before every ``optimizer.step()``, when gradients are final -- after gradient accumulation, after
clipping, after DDP's all-reduce, and after ``GradScaler.unscale_`` (so AMP's loss scale never reaches
the saliency); it is skipped when GradScaler skips a step on inf/nan. Frameworks that zero
gradients right after the step (mmengine) are no problem. Values stay on the device as one tensor:
no ``.item()`` and no collective per iteration; :meth:`SaliencyCollector.mean` reduces once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["SaliencyCollector"]


class SaliencyCollector:
    """Accumulates per-site synflow (signed by default, or ``abs``) between structural steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, metric: str = "synflow") -> None:
        if metric not in ("synflow", "abs"):
            raise ValueError(f"metric must be 'synflow' or 'abs', got {metric!r}")
        self.metric = metric
        self.names: list[str] = []
        self._params: list[nn.Parameter] = []
        self.total: torch.Tensor | None = None
        self.count = 0
        self._handle = optimizer.register_step_pre_hook(self._on_step)

    def watch(self, named_params: Sequence[tuple[str, nn.Parameter]]) -> None:
        """Start a new interval over these ``(site name, kernel Parameter)`` pairs."""
        self.names = [n for n, _ in named_params]
        self._params = [p for _, p in named_params]
        self.total = None
        self.count = 0

    @torch.no_grad()
    def _on_step(self, optimizer, args, kwargs) -> None:
        if not self._params:
            return
        values = []
        for p in self._params:
            if p.grad is None:
                values.append(torch.zeros((), device=p.device, dtype=torch.float64))
                continue
            v = (p.grad * p).sum(dtype=torch.float64)
            values.append(v.abs() if self.metric == "abs" else v)
        step = torch.stack([v.to(values[0].device) for v in values])
        self.total = step if self.total is None else self.total + step
        self.count += 1

    def mean(self) -> dict[str, float]:
        """Per-site mean over the interval, reduced over all ranks once (empty if nothing was seen)."""
        if self.total is None:
            local = torch.zeros(len(self.names) + 1, dtype=torch.float64)
        else:
            local = torch.cat([self.total, torch.tensor([float(self.count)], device=self.total.device,
                                                        dtype=torch.float64)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl" and not local.is_cuda:
                local = local.cuda()
            dist.all_reduce(local)
        local = local.cpu()
        count = float(local[-1])
        if count == 0:
            return {}
        return {name: float(v) / count for name, v in zip(self.names, local[:-1])}

    def state_dict(self) -> dict:
        """Counters and sums of the current interval (plain data)."""
        return {"metric": self.metric, "names": list(self.names), "count": self.count,
                "total": None if self.total is None else self.total.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Resume an interval; the watched names must match."""
        if state["names"] != self.names:
            only_saved = [n for n in state["names"] if n not in self.names]
            only_here = [n for n in self.names if n not in state["names"]]
            order = ", in another order" if not only_saved and not only_here else ""
            raise ValueError(f"saliency state was recorded for other sites than the ones watched now (only "
                             f"in the state: {only_saved[:5]}, only watched here: {only_here[:5]}{order})")
        self.count = state["count"]
        total = state["total"]
        if total is not None and self._params:
            total = total.to(self._params[0].device)
        self.total = total

    def remove(self) -> None:
        """Unregister the optimizer hook."""
        self._handle.remove()
