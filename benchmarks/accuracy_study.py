"""The reproduction study: is there a re-parameterization gain at this scale, and does DyRep find it
better than growing at random sites?

Full Fashion-MNIST (60k train, 10k test) with random crop (padding 2) and horizontal flip, the study
network (:data:`dyrep_fx_examples.demo.NET_LAYOUTS` ``"study"``: ten 3x3 conv + BN + ReLU, VGG style), SGD
momentum 0.9, cosine learning rate, weight decay 1e-4 on every parameter (DyRep's CIFAR recipe), the
same data order and augmentation draws per seed for every variant. Each (variant, seed) trains in a
fresh process with one torch thread and writes its result as JSON under ``--results``; a re-run skips
finished runs, so the study can run in parts (and across sessions).

* stage 1, the ceiling: ``plain``, ``dbb_all`` (every conv with DBB's branches, dbb mode) and
  ``orepa_all`` (every conv with OREPA's linear branches, online mode), 5 seeds;
* stage 2, DyRep in online and dbb mode with the reference-parity decisions (signed synflow, inner
  convs offered at once), the library's defaults, and random sites (the same schedule, so the same
  number of growths): a step every 6.25 % of training until 75 %.

Decision rule, fixed before the runs: a variant is said to beat another only when the mean of the
paired (same-seed) accuracy differences exceeds two standard errors of that mean.

    .venv/bin/python benchmarks/accuracy_study.py --stage 1            # 15 runs, 2 at a time
    .venv/bin/python benchmarks/accuracy_study.py --stage 2 --seeds 0 1 2
    .venv/bin/python benchmarks/accuracy_study.py --report             # tables and plot from the JSON files
    .venv/bin/python benchmarks/accuracy_study.py --report --docs      # ... and the READMEs' study blocks
    .venv/bin/python benchmarks/accuracy_study.py --smoke              # a tiny run of every variant
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_json  # noqa: E402

from dyrep_fx.defaults import PAPER_SCHEDULE, STD_GATE  # noqa: E402
from dyrep_fx_examples.demo import DemoConfig, make_net, multiply_adds, run_variant  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "study"

#: Study variant -> (the demo's variant, extra DyRep arguments).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("plain", {}),
    "dbb_all": ("dbb_all", {}),
    "orepa_all": ("orepa_all", {}),
    "dyrep_online_parity": ("dyrep_online", {**PAPER_SCHEDULE, "metric": "synflow", "nested": "open"}),
    "dyrep_online": ("dyrep_online", dict(PAPER_SCHEDULE)),
    "dyrep_online_random": ("dyrep_online", {**PAPER_SCHEDULE, "metric": "random"}),
    "dyrep_dbb_parity": ("dyrep_dbb", {**PAPER_SCHEDULE, "metric": "synflow", "nested": "open"}),
    "dyrep_dbb": ("dyrep_dbb", dict(PAPER_SCHEDULE)),
    "dyrep_dbb_random": ("dyrep_dbb", {**PAPER_SCHEDULE, "metric": "random"}),
}
STAGES = {
    1: ["plain", "dbb_all", "orepa_all"],
    2: ["dyrep_online_parity", "dyrep_online", "dyrep_online_random",
        "dyrep_dbb_parity", "dyrep_dbb", "dyrep_dbb_random"],
}
#: Which variant each one is compared with, paired by seed.
CONTROLS = {"dyrep_online_parity": "dyrep_online_random", "dyrep_online": "dyrep_online_random",
            "dyrep_dbb_parity": "dyrep_dbb_random", "dyrep_dbb": "dyrep_dbb_random"}

RECIPE = DemoConfig(epochs=12, train_limit=None, test_limit=None, batch_size=128, lr=0.1, weight_decay=1e-4,
                    width=8, net="study", augment=True, step_fraction=0.0625, until_fraction=0.75, threads=1,
                    progress=False)
SMOKE = replace(RECIPE, epochs=1, train_limit=2000, test_limit=1000, step_fraction=0.2, until_fraction=0.8)


# -- running -----------------------------------------------------------------------------------------
def run_path(results: Path, variant: str, seed: int) -> Path:
    """Where the JSON of one run lives."""
    return results / variant / f"seed{seed}.json"


#: Demo settings that do not change what a study run trains (a run trains one variant, by name).
NOT_RECIPE = ("variants",)


def recipe_record(recipe: DemoConfig | dict[str, Any]) -> dict[str, Any]:
    """The recipe as its JSON reads back (tuples become lists), without the seed and :data:`NOT_RECIPE`:
    runs compare on this. Takes a config or a saved record."""
    record = recipe if isinstance(recipe, dict) else json.loads(json.dumps(asdict(replace(recipe, seed=0))))
    return {k: v for k, v in record.items() if k not in NOT_RECIPE}


def run_one(variant: str, seed: int, recipe: DemoConfig, results: Path) -> dict[str, Any]:
    """Train one (variant, seed) in this process and write its JSON."""
    demo_variant, options = VARIANTS[variant]
    config = replace(recipe, seed=seed, dyrep_options=dict(options))
    started = time.time()
    run = run_variant(demo_variant, config)
    run.update(study_variant=variant, seed=seed, recipe=recipe_record(recipe), machine=machine(),
               started=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)))
    write_json(run_path(results, variant, seed), run)
    return run


def pending(variants: list[str], seeds: list[int], recipe: DemoConfig, results: Path) -> list[tuple[str, int]]:
    """The (variant, seed) runs without a result for this recipe, seeds outer so load spreads alike."""
    todo = []
    for seed in seeds:
        for variant in variants:
            path = run_path(results, variant, seed)
            if path.exists():
                saved = recipe_record(json.loads(path.read_text())["recipe"])
                if saved != recipe_record(recipe):
                    raise SystemExit(f"{path} was trained with another recipe; use another --results folder")
                continue
            todo.append((variant, seed))
    return todo


def run_all(todo: list[tuple[str, int]], recipe: DemoConfig, results: Path, jobs: int) -> None:
    """Train every pending run, ``jobs`` fresh processes at a time."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = {pool.submit(run_one, v, s, recipe, results): (v, s) for v, s in todo}
        for future in concurrent.futures.as_completed(futures):
            variant, seed = futures[future]
            run = future.result()
            print(f"{variant} seed {seed}: test acc {100 * run['test_acc']:.2f}%, "
                  f"{run['seconds_per_epoch']:.0f} s/epoch ({run['cpu_seconds_per_epoch']:.0f} s CPU)", flush=True)


# -- statistics --------------------------------------------------------------------------------------
def load_runs(results: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """``{variant: {seed: run}}`` of every finished run."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(results.glob("*/seed*.json")):
        run = json.loads(path.read_text())
        runs.setdefault(run["study_variant"], {})[run["seed"]] = run
    return runs


def paired(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """Mean and standard error of ``acc(a) - acc(b)`` over the seeds both have (points of %)."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [100 * (a[s]["test_acc"] - b[s]["test_acc"]) for s in seeds]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    if len(seeds) < 3:  # two differences give an SE too unreliable for the rule
        verdict = "too few seeds"
    else:
        verdict = "higher" if mean > 2 * se else "lower" if mean < -2 * se else "no difference"
    return {"seeds": seeds, "mean": mean, "se": se, "diffs": diffs, "verdict": verdict}


def median_ratio(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], key: str) -> float | None:
    """Median over the seeds both have of ``a[seed][key] / b[seed][key]``; ``None`` without a common seed."""
    seeds = sorted(set(a) & set(b))
    return statistics.median(a[s][key] / b[s][key] for s in seeds) if seeds else None


def growth_summary(run: dict[str, Any]) -> dict[str, Any]:
    """Growths, cuts and nested growths of one DyRep run, from its history."""
    history = run.get("branch_history", [])
    grown = [name for event in history for name in event["grown"]]
    previous: set[str] = set()
    into_last = 0
    for event in history:
        for name in event["grown"]:
            if any(name.startswith(p + ".") for p in previous):
                into_last += 1
        previous = set(event["grown"]) or previous
    spreads = [v["std"] for event in history for v in event.get("verdicts", {}).values()]
    return {"growths": len(grown), "nested_growths": sum(".branches." in n for n in grown),
            "max_spread": max(spreads, default=0.0),
            "growths_into_last_grown": into_last,
            "cuts": sum(len(kinds) for event in history for kinds in event["cut"].values()),
            "cuts_per_step": [sum(len(k) for k in event["cut"].values()) for event in history],
            "sites": grown}


def summarise(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per variant: accuracy, paired differences to plain and to the random control, cost, structure."""
    plain = runs.get("plain", {})
    rows = []
    for variant in VARIANTS:
        mine = runs.get(variant)
        if not mine:
            continue
        accs = [100 * r["test_acc"] for r in mine.values()]
        any_run = next(iter(mine.values()))
        row = {
            "variant": variant, "seeds": sorted(mine), "acc_mean": statistics.fmean(accs),
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "folded_equal": all(r["folded_test_acc"] == r["test_acc"] for r in mine.values()),
            "vs_plain": paired(mine, plain) if variant != "plain" else None,
            "vs_control": paired(mine, runs.get(CONTROLS[variant], {})) if variant in CONTROLS else None,
            "wall_ratio": median_ratio(mine, plain, "seconds_per_epoch"),
            "cpu_ratio": median_ratio(mine, plain, "cpu_seconds_per_epoch"),
            "cpu_seconds_per_epoch": statistics.median(r["cpu_seconds_per_epoch"] for r in mine.values()),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in mine.values()),
            "params_training_peak": max(r["params_training_peak"] for r in mine.values()),
            "params_folded": any_run["params_folded"],
            "growth": {s: growth_summary(r) for s, r in sorted(mine.items())} if r_has_history(mine) else None,
        }
        rows.append(row)
    return {"rows": rows}


def r_has_history(mine: dict[int, dict[str, Any]]) -> bool:
    return any(r.get("branch_history") for r in mine.values())


def _fmt_pair(p: dict[str, Any] | None) -> str:
    return "" if p is None else f"{p['mean']:+.2f} ± {p['se']:.2f} ({p['verdict']})"


def markdown(summary: dict[str, Any]) -> str:
    """The tables for the benchmarks README."""
    lines = ["| variant | seeds | test acc % (mean ± std) | Δ vs plain (paired, ± SE) | Δ vs random sites "
             "| CPU s/epoch (× plain) | peak RSS MiB | params training / folded |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        ratio = "" if r["cpu_ratio"] is None else f" ({r['cpu_ratio']:.2f}×)"
        lines.append(f"| {r['variant']} | {len(r['seeds'])} | {r['acc_mean']:.2f} ± {r['acc_std']:.2f} "
                     f"| {_fmt_pair(r['vs_plain'])} | {_fmt_pair(r['vs_control'])} "
                     f"| {r['cpu_seconds_per_epoch']:.0f}{ratio} | {r['peak_rss_mib']:.0f} "
                     f"| {r['params_training_peak']:,} / {r['params_folded']:,} |")
    growth = [r for r in summary["rows"] if r["growth"]]
    if growth:
        lines += ["", "| variant | seed | growths (nested) | into the site grown the step before | cuts per step "
                  f"| largest importance spread (Dep gate {STD_GATE:g}) | sites grown, in order |", "|---|---|---|---|---|---|---|"]
        for r in growth:
            for seed, g in r["growth"].items():
                lines.append(f"| {r['variant']} | {seed} | {g['growths']} ({g['nested_growths']}) "
                             f"| {g['growths_into_last_grown']} | {g['cuts_per_step']} | {g['max_spread']:.3f} "
                             f"| {', '.join(g['sites'])} |")
    return "\n".join(lines)


# -- prose for the READMEs ---------------------------------------------------------------------------
STAGE2 = STAGES[2]


def pair_text(p: dict[str, Any] | None) -> str:
    """One paired difference in words, with the decision rule's verdict (or why there is none)."""
    if p is None:
        return "(fewer than 2 paired seeds yet)"
    text = f"{p['mean']:+.2f} ± {p['se']:.2f} points over {len(p['seeds'])} seeds"
    return f"{text} (too few seeds for the rule: no claim)" if p["verdict"] == "too few seeds" else f"{text} ({p['verdict']})"


def stage_texts(summary: dict[str, Any]) -> tuple[str, str]:
    """``(stage 1, stage 2)`` paragraphs: each variant against plain (and its random control)."""
    rows = {r["variant"]: r for r in summary["rows"]}
    ceiling = [v for v in STAGES[1] if v != "plain" and v in rows]
    stage1 = "**Stage 1 (the ceiling)**: " + "; ".join(f"`{v}` vs plain {pair_text(rows[v]['vs_plain'])}"
                                                       for v in ceiling) + ". "
    if any(rows[v]["vs_plain"] and rows[v]["vs_plain"]["verdict"] == "higher" for v in ceiling):
        stage1 += "By the rule above a static re-parameterization beats plain: stage 2 runs 5 seeds."
    else:
        stage1 += ("By the rule above no static re-parameterization beats plain training at this scale, so this "
                   "study cannot show DyRep's claim either; stage 2 runs with 3 seeds, as decided before the runs.")
    done = [v for v in STAGE2 if v in rows]
    if not done:
        return stage1, "**Stage 2 (DyRep)** has not started; the script resumes where it stopped."
    parts = []
    for v in done:
        text = f"`{v}` vs plain {pair_text(rows[v]['vs_plain'])}"
        if v in CONTROLS:
            text += f", vs random sites {pair_text(rows[v]['vs_control'])}"
        parts.append(text)
    stage2 = "**Stage 2 (DyRep)**: " + "; ".join(parts) + "."
    unfinished = [v for v in STAGE2 if v not in rows or len(rows[v]["seeds"]) < 3]
    if unfinished:
        stage2 += f" Unfinished (the script resumes them): {', '.join(unfinished)}."
    else:
        pairs = [rows[v][key] for v in STAGE2 for key in ("vs_plain", "vs_control") if rows[v][key]]
        if all(p["verdict"] == "no difference" for p in pairs):
            stage2 += (" Every DyRep variant is within noise of plain training and of growing at random sites: "
                       "at this scale the study finds no gain, and no site choice better than chance.")
    return stage1, stage2


def measured_on(runs: dict[str, dict[int, dict[str, Any]]]) -> str:
    """The dates the runs started, e.g. ``2026-11-29 to 2026-11-30``."""
    days = sorted({r["started"][:10] for mine in runs.values() for r in mine.values() if "started" in r})
    return "" if not days else days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def write_docs(summary: dict[str, Any], when: str, readme: Path, benchmarks_readme: Path) -> None:
    """Replace the study's marked blocks: the full status in the benchmarks README, the verdicts in README."""
    stage1, stage2 = stage_texts(summary)
    status = (f"Measured {when} on a 2-core CPU machine, two runs at a time (regenerated by `--report`).\n\n"
              f"{markdown(summary)}\n\n{stage1}\n\n{stage2}")
    headline = (f"The reproduction study (full Fashion-MNIST with augmentation, a ten-conv network, 12 epochs, "
                f"paired seeds, a gain claimed only beyond two standard errors; measured {when}):\n\n"
                f"{stage1}\n\n{stage2}")
    for path, text in ((benchmarks_readme, status), (readme, headline)):
        doc = path.read_text()
        if "<!-- study -->" not in doc:
            raise SystemExit(f"{path} has no <!-- study --> ... <!-- /study --> block to fill")
        start, end = doc.index("<!-- study -->"), doc.index("<!-- /study -->")
        path.write_text(doc[:start] + "<!-- study -->\n" + text + "\n" + doc[end:])


def plot(summary: dict[str, Any], path: Path) -> None:
    """Accuracy (mean ± SE of the paired difference to plain) against the CPU-time ratio to plain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for r in summary["rows"]:
        if r["variant"] == "plain" or r["vs_plain"] is None or r["cpu_ratio"] is None:
            continue
        # (a legend, not labels at the points: the online variants sit within 0.1x of each other)
        ax.errorbar(r["cpu_ratio"], r["vs_plain"]["mean"], yerr=2 * r["vs_plain"]["se"], fmt="o", capsize=4,
                    label=f"{r['variant']} ({len(r['vs_plain']['seeds'])} seeds)")
    ax.axhline(0.0, color="grey", lw=1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set(xlabel="training CPU time per epoch / plain", ylabel="test accuracy − plain (points, ± 2 SE)",
           title="Fashion-MNIST study: gain over plain vs training cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: Path, docs: bool = False) -> dict[str, Any]:
    """Write ``summary.json``, ``tables.md`` and ``study.png`` next to the runs (and, with ``docs``, the
    study's blocks in README.md and benchmarks/README.md); return the summary."""
    runs = load_runs(results)
    summary = summarise(runs)
    summary["recipe"] = recipe_record(RECIPE)
    net = make_net(RECIPE.width, net=RECIPE.net)
    summary["network"] = {"convs": sum(1 for m in net.modules() if m.__class__.__name__ == "Conv2d"),
                          "parameters": sum(p.numel() for p in net.parameters()),
                          "multiply_adds": multiply_adds(net)}
    write_json(results / "summary.json", summary)
    (results / "tables.md").write_text(markdown(summary) + "\n")
    if summary["rows"]:
        plot(summary, results / "study.png")
    if docs:
        root = Path(__file__).resolve().parents[1]
        write_docs(summary, measured_on(runs), root / "README.md", root / "benchmarks" / "README.md")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", type=int, choices=sorted(STAGES), action="append", help="repeatable")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="instead of --stage")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--report", action="store_true", help="only summarise the finished runs")
    p.add_argument("--docs", action="store_true", help="with --report: fill the study blocks of the READMEs")
    p.add_argument("--smoke", action="store_true", help="a tiny recipe, results under out/study_smoke")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    recipe = SMOKE if args.smoke else RECIPE
    results = Path("out/study_smoke") if args.smoke else args.results
    if not args.report:
        variants = args.variants or [v for stage in (args.stage or sorted(STAGES)) for v in STAGES[stage]]
        todo = pending(variants, args.seeds, recipe, results)
        print(f"{len(todo)} runs to train ({len(variants) * len(args.seeds) - len(todo)} already done)", flush=True)
        run_all(todo, recipe, results, args.jobs)
    summary = report(results, docs=args.docs and not args.smoke)
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
