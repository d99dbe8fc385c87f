"""Inference parity: a folded DyRep model against the plain model, eval mode, same input, side by side.

The folded model is the plain architecture, so the ratio should be 1.00 within noise. Both models are
timed in one process, interleaved call by call; ``MALLOC_*`` is pinned (page faults otherwise dominate
small differences on CPU). ``--compile`` also times ``torch.compile`` of both.

    .venv/bin/python benchmarks/inference_parity.py --models resnet18,resnet50 --input 8x224
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, summary, write_json  # noqa: E402
from variants import build  # noqa: E402

import dyrep_fx  # noqa: E402

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def interleaved(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(x)
        for _ in range(rounds):
            for name, m in models.items():
                if x.is_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                m(x)
                if x.is_cuda:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--input", default="8x224")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="out/benchmarks/inference_parity.json")
    args = parser.parse_args()
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, **MALLOC_ENV))
    torch.set_num_threads(args.threads)
    batch, size = map(int, args.input.split("x"))
    rows = []
    print("| model | folded / plain (median [min, max]) | plain ms | folded ms | compiled: folded / plain "
          "| max abs diff |\n|---|---|---|---|---|---|")
    for name in args.models.split(","):
        plain = build(name, "plain").to(args.device).eval()
        grown = build(name, "dyrep_online").to(args.device)
        folded = dyrep_fx.fold(grown).eval()
        x = torch.randn(batch, 3, size, size, device=args.device)
        with torch.no_grad():
            diff = float((folded(x) - grown.eval()(x)).abs().max())
        models = {"plain": plain, "folded": folded}
        if args.compile:
            models.update({"plain_compiled": torch.compile(plain), "folded_compiled": torch.compile(folded)})
        times = interleaved(models, x, args.rounds)
        ratios = [f / p for f, p in zip(times["folded"], times["plain"])]
        row = {"model": name, "ratio": summary(ratios), "plain": summary(times["plain"]),
               "folded": summary(times["folded"]), "max_abs_diff_vs_grown": diff}
        if args.compile:
            row["compiled_ratio"] = summary([f / p for f, p in zip(times["folded_compiled"], times["plain_compiled"])])
        rows.append(row)
        r, c = row["ratio"], row.get("compiled_ratio")
        ctxt = f"{c['median']:.3f} [{c['min']:.2f}, {c['max']:.2f}]" if c else "-"
        print(f"| {name} | {r['median']:.3f} [{r['min']:.2f}, {r['max']:.2f}] | {1e3 * row['plain']['median']:.1f} "
              f"| {1e3 * row['folded']['median']:.1f} | {ctxt} | {diff:.1e} |", flush=True)
    write_json(args.out, {"machine": dict(machine(), threads=args.threads), "input": args.input, "rows": rows})
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
