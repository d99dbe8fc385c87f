"""Training cost of DyRep / DBB / OREPA variants relative to the plain model, measured side by side.

One training step = forward + backward + SGD step. Every (variant, round) runs in fresh processes,
variants interleaved round by round, and each measurement in its own process:

* **time**, with the default allocator: median step time (wall clock, and the process's CPU time, which
  other jobs on a shared machine disturb less);
* **activation memory**, in separate processes with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
  pinned so that freed activations go back to the OS and peak RSS minus the RSS after warm-up measures
  them (on CUDA: ``max_memory_allocated`` minus the allocation after warm-up). The pinned allocator maps
  and unmaps every large tensor, which slows each step (plain ResNet-18 0.47 s -> 0.70 s at 8x224), so
  it never runs in a timed process.

Beside every time ratio: the variant's MAC floor (``benchmarks/macs.py``), its training forward's
multiply-adds over the plain model's.

    .venv/bin/python benchmarks/train_cost.py                      # ResNet-18/50 at 8x224 and 32x32
    .venv/bin/python benchmarks/train_cost.py --models resnet18 --rounds 3 --device cuda
    .venv/bin/python benchmarks/train_cost.py --compile     # every variant under torch.compile (plain too)
    DYREP_FX_REFERENCE_DBB=~/src/DiverseBranchBlock DYREP_FX_REFERENCE_OREPA=~/src/OREPA_CVPR2022 \
        .venv/bin/python benchmarks/train_cost.py --models resnet18 --rounds 3   # with ref_dbb, ref_orepa
    .venv/bin/python benchmarks/train_cost.py --models resnet18 --inputs 32x32 --variants plain,dbb_all \
        --rounds 1 --memory-rounds 1 --steps 1 --warmup 1       # smoke setting: the script runs

With ``--compile`` every model, plain included, runs under ``torch.compile`` (compilation happens in the
warm-up steps, which are not timed), so the ratios compare compiled with compiled.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, peak_rss_mib, reset_peak_rss, rss_mib, run_worker, summary, write_json  # noqa: E402
from macs import INPUTS, mac_floor  # noqa: E402
from variants import VARIANTS, available_references, build  # noqa: E402

#: The allocator setting of the memory processes only (see the module docstring).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def worker(args: argparse.Namespace) -> None:
    """One process: warm up, then either time ``--steps`` steps or measure their activation memory."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch, size = INPUTS[args.input]
    model = build(args.model, args.variant).to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    params = sum(p.numel() for p in model.parameters())
    if args.compile:
        model = torch.compile(model)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    gc.collect()
    measure = time_steps if args.measure == "time" else activation_memory
    print(json.dumps({**measure(step, device, args.steps), "params": params}))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, device: torch.device, steps: int) -> dict[str, float]:
    """Median wall-clock and CPU time of ``steps`` steps."""
    times, cpu_times = [], []
    for _ in range(steps):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {"time": statistics.median(times), "cpu_time": statistics.median(cpu_times)}


def activation_memory(step, device: torch.device, steps: int) -> dict[str, float]:
    """Peak memory of ``steps`` steps above what the process held after warm-up, in MiB."""
    _sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_mib()
        reset_peak_rss()  # the peak of building the model can exceed a small map's steps
    for _ in range(steps):
        step()
    _sync(device)
    if device.type == "cuda":
        return {"act_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
    return {"act_mib": peak_rss_mib() - base}


def sample(args: argparse.Namespace, model: str, inp: str, variant: str, measure: str) -> dict:
    """One fresh worker process measuring ``measure`` (the memory ones with the pinned allocator)."""
    return run_worker("train_cost.py", [
        "--model", model, "--variant", variant, "--input", inp, "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device,
        "--measure", measure, *(["--compile"] if args.compile else []),
    ], env=MALLOC_ENV if measure == "memory" else None)


def measure_setting(args: argparse.Namespace, model: str, inp: str, variants: list[str]) -> list[dict]:
    """Every variant of one model and input, interleaved round by round; prints and returns the rows."""
    times: dict[str, list[dict]] = {v: [] for v in variants}
    memory: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(max(args.rounds, args.memory_rounds)):
        for variant in variants:
            if r < args.rounds:
                times[variant].append(sample(args, model, inp, variant, "time"))
            if r < args.memory_rounds:
                memory[variant].append(sample(args, model, inp, variant, "memory"))
    plain_t = _median(times.get("plain"), "time")
    plain_c = _median(times.get("plain"), "cpu_time")
    plain_m = _median(memory.get("plain"), "act_mib")
    batch, size = INPUTS[inp]
    rows = []
    for variant in variants:
        t = summary([s["time"] for s in times[variant]])
        c = summary([s["cpu_time"] for s in times[variant]])
        m = summary([s["act_mib"] for s in memory[variant]]) if memory[variant] else None
        r = summary([s["time"] / plain_t for s in times[variant]]) if plain_t else None
        row = {"model": model, "input": inp, "variant": variant, "time": t, "cpu_time": c, "act_mib": m,
               "time_ratio": r, "cpu_ratio": c["median"] / plain_c if plain_c else None,
               "mem_ratio": m["median"] / plain_m if m and plain_m else None,
               "mac_floor": mac_floor(model, variant, batch, size), "params": times[variant][0]["params"]}
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    """One markdown table row (``-`` where a ratio has no plain run to divide by)."""
    r, m = row["time_ratio"], row["act_mib"]
    rtxt = f"{r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]" if r else "-"
    mtxt = f"{m['median']:.0f}" if m else "-"
    return (f"| {row['model']} | {row['input']} | {row['variant']} | {rtxt} | {row['mac_floor']:.2f} "
            f"| {row['time']['median']:.3f} | {_ratio(row['cpu_ratio'])} | {_ratio(row['mem_ratio'])} | {mtxt} |")


def _median(samples: list[dict] | None, key: str) -> float | None:
    return summary([s[key] for s in samples])["median"] if samples else None


def _ratio(value: float | None) -> str:
    return f"{value:.2f}" if value else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--variant", default="plain")
    parser.add_argument("--input", default="8x224", choices=list(INPUTS))
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--inputs", default="8x224,32x32")
    parser.add_argument("--variants", default=",".join(VARIANTS + tuple(available_references())),
                        help="default: every variant, the reference implementations where configured")
    parser.add_argument("--rounds", type=int, default=5, help="timed processes per variant")
    parser.add_argument("--memory-rounds", type=int, default=2, help="memory processes per variant")
    parser.add_argument("--measure", default="time", choices=["time", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="run every variant under torch.compile")
    parser.add_argument("--out", default="out/benchmarks/train_cost.json")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    # The timed workers inherit this environment: they must run with the default allocator.
    for key in MALLOC_ENV:
        os.environ.pop(key, None)
    variants = args.variants.split(",")
    results: dict = {"machine": dict(machine(), threads=args.threads), "rounds": args.rounds,
                     "memory_rounds": args.memory_rounds, "rows": [], "compiled": args.compile}
    print("| model | input | variant | step time / plain (median [min, max]) | MAC floor | step s "
          "| CPU time / plain | act. memory / plain | act. MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for inp in args.inputs.split(","):
            results["rows"] += measure_setting(args, model, inp, variants)
    write_json(args.out, results)
    print(f"\nwritten {args.out}; machine: {results['machine']}")


if __name__ == "__main__":
    main()
