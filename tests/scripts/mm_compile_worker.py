"""One rank of a real mmengine Runner training with ``compile`` set and DyRepHook under MMDistributedDataParallel
(gloo, CPU), then of the same run without ``compile`` (the eager twin).

Launched by tests/mm/test_mm_compile.py:

    python -m torch.distributed.run --nproc_per_node 2 ... tests/scripts/mm_compile_worker.py --out DIR

The toy classifier of tests/helpers/mm_toy.py (``launcher='pytorch'``, the gloo group started here as in
mm_ddp_worker.py) trains ITERS iterations with a DyRep step every INTERVAL. ``compile`` names the
``GraphLog`` backend, which records every graph torch.compile hands it and runs it as captured: the
test sees what was compiled when, and the compiled run must compute what the eager one does. Each rank
writes ``DIR/rank<r>.pt``: the probe's record (per iteration the wrapper in use and whether its
``train_step`` was compiled for it, the loss), the graphs compiled, the DyRep history, whether the final
wrapper wraps the controller's (grown) model, and the eager twin's losses and history.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.mm_data import find_hook  # noqa: E402
from helpers.mm_toy import GRAPH_LOG_BACKEND, compile_probe, register_graph_log, toy_cfg, train_toy  # noqa: E402
from helpers.rank_exit import end_rank, start_rank  # noqa: E402

from dyrep_fx import api  # noqa: E402

ITERS, INTERVAL = 6, 2  # DyRep steps after iterations 2, 4 and 6; iterations 3 to 6 train a grown model
DDP = dict(launcher="pytorch", model_wrapper_cfg=dict(type="MMDistributedDataParallel", device_ids=None))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_rank()
    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), Path(args.out)

    graph_log = register_graph_log()
    record, probe = compile_probe(graph_log)
    runner = train_toy(toy_cfg(out / "compiled", ITERS, INTERVAL, compile=dict(backend=GRAPH_LOG_BACKEND), **DDP),
                       probe)
    ctl = find_hook(runner, "DyRepHook").controller
    eager_record, eager_probe = compile_probe()
    eager = train_toy(toy_cfg(out / "eager", ITERS, INTERVAL, **DDP), eager_probe)
    torch.save({"rank": rank, **record, "graph_log": graph_log.graphs, "history": ctl.history,
                "final_wrapper": type(runner.model).__name__, "wraps_controlled": runner.model.module is ctl.model,
                "blocks": sorted(api.blocks(ctl.model)),
                "eager_losses": eager_record["losses"],
                "eager_history": find_hook(eager, "DyRepHook").controller.history},
               out / f"rank{rank}.pt")
    end_rank()


if __name__ == "__main__":
    main()
