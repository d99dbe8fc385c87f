"""Training cost of DyRep / DBB / OREPA variants relative to the plain model, measured side by side.

One training step = forward + backward + SGD step. Every (variant, round) runs in a fresh process,
variants interleaved round by round; reported: median step time (wall clock, and the process's CPU
time, which other jobs on a shared machine disturb less) and activation peak memory
(CPU: peak RSS minus the RSS after warm-up with ``MALLOC_MMAP_THRESHOLD_`` pinned so freed
activations go back to the OS; CUDA: ``max_memory_allocated`` minus the allocation after warm-up).

    .venv/bin/python benchmarks/train_cost.py                      # ResNet-18/50 at 8x224 and 32x32
    .venv/bin/python benchmarks/train_cost.py --models resnet18 --rounds 3 --device cuda
    .venv/bin/python benchmarks/train_cost.py --compile     # every variant under torch.compile (plain too)

With ``--compile`` every model, plain included, runs under ``torch.compile`` (compilation happens in the
warm-up steps, which are not timed), so the ratios compare compiled with compiled.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, peak_rss_mib, rss_mib, run_worker, summary, write_json  # noqa: E402
from variants import VARIANTS, build  # noqa: E402

INPUTS = {"8x224": (8, 224), "32x32": (32, 32)}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def worker(args: argparse.Namespace) -> None:
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
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_mib()
    times, cpu_times = [], []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if device.type == "cuda":
        act = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        act = peak_rss_mib() - base
    print(json.dumps({"time": sorted(times)[len(times) // 2], "cpu_time": sorted(cpu_times)[len(cpu_times) // 2],
                      "act_mib": act,
                      "params": params}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--variant", default="plain")
    parser.add_argument("--input", default="8x224", choices=list(INPUTS))
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--inputs", default="8x224,32x32")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=5)
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
    variants = args.variants.split(",")
    results: dict = {"machine": dict(machine(), threads=args.threads), "rounds": args.rounds, "rows": [],
                     "compiled": args.compile}
    print("| model | input | variant | step time / plain (median [min, max]) | step s | CPU time / plain "
          "| act. memory / plain | act. MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for inp in args.inputs.split(","):
            samples: dict[str, list[dict]] = {v: [] for v in variants}
            for _ in range(args.rounds):
                for variant in variants:
                    samples[variant].append(run_worker("train_cost.py", [
                        "--model", model, "--variant", variant, "--input", inp, "--steps", str(args.steps),
                        "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device,
                        *(["--compile"] if args.compile else []),
                    ], env=MALLOC_ENV))
            plain = {key: summary([s[key] for s in samples["plain"]])["median"] if "plain" in samples else None
                     for key in ("time", "act_mib", "cpu_time")}
            plain_t, plain_m, plain_c = plain["time"], plain["act_mib"], plain["cpu_time"]
            for variant in variants:
                t = summary([s["time"] for s in samples[variant]])
                m = summary([s["act_mib"] for s in samples[variant]])
                ratios = [s["time"] / plain_t for s in samples[variant]] if plain_t else []
                r = summary(ratios) if ratios else None
                c = summary([s["cpu_time"] for s in samples[variant]])
                row = {"model": model, "input": inp, "variant": variant, "time": t, "cpu_time": c, "act_mib": m,
                       "time_ratio": r, "cpu_ratio": c["median"] / plain_c if plain_c else None,
                       "mem_ratio": m["median"] / plain_m if plain_m else None,
                       "params": samples[variant][0]["params"]}
                results["rows"].append(row)
                rtxt = f"{r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]" if r else "-"
                mtxt = f"{row['mem_ratio']:.2f}" if row["mem_ratio"] else "-"
                ctxt = f"{row['cpu_ratio']:.2f}" if row["cpu_ratio"] else "-"
                print(f"| {model} | {inp} | {variant} | {rtxt} | {t['median']:.3f} | {ctxt} | {mtxt} "
                      f"| {m['median']:.0f} |", flush=True)
    write_json(args.out, results)
    print(f"\nwritten {args.out}; machine: {results['machine']}")


if __name__ == "__main__":
    main()
