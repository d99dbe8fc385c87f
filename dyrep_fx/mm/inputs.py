"""What DyRepHook feeds the controller besides the model: a side loader over the training set, and the
inputs each target receives on one batch (its example inputs for tracing and counting calls)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..tracing import set_training_flags

__all__ = ["capture_target_inputs", "mm_forward", "side_loader"]


def mm_forward(model: nn.Module, batch: Any) -> Any:
    """Forward an mmengine data batch through the model in ``tensor`` mode (for BN calibration)."""
    data = model.data_preprocessor(batch, True)
    return model(**data, mode="tensor")


def _recording_forward(forward: Callable[..., Any], name: str, captured: dict[str, tuple]) -> Callable[..., Any]:
    def record(*args: Any, **kwargs: Any) -> Any:
        captured.setdefault(name, tuple(args))
        return forward(*args, **kwargs)

    return record


def capture_target_inputs(model: nn.Module, batch: Any, targets: Sequence[str],
                          forward_fn: Callable[[nn.Module, Any], Any] = mm_forward) -> dict[str, tuple]:
    """The positional inputs each target submodule receives on one batch (eval mode, no grad).

    ``forward_fn(model, batch)`` runs the model (default: :func:`mm_forward`). The heads of mmdet's and
    mmseg's ``mode='tensor'`` path are called as ``head.forward(x)``, which runs no forward hooks, so each
    target's ``forward`` is wrapped on the instance for this one pass (and put back afterwards). A target
    the pass does not reach is missing from the result.
    """
    captured: dict[str, tuple] = {}
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for name in targets:
            module = model.get_submodule(name)
            patched.append((module, module.__dict__.get("forward")))
            module.forward = _recording_forward(module.forward, name, captured)
        flags = set_training_flags(model, False)
        try:
            with torch.no_grad():
                forward_fn(model, batch)
        finally:
            set_training_flags(model, flags)
    finally:
        for module, own in reversed(patched):
            if own is None:
                del module.forward
            else:
                module.forward = own
    return captured


def side_loader(loader: DataLoader, seed: int = 0) -> DataLoader:
    """A second loader over the training set, for the example batch and BN calibration.

    Iterating the runner's own loader outside its loop would break it: mmengine's
    ``InfiniteSampler`` yields from one generator for the whole run, and a dropped iterator closes it.
    """
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", 1)
    return DataLoader(loader.dataset, batch_size=batch_size, shuffle=True, num_workers=0,
                      collate_fn=loader.collate_fn, generator=torch.Generator().manual_seed(seed))
