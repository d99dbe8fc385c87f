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
