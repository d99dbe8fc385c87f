"""One rank of a DDP training run with DyRep on gloo (CPU) or nccl (one GPU per rank); launched by
tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT \\
        tests/scripts/ddp_worker.py --out DIR --mode online [--backend nccl]

Every rank sees different data and has a different torch seed and DyRep seed, so any branch
initialisation that is not broadcast differs between ranks. After each structural change the DDP
wrapper is rebuilt with ``dyrep_fx.distributed.rewrap_ddp``. The Python-level collectives are
counted per phase (training iterations / ``DyRep.step``). Each rank writes ``DIR/rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dyrep_fx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.nets import SmallNet, spread_first_block  # noqa: E402
from helpers.rank_exit import end_rank, start_rank  # noqa: E402

from dyrep_fx.distributed import rewrap_ddp

UNITS = 5
ITERS = 2
CUT_BEFORE_UNIT = 5  # before this unit's step, spread the first block's branch scales so that it cuts
#: BatchNorms a new branch of each kind brings in dbb mode (each is calibrated: 2 all_reduces)
BNS_PER_KIND = {"1x1": 1, "1x1_kxk": 2, "1x1_avg": 2, "1xk": 1, "kx1": 1, "identity": 1, "prior": 2}
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list",
               "reduce", "barrier", "all_gather_into_tensor", "reduce_scatter")



def Net() -> SmallNet:  # noqa: N802 - keeps the tests' call sites short
    return SmallNet()


DEVICE = torch.device("cpu")  # cuda:<local rank> under nccl


def batch(rank: int, i: int):
    g = torch.Generator().manual_seed(10_000 * (rank + 1) + i)  # different data on every rank
    x, y = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)
    return x.to(DEVICE), y.to(DEVICE)


class Counter:
    """Counts Python-level collectives by phase (DDP's own gradient all-reduce runs in C++, not here)."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.counts: dict[str, dict[str, int]] = {}
        self.originals = {}
        for name in COLLECTIVES:
            if hasattr(dist, name):
                fn = getattr(dist, name)
                self.originals[name] = fn
                setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            per_phase = self.counts.setdefault(self.phase, {})
            per_phase[name] = per_phase.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper


def same_on_all_ranks(tensors: list[torch.Tensor]) -> bool:
    """Bitwise equality of a list of tensors across ranks (uses the real, uncounted collective)."""
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    COUNTER.originals["all_gather"](gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered)


COUNTER: Counter


def main() -> None:
    global COUNTER, DEVICE
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", default="online")
    parser.add_argument("--metric", default="snip")
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = parser.parse_args()

    torch.set_num_threads(1)
    device_ids = None
    if args.backend == "nccl":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        DEVICE, device_ids = torch.device("cuda", local_rank), [local_rank]
    start_rank()
    dist.init_process_group(args.backend)
    rank = dist.get_rank()
    COUNTER = Counter()
    torch.manual_seed(100 + rank)

    model = Net().double().to(DEVICE)
    ddp = DDP(model, device_ids=device_ids)  # rank 0's initial weights everywhere
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    calib = [batch(rank, 900 + i) for i in range(3)]
    # nested="open": three sites and five steps; the growth mechanics under DDP are what is tested here.
    ctl = dyrep_fx.DyRep(ddp, opt, interval=1, mode=args.mode, calib_loader=calib, calib_batches=3, seed=rank,
                         metric=args.metric, nested="open", grow_at_start=0.0)
    assert ctl.model is model

    steps = []
    losses = []
    for unit in range(UNITS):
        COUNTER.phase = "train"
        for it in range(ITERS):
            x, y = batch(rank, unit * ITERS + it)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        if unit + 1 == CUT_BEFORE_UNIT:
            spread_first_block(model)
        COUNTER.phase = f"step{unit + 1}"
        result = ctl.step()
        COUNTER.phase = "check"
        new_bns = sum(BNS_PER_KIND[kind] for kinds in result.grown.values() for kind in kinds)
        grown_blocks = [model.get_submodule(name) for name in result.grown]
        steps.append({
            "unit": result.unit, "grown": result.grown, "cut": result.cut, "new_bns": new_bns,
            # right after the step, before DDP is rebuilt (which would hide differences)
            "params_same": same_on_all_ranks(list(model.parameters())),
            "grown_state_same": same_on_all_ranks([t for b in grown_blocks for t in b.state_dict().values()
                                                   if t.is_floating_point()]) if grown_blocks else True,
        })
        if result.changed:
            ddp = rewrap_ddp(ddp)
            assert ddp.module is model
    COUNTER.phase = "train_after"
    for it in range(3):
        x, y = batch(rank, 1000 + it)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    torch.save({
        "rank": rank,
        "structure": dyrep_fx.structure(model),
        "params": {n: p.detach().cpu().clone() for n, p in model.named_parameters()},
        "history": ctl.history,
        "steps": steps,
        "counts": COUNTER.counts,
        "losses": losses,
        "optimizer_sizes": [len(g["params"]) for g in opt.param_groups],
    }, os.path.join(args.out, f"rank{rank}.pt"))
    end_rank()


if __name__ == "__main__":
    main()
