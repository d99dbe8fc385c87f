"""BatchNorm calibration: running statistics re-estimated as plain averages over a few batches.

Two uses. :func:`calibrate_batchnorms` re-estimates the BatchNorms of newly grown dbb-mode branches
(DyRep's ``recal_bn``): the rest of the network runs in eval mode so that the new branches see the
statistics of the network as it is. :func:`calibrate` re-estimates every BatchNorm that trains (known
elsewhere as "precise BN"), for evaluation during training: BatchNorm's running averages (momentum 0.1)
trail the weights by some tens of steps, and an online re-parameterized conv moves its output channels'
scale faster than a plain conv does (see ``benchmarks/README.md``, "Online stability"), so eval-mode
accuracy mid-training can drop far below what the weights compute with their own statistics.

Both update with a cumulative average (``momentum=None``) because only a few batches are used, and
average over ranks once at the end.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["calibrate", "calibrated", "calibrate_batchnorms", "default_forward"]


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


def calibrate_new_branches(model: nn.Module, grown: dict[str, nn.Module], new_branches: dict[str, list[nn.Module]],
                           loader: Iterable, batches: int, forward_fn: Callable[[nn.Module, Any], Any]) -> int:
    """dbb mode, after growth: fit the new branches' BatchNorms on ``batches`` of ``loader``, then re-balance
    each grown block so its function is unchanged; surviving branches keep their trained statistics.
    Returns the batches used (0 when nothing grew)."""
    if not grown:
        return 0
    functions = {name: tuple(t.detach().clone() if t is not None else None for t in block.equivalent())
                 for name, block in grown.items()}
    bns = [m for branches in new_branches.values() for b in branches for m in b.modules() if isinstance(m, _BatchNorm)]
    used = calibrate_batchnorms(model, bns, loader, batches, forward_fn)
    for name, block in grown.items():
        block.rebalance(*functions[name])
    return used


def training_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorms of ``model`` that train: in training mode and tracking running statistics (one kept
    in eval mode while the model trains, e.g. mmdet's ``norm_eval``, is frozen and left alone)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]


def calibrate(
    model: nn.Module,
    loader: Iterable,
    num_batches: int = 20,
    forward: Callable[[nn.Module, Any], Any] = default_forward,
) -> int:
    """Re-estimate the running statistics of every BatchNorm of ``model`` that trains, as plain averages
    over ``num_batches`` batches of ``loader`` (training data), for an evaluation that sees what the
    current weights compute (:func:`calibrated` puts the old statistics back afterwards).

    Call it with ``model`` in training mode, e.g. before each validation: BatchNorms in eval mode then
    are frozen ones and keep their statistics. Training is not affected (training-mode BatchNorm
    normalises with batch statistics); later training steps go on averaging from the new statistics.
    Returns the number of batches used.

    Raises:
        ValueError: no BatchNorm of ``model`` trains (``model`` in eval mode, or all frozen).
    """
    batchnorms = training_batchnorms(model)
    if not batchnorms:
        raise ValueError(f"calibrate: no BatchNorm of {type(model).__name__} is in training mode; call "
                         f"model.train() first (BatchNorms kept in eval mode count as frozen)")
    return calibrate_batchnorms(model, batchnorms, loader, num_batches, forward)


@contextmanager
def calibrated(
    model: nn.Module,
    loader: Iterable,
    num_batches: int = 20,
    forward: Callable[[nn.Module, Any], Any] = default_forward,
) -> Iterator[int]:
    """:func:`calibrate` for the ``with`` block only: inside it the training BatchNorms hold the calibrated
    statistics (evaluate there); on leaving, their running statistics (and batch counts) are put back, so
    training and checkpoints are exactly what they would have been without the evaluation.

        with dyrep_fx.calibrated(model, train_loader):
            accuracy = evaluate(model)

    Yields the number of batches used.
    """
    batchnorms = training_batchnorms(model)
    saved = [(bn, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in batchnorms]
    try:
        yield calibrate(model, loader, num_batches, forward)
    finally:
        with torch.no_grad():
            for bn, mean, var, count in saved:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(count)
