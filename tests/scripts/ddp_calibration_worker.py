"""One rank of the DDP calibration check (gloo, CPU); launched by tests/test_distributed_calibration.py.

    python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT \\
        tests/scripts/ddp_calibration_worker.py --out DIR

Every rank trains the same model under DDP on its own data, then, still in the process group:

* ``calibrate``: ``dyrep_fx.calibrate(model, own batches)`` re-estimates every training BatchNorm;
* ``grow``: a dbb-mode ``DyRep.step()`` grows a site and calibrates its new branches' BatchNorms on the
  rank's own calibration batches.

Then the process group is destroyed and each rank computes its *own* calibration of the same BatchNorms
from the same weights and its own batches alone (``own``), and, for ``calibrate``, the same statistics by
hand from the BatchNorms' inputs (``hand``: per batch the mean and the unbiased variance over
``(N, H, W)``, averaged over the batches). Each rank writes ``DIR/rank<r>.pt``; the test compares the
distributed statistics with the mean over ranks of the ``own`` ones.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel as DDP

import dyrep_fx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.nets import SmallNet  # noqa: E402
from helpers.rank_exit import end_rank, start_rank  # noqa: E402

from dyrep_fx.calibration import calibrate_batchnorms  # noqa: E402

CALIB_BATCHES = 3


def batch(rank: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch ``i``: a different distribution on every rank (shifted and scaled by rank)."""
    g = torch.Generator().manual_seed(10_000 * (rank + 1) + i)
    x = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64) * (1.0 + rank) + 0.5 * rank
    return x, torch.randint(0, 10, (8,), generator=g)


def train(ddp: DDP, opt: torch.optim.Optimizer, rank: int, iters: int) -> None:
    for i in range(iters):
        x, y = batch(rank, i)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()


def stats(model: nn.Module, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (running_mean, running_var)}`` copies of the named BatchNorms."""
    return {n: (model.get_submodule(n).running_mean.clone(), model.get_submodule(n).running_var.clone())
            for n in names}


def bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


@torch.no_grad()
def by_hand(model: nn.Module, names: list[str], batches: list) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every training BatchNorm's calibration from its inputs (all BatchNorms normalise with batch
    statistics meanwhile, as they do in ``calibrate``): the average over batches of each batch's mean and
    unbiased variance per channel."""
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
    handles = []
    for n in names:
        def hook(module, args, n=n):
            x = args[0]
            seen[n].append((x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)))
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    try:
        for x, _ in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: (torch.stack([m for m, _ in v]).mean(0), torch.stack([s for _, s in v]).mean(0))
            for n, v in seen.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_rank()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    calib = [batch(rank, 900 + i) for i in range(CALIB_BATCHES)]
    result: dict = {"rank": rank, "world": world}

    # -- dyrep_fx.calibrate on a model trained under DDP ---------------------------------------------------
    torch.manual_seed(0)
    model = SmallNet().double()
    ddp = DDP(model)
    train(ddp, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), rank, 2)
    names = bn_names(model)
    own_calibrate = copy.deepcopy(model)  # the same weights, calibrated on this rank alone below
    used = dyrep_fx.calibrate(model, calib, num_batches=CALIB_BATCHES)
    result["calibrate"] = {"used": used, "ddp": stats(model, names)}

    # -- a dbb-mode growth step under DDP: its new BatchNorms are calibrated -------------------------------
    torch.manual_seed(0)
    grown_model = SmallNet().double()
    ddp2 = DDP(grown_model)
    opt = torch.optim.SGD(grown_model.parameters(), lr=0.05, momentum=0.9)
    ctl = dyrep_fx.DyRep(ddp2, opt, interval=1, mode="dbb", calib_loader=calib, calib_batches=CALIB_BATCHES,
                         seed=rank, grow_at_start=0.0)
    train(ddp2, opt, rank, 2)
    step = ctl.step()
    new_bns = [f"{site}.branches.{kind}.{n}" for site, kinds in step.grown.items() for kind in kinds
               for n, m in grown_model.get_submodule(site).branches[kind].named_modules() if isinstance(m, _BatchNorm)]
    own_grow = copy.deepcopy(grown_model)  # the same weights after the step, calibrated on this rank alone below
    result["grow"] = {"grown": step.grown, "used": step.calibrated_batches, "new_bns": new_bns,
                      "ddp": stats(grown_model, new_bns)}

    del ddp, ddp2, ctl
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()

    # -- each rank's own calibration, outside any process group ---------------------------------------------
    assert not dist.is_initialized()
    dyrep_fx.calibrate(own_calibrate, calib, num_batches=CALIB_BATCHES)
    result["calibrate"]["own"] = stats(own_calibrate, names)
    result["calibrate"]["hand"] = by_hand(copy.deepcopy(own_calibrate), names, calib)
    calibrate_batchnorms(own_grow, [own_grow.get_submodule(n) for n in new_bns], calib, CALIB_BATCHES)
    result["grow"]["own"] = stats(own_grow, new_bns)
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    end_rank()


if __name__ == "__main__":
    main()
