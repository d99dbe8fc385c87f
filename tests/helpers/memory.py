"""Activation memory by structure: the bytes autograd saves for backward, and a straightforward DBB block.

``saved_bytes`` counts what a forward pass keeps for backward (through ``saved_tensors_hooks``), each
storage once, leaving out the module's parameters and buffers and the input (which the layer before
keeps anyway). ``ReferenceDBB`` is a DBB block written the plain way, conv + BatchNorm per branch summed,
with the 1x1_kxk and 1x1_avg branches padding their BatchNorm output with its bias the way DBB does; it
is the yardstick for dbb mode's memory, not a numerical reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def saved_tensors(module: nn.Module | Callable[[Tensor], Tensor], x: Tensor) -> list[tuple[str, tuple[int, ...], int]]:
    """``(made by, shape, storage bytes)`` of every distinct storage a forward of ``module`` saves for backward.

    Views of one storage count once (a window slice of a padded input is the padded input); parameters,
    buffers (of a module) and the storage of ``x`` are left out.
    """
    state = [*module.parameters(), *module.buffers()] if isinstance(module, nn.Module) else []
    own = {t.untyped_storage().data_ptr() for t in [*state, x]}
    seen: dict[int, tuple[str, tuple[int, ...], int]] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in own and ptr not in seen:
            op = type(t.grad_fn).__name__ if t.grad_fn is not None else "leaf"  # the op that made it
            seen[ptr] = (op, tuple(t.shape), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return list(seen.values())


def saved_bytes(module: nn.Module, x: Tensor) -> int:
    """Total bytes of :func:`saved_tensors`."""
    return sum(n for _, _, n in saved_tensors(module, x))


class _PadWithBias(nn.Module):
    """BatchNorm, then pad its output with the value the BatchNorm gives a zero input (DBB's border)."""

    def __init__(self, channels: int, pad: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, z: Tensor) -> Tensor:
        y = self.bn(z)
        if self.pad == 0:
            return y
        bn = self.bn
        border = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        y = F.pad(y, [self.pad] * 4)
        v = border.reshape(1, -1, 1, 1)
        p = self.pad
        y[:, :, :p, :] = v
        y[:, :, -p:, :] = v
        y[:, :, :, :p] = v
        y[:, :, :, -p:] = v
        return y


class ReferenceDBB(nn.Module):
    """A kxk conv with DBB's branches (``1x1``, ``1x1_kxk``, ``1x1_avg``), each conv + BN, outputs summed.

    Square kernel, symmetric zero padding ``k // 2``; ``kinds`` picks the branches.
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                 kinds: tuple[str, ...] = ("1x1", "1x1_kxk", "1x1_avg")) -> None:
        super().__init__()
        p = k // 2
        self.main = nn.Sequential(nn.Conv2d(cin, cout, k, stride, p, groups=groups, bias=False), nn.BatchNorm2d(cout))
        self.branches = nn.ModuleDict()
        if "1x1" in kinds:
            self.branches["1x1"] = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, groups=groups, bias=False),
                                                 nn.BatchNorm2d(cout))
        if "1x1_kxk" in kinds:
            self.branches["1x1_kxk"] = nn.Sequential(
                nn.Conv2d(cin, cin, 1, groups=groups, bias=False), _PadWithBias(cin, p),
                nn.Conv2d(cin, cout, k, stride, 0, groups=groups, bias=False), nn.BatchNorm2d(cout))
        if "1x1_avg" in kinds:
            self.branches["1x1_avg"] = nn.Sequential(
                nn.Conv2d(cin, cout, 1, groups=groups, bias=False), _PadWithBias(cout, p),
                nn.AvgPool2d(k, stride, 0), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.main(x)
        for branch in self.branches.values():
            out = out + branch(x)
        return out
