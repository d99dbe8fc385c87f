"""Mixed precision: DyRep under CPU bf16 autocast keeps the function at growth and keeps training."""

from __future__ import annotations

import pytest
import torch
from helpers.nets import SmallNet
from torch import nn

import dyrep_fx

# float64 / tiny convs on CPU: one intra-op thread is much faster than two here.
pytestmark = pytest.mark.usefixtures("one_thread")


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)


def autocast_eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x).float()
    model.train()
    return out


@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_growth_under_bf16_autocast_keeps_the_function_and_training_goes_on(mode):
    torch.manual_seed(0)
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctl = dyrep_fx.DyRep(model, opt, interval=1, mode=mode)
    x_eval, _ = batch(999)
    grown = 0
    for unit in range(4):
        x, y = batch(unit)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        before = autocast_eval(model, x_eval)
        result = ctl.step()
        grown += len(result.grown)
        after = autocast_eval(model, x_eval)
        # bf16 keeps ~3 significant digits; the kernel is assembled in fp32 and rounded once more.
        assert (after - before).abs().max() <= 3e-2 * before.abs().max()
    assert grown >= 3
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(nn.functional.cross_entropy(model(x_eval), torch.zeros(8, dtype=torch.long)))
