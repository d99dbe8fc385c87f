"""Ablation of issue 23: does online mode lack dbb mode's normalisation of each path?

In dbb mode every path of a grown block ends in its own BatchNorm (``main_bn``, each branch's ``bn``), so
each path's trained kernel is scale-invariant: rescaling a conv weight behind a BatchNorm leaves the output
unchanged, its gradient is orthogonal to it, and its effective step shrinks as it grows. In online mode the
paths are linear (``main_scale * weight + sum_b scale_b * K_b``) and nothing normalises them apart from the
site's own BatchNorm after the sum. A BatchNorm also uses batch statistics; this ablation separates the two.

:func:`normalise_every_path` weight-normalises (Salimans & Kingma 2016) every trained conv weight of every
online block, the main kernel and each branch's convs, per output channel, through
``torch.nn.utils.parametrize``: ``W = g0 * V / ||V||`` with ``g0`` the norm each row had when normalised, so
the function is unchanged at that instant and the per-channel magnitude is learned by the path's own
``scale`` / ``main_scale``, as the BatchNorm's ``weight`` learns it in dbb mode. The block stays linear (one
kernel, one conv per step) and folds exactly: folding reads the parametrized weights. No batch statistics:
if this closes the gap to dbb mode, scale invariance per path is what online mode lacks; if not, it is
BatchNorm's use of batch statistics (or something else).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from dyrep_fx.block import find_blocks, main_parameters

__all__ = ["FixedNormRows", "normalise_every_path", "normalised_weights"]


class FixedNormRows(nn.Module):
    """``V -> norm * V / ||V||`` per output channel (row of the flattened weight); ``norm`` is fixed."""

    def __init__(self, norm: Tensor) -> None:
        super().__init__()
        self.register_buffer("norm", norm)

    def forward(self, v: Tensor) -> Tensor:
        return self.norm * v / _row_norms(v)


def _row_norms(w: Tensor) -> Tensor:
    return w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))


def normalised_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, "weight")`` of every trained kernel in the model's grown online blocks: each block's main
    kernel (registered under ``weight``, which is what torch's parametrize addresses; ``block.weight`` read
    elsewhere is the kernel the block computes with) and every conv inside its branches (an identity branch
    has none). An ungrown block is a plain conv in either mode and stays one."""
    targets = []
    for name, block in find_blocks(model).items():
        if not block.grown:
            continue
        if block.mode != "online":
            raise ValueError(f"{name}: the ablation normalises online blocks only (this one is {block.mode!r})")
        targets.append((block, "weight"))
        targets += [(m, "weight") for b in block.branches.values() for m in b.modules() if isinstance(m, nn.Conv2d)]
    return targets


@torch.no_grad()
def normalise_every_path(model: nn.Module) -> int:
    """Weight-normalise every kernel of :func:`normalised_weights` in place, keeping the function; returns
    how many. Call it after growth and before the optimizer is made (its parameters move into
    ``parametrizations.weight.original``)."""
    targets = normalised_weights(model)
    for module, attr in targets:
        kernel = main_parameters(module)[0]  # (a block's main kernel, not the kernel it computes with)
        parametrize.register_parametrization(module, attr, FixedNormRows(_row_norms(kernel).clone()))
    return len(targets)
