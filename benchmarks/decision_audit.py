"""What DyRep's decisions look like on the demo recipe: where growth goes, how often Dep cuts.

Trains the demo's DyRep variants (``dyrep_online``, ``dyrep_dbb``: the demo network, 6,000 Fashion-MNIST
images, 3 epochs, a step every 8 % of training until 75 %) over seeds, once with the library's default
decisions and once with the reference-parity ones (signed synflow, inner convs offered at once), and
reports per run the growths, the nested growths, the growths into the inner conv of the site grown at
the step before, and the cuts. Each run's JSON goes under ``--results``; finished runs are skipped.

    .venv/bin/python benchmarks/decision_audit.py                 # 12 runs, 2 at a time (~10 min on 2 cores)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_study import growth_summary  # noqa: E402
from common import machine, write_json  # noqa: E402

from dyrep_fx.defaults import PAPER_SCHEDULE  # noqa: E402
from dyrep_fx_examples.demo import DemoConfig, run_variant  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "decision_audit"
#: ``default``: the library's defaults when the audit ran (the paper's schedule with ``snip``).
SETTINGS: dict[str, dict[str, Any]] = {"default": dict(PAPER_SCHEDULE),
                                       "parity": {**PAPER_SCHEDULE, "metric": "synflow", "nested": "open"}}
MODES = ("dyrep_online", "dyrep_dbb")
RECIPE = replace(DemoConfig(), threads=1, progress=False)


def run_one(setting: str, variant: str, seed: int, results: Path) -> dict[str, Any]:
    """Train one demo DyRep run and write its JSON."""
    config = replace(RECIPE, seed=seed, dyrep_options=dict(SETTINGS[setting]))
    run = run_variant(variant, config)
    run.update(setting=setting, seed=seed, recipe=asdict(replace(RECIPE, seed=0)), machine=machine(),
               growth=growth_summary(run))
    write_json(results / setting / variant / f"seed{seed}.json", run)
    return run


def table(results: Path) -> str:
    """Per setting and mode: growths, nested, into the last-grown site, cuts; and the fraction."""
    lines = ["| setting | variant | seeds | growth steps | nested growths | into the site grown the step before "
             "| fraction | cuts | test acc % per seed |", "|---|---|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        for variant in MODES:
            runs = [json.loads(p.read_text()) for p in sorted((results / setting / variant).glob("seed*.json"))]
            if not runs:
                continue
            growths = sum(r["growth"]["growths"] for r in runs)
            nested = sum(r["growth"]["nested_growths"] for r in runs)
            into = sum(r["growth"]["growths_into_last_grown"] for r in runs)
            cuts = sum(r["growth"]["cuts"] for r in runs)
            accs = ", ".join(f"{100 * r['test_acc']:.2f}" for r in runs)
            lines.append(f"| {setting} | {variant} | {len(runs)} | {growths} | {nested} | {into} "
                         f"| {into / max(growths, 1):.2f} | {cuts} | {accs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    todo = [(s, v, seed) for seed in args.seeds for s in args.settings for v in MODES
            if not (args.results / s / v / f"seed{seed}.json").exists()]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        for future in concurrent.futures.as_completed([pool.submit(run_one, *t, args.results) for t in todo]):
            future.result()
    text = table(args.results)
    (args.results / "table.md").write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
