"""Reproduction study: plain vs DBB-all vs DyRep (dbb, online) vs OREPA-all on real Fashion-MNIST.

The same VGG-style network (:func:`dyrep_fx.demo.make_net`), recipe, data order and seeds for every
variant; each (seed, variant) trains in a fresh process (so peak memory is its own), seeds outer and
variants inner so machine load spreads over all variants alike. Reported per variant: test accuracy
mean +- std over the seeds (of the trained model, and of the folded model loaded into the unmodified
network), seconds per epoch, peak RSS, parameters during training and after folding, and for DyRep the
final structure (sites grown, branches that survived).

    .venv/bin/python benchmarks/accuracy_study.py                  # the README's table (~30 min on 2 idle cores)
    .venv/bin/python benchmarks/accuracy_study.py --seeds 0 --epochs 1 --train-limit 2000   # smoke run
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_json  # noqa: E402

from dyrep_fx.demo import DemoConfig, run_variant  # noqa: E402

#: Study variant -> the demo's variant name.
STUDY_VARIANTS = {"plain": "plain", "dbb_all": "dbb", "dyrep_dbb": "dyrep_dbb", "dyrep_online": "dyrep_online",
                  "orepa_all": "orepa"}


def study_config(args: argparse.Namespace) -> DemoConfig:
    """The recipe shared by every run (seed set per run)."""
    return DemoConfig(epochs=args.epochs, train_limit=args.train_limit, test_limit=args.test_limit,
                      batch_size=args.batch_size, lr=args.lr, width=args.width,
                      grows_per_epoch=args.grows_per_epoch, until_fraction=args.until_fraction,
                      threads=args.threads, progress=False, dyrep_options=parse_options(args.dyrep_option))


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["metric=abs", "init_scale=0.1"]`` -> ``{"metric": "abs", "init_scale": 0.1}`` (numbers parsed)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise SystemExit(f"--dyrep-option wants key=value, got {pair!r}")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


def run_all(config: DemoConfig, variants: list[str], seeds: list[int], jobs: int = 1) -> list[dict[str, Any]]:
    """Train every (seed, variant) in a fresh process; seeds outer, variants inner."""
    plan = [(seed, variant) for seed in seeds for variant in variants]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = [pool.submit(run_variant, STUDY_VARIANTS[v], replace(config, seed=s)) for s, v in plan]
        runs = []
        for (seed, variant), future in zip(plan, futures):
            run = future.result()
            run.update(study_variant=variant, seed=seed)
            print(f"seed {seed} {variant}: test acc {100 * run['test_acc']:.2f}%, "
                  f"{run['seconds_per_epoch']:.1f} s/epoch", flush=True)
            runs.append(run)
    return runs


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def structure_summary(run: dict[str, Any]) -> dict[str, Any]:
    """Which sites grew and which branches survived, as counts and per-site kinds."""
    sites = {name: site["kinds"] for name, site in run["final_structure"].items() if site["kinds"]}
    return {"sites_grown": len(sites), "branches": sum(len(k) for k in sites.values()), "sites": sites}


def summarise(runs: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """One row per variant: accuracy mean +- std over seeds, cost and structure."""
    rows = []
    for variant in variants:
        mine = [r for r in runs if r["study_variant"] == variant]
        acc, acc_std = _mean_std([100 * r["test_acc"] for r in mine])
        folded, folded_std = _mean_std([100 * r["folded_test_acc"] for r in mine])
        structures = [structure_summary(r) for r in mine]
        rows.append({
            "variant": variant, "seeds": [r["seed"] for r in mine],
            "test_acc_mean": acc, "test_acc_std": acc_std,
            "folded_acc_mean": folded, "folded_acc_std": folded_std,
            "per_seed_acc": [100 * r["test_acc"] for r in mine],
            "seconds_per_epoch": statistics.median(r["seconds_per_epoch"] for r in mine),
            "wall_seconds": sum(r["seconds_per_epoch"] * len(r["epochs"]) for r in mine),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in mine),
            "params_training_peak": max(r["params_training_peak"] for r in mine),
            "params_folded": mine[0]["params_folded"],
            "max_fold_error": max(r["fold_max_abs_error"] for r in mine),
            "sites_grown": [s["sites_grown"] for s in structures],
            "branches": [s["branches"] for s in structures],
            "structures": [s["sites"] for s in structures],
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The README table."""
    plain = next((r for r in rows if r["variant"] == "plain"), None)
    lines = ["| variant | test acc % (mean ± std) | folded acc % | s/epoch (× plain) | peak RSS MiB "
             "| params: training peak / folded | sites grown / branches at end (per seed) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['seconds_per_epoch'] / plain['seconds_per_epoch']:.2f}×" if plain else "no plain run"
        grown = ", ".join(f"{g}/{b}" for g, b in zip(r["sites_grown"], r["branches"]))
        lines.append(f"| {r['variant']} | {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f} "
                     f"| {r['folded_acc_mean']:.2f} | {r['seconds_per_epoch']:.1f} ({ratio}) "
                     f"| {r['peak_rss_mib']:.0f} | {r['params_training_peak']:,} / {r['params_folded']:,} | {grown} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(STUDY_VARIANTS), choices=list(STUDY_VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-limit", type=int, default=12000, help="balanced training subset (60000 = all)")
    p.add_argument("--test-limit", type=int, default=None, help="default: the whole 10k test set")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--grows-per-epoch", type=int, default=2)
    p.add_argument("--until-fraction", type=float, default=0.75)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (this small net gains little from more)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (timings then share the CPU)")
    p.add_argument("--dyrep-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra dyrep_fx.DyRep argument for the DyRep variants, e.g. metric=abs (repeatable)")
    p.add_argument("--out", default="out/benchmarks/accuracy_study.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = study_config(args)
    start = time.perf_counter()
    runs = run_all(config, args.variants, args.seeds, args.jobs)
    rows = summarise(runs, args.variants)
    report = {"machine": machine(), "recipe": asdict(config), "seeds": args.seeds, "jobs": args.jobs,
              "study_seconds": time.perf_counter() - start, "rows": rows, "runs": runs}
    write_json(args.out, report)
    print(markdown(rows))
    print(f"\n{len(runs)} runs in {report['study_seconds'] / 60:.1f} min; JSON: {args.out}")
    return report


if __name__ == "__main__":
    main()
