"""Training cost of the depth sweep's structures at one depth, measured side by side.

The sweep's runs record CPU seconds per epoch, but they trained days apart on a shared 2-core machine
whose load doubled some of them, so their ratios are not a cost. This script rebuilds, at one depth, the
structure each variant trains with (plain; a static variant grown everywhere at step 0; each DyRep run's
structure at the end of its training, restored from its JSON with :func:`dyrep_fx.restore`) and times
training steps of all of them in one process, one thread, interleaved round by round: the median CPU
seconds per step over plain's. A DyRep run grows during training, so its cost over the whole run is at
most its end-of-training ratio (its peak, when cuts shrink it, is close: see the parameters column).

    .venv/bin/python benchmarks/sweep_cost.py --depth 20          # writes results/sweep/cost_depth20.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_json  # noqa: E402
from depth_sweep import ABLATIONS, DYREP_VARIANTS, RESULTS, STATIC_VARIANTS, load_runs, recipe_for  # noqa: E402

import dyrep_fx  # noqa: E402
from dyrep_fx.structure_spec import FORMAT  # noqa: E402
from dyrep_fx_examples.demo import VARIANT_RECIPES, _build, make_net  # noqa: E402


def structures(depth: int, runs_at_depth: dict[str, dict[int, dict[str, Any]]]) -> dict[str, list[nn.Module]]:
    """Per variant, the models to time: one for plain and each static variant or ablation, one per seed for
    DyRep."""
    recipe = recipe_for(depth)
    out: dict[str, list[nn.Module]] = {}
    for variant in STATIC_VARIANTS:
        if variant in runs_at_depth:
            out[variant] = [_build(variant, recipe)[0]]
    for variant, (base, prepare) in ABLATIONS.items():
        if variant in runs_at_depth:
            model = _build(base, recipe)[0]
            prepare(model)
            out[variant] = [model]
    for variant in DYREP_VARIANTS:
        for _seed, run in sorted(runs_at_depth.get(variant, {}).items()):
            model = make_net(recipe.width, net=recipe.net)
            mode = VARIANT_RECIPES[DYREP_VARIANTS[variant][0]][0]  # the demo variant's block mode
            dyrep_fx.restore(model, {"format": FORMAT, "mode": mode, "sites": run["final_structure"]})
            out.setdefault(variant, []).append(model)
    return out


def step_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Median CPU seconds of one training step (forward, backward, SGD step) over ``steps`` steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    times = []
    for _ in range(steps):
        start = time.process_time()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        times.append(time.process_time() - start)
    return statistics.median(times)


def measure(models: dict[str, list[nn.Module]], batch_size: int, rounds: int, steps: int) -> dict[str, Any]:
    """Every model timed once per round (variants interleaved); per variant the median over rounds and
    models of the step time, and its ratio to plain's."""
    torch.manual_seed(0)
    x, y = torch.randn(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))
    for group in models.values():  # warm-up: first calls allocate and (for blocks) build caches
        for model in group:
            step_seconds(model, x, y, 2)
    samples: dict[str, list[float]] = {v: [] for v in models}
    for _ in range(rounds):
        for variant, group in models.items():
            samples[variant] += [step_seconds(model, x, y, steps) for model in group]
    plain = statistics.median(samples["plain"])
    return {v: {"step_cpu_seconds": statistics.median(s), "vs_plain": statistics.median(s) / plain,
                "samples": len(s)} for v, s in samples.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=None, help="default: the sweep recipe's")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    runs = load_runs(args.results).get(args.depth, {})
    if "plain" not in runs:
        raise SystemExit(f"no plain run at depth {args.depth} under {args.results}")
    recipe = recipe_for(args.depth)
    batch = args.batch_size or recipe.batch_size
    cost = measure(structures(args.depth, runs), batch, args.rounds, args.steps)
    out = {"depth": args.depth, "batch_size": batch, "rounds": args.rounds, "steps": args.steps,
           "variants": cost, "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    write_json(args.results / f"cost_depth{args.depth}.json", out)
    for variant, c in cost.items():
        print(f"{variant:26s} {c['step_cpu_seconds']:.3f} CPU s/step  × plain {c['vs_plain']:.2f}  "
              f"({c['samples']} samples)")
    return out


if __name__ == "__main__":
    main()
