"""Small real CNNs shared by the controller, saliency, optimizer, resume and DDP tests."""

from __future__ import annotations

import torch
from torch import nn


class SmallNet(nn.Module):
    """Three 3x3 conv + BN + ReLU stages and a linear head, for 3-channel 8x8 inputs.

    ``dropout > 0`` adds a dropout that draws from the global RNG (resume tests checkpoint it).
    """

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        if dropout:
            self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = x.mean((2, 3))
        if hasattr(self, "drop"):
            x = self.drop(x)
        return self.fc(x)


@torch.no_grad()
def spread_first_block(model: nn.Module) -> None:
    """Spread the first grown block's branch scales (x50 / x0.01 alternately) so the Dep criterion cuts."""
    import dyrep_fx

    block = next(iter(dyrep_fx.blocks(model).values()))
    for i, branch in enumerate(block.branches.values()):
        branch.gamma().mul_(50.0 if i % 2 else 0.01)


@torch.no_grad()
def set_importance(block, values: dict[str, float], main: float = 1.0) -> None:
    """Set the main branch's scale (or BN gamma) to ``main`` and each branch's so that its importance
    (:meth:`dyrep_fx.RepConv2d.importance`) is ``values[kind] / main``.

    dbb mode: the last-BN gamma is the value. Online mode: importance is the branch kernel's share of the
    block's kernel ``W = main * weight + sum_b s_b * raw_b``; with ``s_b = c * values[b] / |raw_b|`` the
    share is ``c * values[b] / |W(c)|``, so ``c`` solves ``|W(c)| = c * main`` (a fixed point, found by
    iteration; ``|.|``: per-channel Frobenius norm, averaged).
    """
    from dyrep_fx.kernels import channel_norms

    if block.mode == "dbb":
        block.main_bn.weight.fill_(main)
        for kind, v in values.items():
            block.branches[kind].bn.weight.fill_(v)
        return
    block.main_scale.fill_(main)
    raw = {kind: float(channel_norms(block.branches[kind].raw_kernel()).mean()) for kind in values}
    c = float(channel_norms(block.weight).mean())
    for _ in range(200):
        for kind, v in values.items():
            block.branches[kind].scale.fill_(c * v / raw[kind])
        c_next = float(channel_norms(block.equivalent()[0]).mean()) / main
        if abs(c_next - c) <= 1e-15 * c:
            break
        c = c_next


def small_batch(seed: int, n: int = 8, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random 3-channel 8x8 inputs for :class:`SmallNet` and their labels, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)
