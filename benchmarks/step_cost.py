"""Cost of one DyRep step (decision + grow + cut) relative to one training epoch of the demo.

The demo's network, data and recipe (``dyrep_fx_examples.demo``), online mode (no BatchNorm calibration). A DyRep
step is forced after every ``--every`` training iterations; its time is measured apart from the
iterations' and compared with the epoch: ``steps_per_epoch x`` the median iteration time.

    .venv/bin/python benchmarks/step_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, summary, write_json  # noqa: E402

from dyrep_fx.controller import DyRep  # noqa: E402
from dyrep_fx.defaults import PAPER_SCHEDULE  # noqa: E402
from dyrep_fx_examples.data import fashion_mnist_loaders  # noqa: E402
from dyrep_fx_examples.demo import DemoConfig, make_net  # noqa: E402


def measure(config: DemoConfig, steps: int, every: int) -> dict:
    """Train with a DyRep step every ``every`` iterations; time iterations and steps apart."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    train_loader, _ = fashion_mnist_loaders(config.batch_size, config.train_limit, 100, seed=config.seed)
    model = make_net(config.width)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    ctl = DyRep(model, optimizer, interval=every, mode="online", seed=config.seed, **PAPER_SCHEDULE)
    loss_fn = nn.CrossEntropyLoss()
    iteration_times, step_times, changes = [], [], 0
    batches = iter(train_loader)
    while len(step_times) < steps:
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(train_loader)
            x, y = next(batches)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
        iteration_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        result = ctl.step()
        if result.due:
            step_times.append(time.perf_counter() - start)
            changes += int(result.changed)
    epoch = len(train_loader) * statistics.median(iteration_times)
    step = summary(step_times)
    return {"steps_per_epoch": len(train_loader), "iteration_s": statistics.median(iteration_times),
            "epoch_s": epoch, "step_s": step, "step_over_epoch": step["median"] / epoch,
            "step_over_epoch_max": step["max"] / epoch, "structure_changes": changes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="DyRep steps to time")
    parser.add_argument("--every", type=int, default=10, help="training iterations between DyRep steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="out/benchmarks/step_cost.json")
    args = parser.parse_args()
    config = DemoConfig(threads=args.threads, progress=False)
    result = measure(config, args.steps, args.every)
    result["machine"] = machine()
    write_json(args.out, result)
    s = result["step_s"]
    print("| demo epoch (s) | DyRep step (s), median [min, max] | step / epoch (median, worst) | changes |")
    print("|---|---|---|---|")
    print(f"| {result['epoch_s']:.2f} | {s['median']:.4f} [{s['min']:.4f}, {s['max']:.4f}] "
          f"| {100 * result['step_over_epoch']:.2f}%, {100 * result['step_over_epoch_max']:.2f}% "
          f"| {result['structure_changes']} of {s['n']} |")


if __name__ == "__main__":
    main()
