"""One rank of a real mmengine Runner training with DyRepHook under MMDistributedDataParallel (gloo, CPU).

Launched by tests/mm/test_mm_production.py:

    python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT \\
        tests/scripts/mm_ddp_worker.py --data DEEPFOREST_COCO --out DIR

The small CPU detector config with ``launcher='pytorch'``, a different seed per rank (``diff_rank_seed``) and
so different augmentation, and the sampler's own shard of the data per rank. mmengine 0.10.7 cannot start the
process group itself on a CPU-only machine (``_init_dist_pytorch`` calls ``torch.cuda.set_device`` first), and
the Runner skips that step when a group exists, so this script starts the gloo group; the config's
``model_wrapper_cfg`` passes ``device_ids=None`` (DDP refuses device ids for CPU modules) and a bucket size
that shows which config built each wrapper. After training, two steps that the ranks disagree on are tried
(a different ``topk`` per rank; branch scales that drifted on rank 1 only) and must fail on both ranks
without changing anything. Each rank writes ``DIR/rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.mm_data import find_hook  # noqa: E402
from helpers.mm_production import det_cfg, dyrep_probes, train_runner  # noqa: E402
from helpers.nets import spread_first_block  # noqa: E402
from helpers.rank_exit import end_rank, start_rank  # noqa: E402

from dyrep_fx import api  # noqa: E402
from dyrep_fx.mm.wrappers import unwrap  # noqa: E402

ITERS, INTERVAL = 5, 2  # DyRep steps after iterations 2 and 4; iterations 3 to 5 train the grown model
BUCKET_MB = 5  # DDP's default is 25


def snapshot(ctl, model, optimizer) -> dict:
    return {"structures": ctl.state_dict()["structures"], "units": ctl.units, "steps": ctl.steps_done,
            "history": len(ctl.history), "groups": [len(g["params"]) for g in optimizer.param_groups],
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def same(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in a if k != "params") and list(a["params"]) == list(b["params"]) and \
        all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])


def refused_step(ctl, model, optimizer) -> dict:
    """A due DyRep step that must raise on every rank and change nothing."""
    ctl.units = (ctl.units // ctl.schedule.interval + 1) * ctl.schedule.interval - 1
    before = snapshot(ctl, model, optimizer)
    try:
        ctl.step()
        error = None
    except RuntimeError as exc:
        error = str(exc)
    return {"error": error, "unchanged": same(before, snapshot(ctl, model, optimizer))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_rank()
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    cfg = det_cfg(Path(args.data), Path(args.out) / "work", ITERS, INTERVAL)
    cfg.launcher = "pytorch"
    cfg.randomness = dict(seed=0, diff_rank_seed=True)
    cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, bucket_cap_mb=BUCKET_MB)
    record, *probes = dyrep_probes()
    runner = train_runner(cfg, *probes)
    ctl = find_hook(runner, "DyRepHook").controller
    model, optimizer = unwrap(runner.model), runner.optim_wrapper.optimizer
    result = {
        "rank": rank,
        "wrapper": (type(runner.model).__name__, runner.model.bucket_bytes_cap),
        "structures": ctl.state_dict()["structures"],
        "blocks": sorted(api.blocks(model)),
        "history": ctl.history,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "optimizer_ids": sorted(id(p) for g in optimizer.param_groups for p in g["params"]),
        "trainable_ids": sorted(id(p) for p in model.parameters() if p.requires_grad),
        **{k: record[k] for k in ("losses", "counts", "saliency", "new_params", "wrappers")},
    }
    ctl.schedule.topk = 1 + rank  # a config that differs between ranks: a different growth decision
    result["refused_grow"] = refused_step(ctl, model, optimizer)
    ctl.schedule.topk = 1
    if rank == 1:  # rank 1's branch scales drifted: it would cut a block that rank 0 keeps
        widest = max(api.blocks(model).values(), key=lambda b: len(b.kinds))
        spread_first_block(widest)  # the block itself is the first block in it
    result["refused_cut"] = refused_step(ctl, model, optimizer)
    torch.save(result, Path(args.out) / f"rank{rank}.pt")
    end_rank()


if __name__ == "__main__":
    main()
