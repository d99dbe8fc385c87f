"""Training with DyRep, checkpointed halfway and resumed in a fresh process (used by tests/test_resume.py).

As a script it is the fresh process: it builds a fresh model, optimizer, scheduler and DyRep, loads
the checkpoint (``ctl.load_state_dict`` first, then the model, the optimizer, the scheduler and the
torch RNG), trains the remaining units and saves the final state. The test imports the same functions
for the uninterrupted run and the first half, so every run shares one definition.

    python tests/scripts/resume_worker.py --ckpt half.pt --out final.pt --mode online --opt sgd
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import dyrep_fx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.nets import SmallNet, spread_first_block  # noqa: E402

UNITS = 10  # DyRep.step() calls (e.g. epochs)
HALF = 5  # the checkpoint is written after this many units: mid-interval
ITERS = 2  # optimizer steps per unit
INTERVAL = 2  # a structural step every 2 units: units 2, 4 | 6, 8, 10
CUT_BEFORE_UNIT = 8  # before this unit's step the first block's branch scales are spread, so it cuts


def deterministic() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def Net() -> SmallNet:  # noqa: N802 - keeps the call sites short
    # the dropout draws from the global RNG: its state must be checkpointed too
    return SmallNet(dropout=0.2)


def batch(i: int):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)


def build(mode: str, opt_name: str, seed: int = 0):
    """A fresh model, optimizer (decay / no-decay groups), scheduler and controller."""
    torch.manual_seed(seed)
    model = Net().double()
    groups = [
        {"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": 1e-3},
        {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0},
    ]
    if opt_name == "sgd":
        opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=UNITS * ITERS)
    calib = [batch(900 + i) for i in range(3)]
    ctl = dyrep_fx.DyRep(model, opt, interval=INTERVAL, mode=mode, calib_loader=calib, calib_batches=3, seed=11,
                         grow_at_start=0.0)
    return model, opt, sched, ctl


def train_units(model, opt, sched, ctl, start: int, stop: int) -> list[float]:
    """Units ``start`` .. ``stop - 1`` (0-based); the unit's data depends only on its index."""
    losses = []
    for unit in range(start, stop):
        for it in range(ITERS):
            x, y = batch(unit * ITERS + it)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        if unit + 1 == CUT_BEFORE_UNIT:
            spread_first_block(model)
        ctl.step()
    return losses


def checkpoint(model, opt, sched, ctl) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "dyrep": ctl.state_dict(),
        "rng": torch.get_rng_state(),
    }


def resume(ckpt: dict, mode: str, opt_name: str):
    """A fresh model etc. (another init seed on purpose) with the checkpoint loaded."""
    model, opt, sched, ctl = build(mode, opt_name, seed=123)
    ctl.load_state_dict(ckpt["dyrep"])
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"])
    return model, opt, sched, ctl


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", default="online")
    parser.add_argument("--opt", default="sgd")
    args = parser.parse_args()
    deterministic()
    ckpt = torch.load(args.ckpt, weights_only=True)  # a plain-data checkpoint
    model, opt, sched, ctl = resume(ckpt, args.mode, args.opt)
    assert ctl.units == HALF, ctl.units
    losses = train_units(model, opt, sched, ctl, HALF, UNITS)
    final = checkpoint(model, opt, sched, ctl)
    final["losses"] = losses
    torch.save(final, args.out)


if __name__ == "__main__":
    main()
