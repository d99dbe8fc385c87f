"""The depth sweep: where does static re-parameterization pay on shortcut-free nets?

The study (``accuracy_study.py``) found every variant within noise of plain training on its ten-conv
network. Re-parameterization is adopted where optimisation is hard: deep plain (shortcut-free) nets,
RepVGG's whole argument. This sweep trains the same VGG-style family at 10, 20, 30 (and 40) convs
(:data:`dyrep_fx.demo.NET_LAYOUTS` ``depthN``) with every static variant, paired by seed (same data
order and augmentation draws per seed):

* ``plain``; ``orepa_all`` (OREPA's kinds, online); ``dbb_all`` (DBB's kinds, dbb mode);
* ``rep_all_online`` / ``rep_all_dbb``: every DyRep kind that applies to each 3x3 conv (identity
  included where input and output match: RepVGG's recipe), in online and in dbb mode;
* ``rep_all_online_wn``, an ablation: ``rep_all_online`` with every path's kernel weight-normalised
  (``branch_norm.py``): dbb mode's scale invariance per path without its batch statistics.

Recipe (the pilot of issue 23, sized for a 2-core machine): 30k Fashion-MNIST training images with
random crop and flip, the full 10k test set, width 8, 6 epochs, SGD momentum 0.9, lr 0.1 cosine,
weight decay 1e-4 on every parameter, one torch thread per run. Each (depth, variant, seed) trains in
a fresh process and writes its JSON under ``results/sweep/depthN/variant/seedS.json``; a re-run skips
finished runs, so the sweep spans sessions. Same decision rule as the study: a gain is claimed only
when the mean paired difference exceeds two standard errors (3 seeds or more).

    .venv/bin/python benchmarks/depth_sweep.py --depths 30 --variants plain rep_all_dbb --seeds 0 1 2
    .venv/bin/python benchmarks/depth_sweep.py --depths 20 --variants plain dyrep_online dyrep_online_per_weight \
        dyrep_online_random dyrep_dbb --seeds 0 1 2 3 4      # stage 2 at the chosen depth
    .venv/bin/python benchmarks/depth_sweep.py --report     # tables, plots and summary.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_study import median_ratio, paired, recipe_record  # noqa: E402
from branch_norm import normalise_every_path  # noqa: E402
from common import machine, write_json  # noqa: E402

import dyrep_fx  # noqa: E402
from dyrep_fx.cost_model import Budget, structure_budget  # noqa: E402
from dyrep_fx.defaults import PAPER_SCHEDULE  # noqa: E402
from dyrep_fx_examples.demo import (  # noqa: E402
    REGIME_DYREP,
    REGIME_FIGURES,
    DemoConfig,
    make_net,
    run_variant,
)

RESULTS = Path(__file__).resolve().parent / "results" / "sweep"
DEPTHS = (10, 20, 30, 40)
STATIC_VARIANTS = ("plain", "orepa_all", "rep_all_online", "dbb_all", "rep_all_dbb")
#: Stage 2 (issue 23 item 3), DyRep at a chosen depth: sweep variant -> (the demo's variant, DyRep arguments).
#: ``dyrep_online_per_weight`` ranks sites by ``snip_per_weight`` (no preference for wide layers);
#: ``dyrep_online_random`` grows as often at random sites (the control for the site choice).
DYREP_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dyrep_online": ("dyrep_online", dict(PAPER_SCHEDULE)),
    "dyrep_online_per_weight": ("dyrep_online", {**PAPER_SCHEDULE, "metric": "snip_per_weight"}),
    "dyrep_online_random": ("dyrep_online", {**PAPER_SCHEDULE, "metric": "random"}),
    "dyrep_dbb": ("dyrep_dbb", dict(PAPER_SCHEDULE)),
    # Issue 31: grow when it pays. ``start50``: half the candidate sites grown at the first iteration
    # (scored at initialisation), then the usual steps; ``start100``: every site grown from the start,
    # nothing grown after (``topk=0``), Dep cuts as usual (the reverse path); ``topk3``: three sites per
    # step. Each ``*_random`` is the same schedule with random sites (the control for the site choice).
    "dyrep_start50_per_weight": ("dyrep_online", {"grow_at_start": 0.5, "metric": "snip_per_weight"}),
    "dyrep_start50_random": ("dyrep_online", {"grow_at_start": 0.5, "metric": "random"}),
    "dyrep_start100": ("dyrep_online", {"grow_at_start": 1.0, "topk": 0, "metric": "snip"}),
    "dyrep_topk3_per_weight": ("dyrep_online", {**PAPER_SCHEDULE, "topk": 3, "metric": "snip_per_weight"}),
    "dyrep_topk3_random": ("dyrep_online", {**PAPER_SCHEDULE, "topk": 3, "metric": "random"}),
    # ``budget110``: as many sites as a predicted step time of 1.1x plain's holds, from the start (by score per
    # unit of predicted cost), then one more whenever Dep's cuts make room.
    "dyrep_budget110_per_weight": ("dyrep_online", {"grow_at_start": 1.0, "budget": 1.1,
                                                    "metric": "snip_per_weight"}),
    "dyrep_budget110_random": ("dyrep_online", {"grow_at_start": 1.0, "budget": 1.1, "metric": "random"}),
}
#: The DyRep variants in online mode (the cost model's mode).
ONLINE_DYREP = tuple(v for v, (demo, _) in DYREP_VARIANTS.items() if demo == "dyrep_online")
#: Ablations: sweep variant -> (the demo's variant, what changes the built model before training).
ABLATIONS: dict[str, tuple[str, Callable[[nn.Module], Any]]] = {
    "rep_all_online_wn": ("rep_all_online", normalise_every_path),
}
VARIANTS = STATIC_VARIANTS + tuple(ABLATIONS) + tuple(DYREP_VARIANTS)
#: The control each DyRep variant is paired with besides plain: the same schedule at random sites.
RANDOM_CONTROL = "dyrep_online_random"
RANDOM_CONTROLS: dict[str, str] = {
    "dyrep_online": RANDOM_CONTROL, "dyrep_online_per_weight": RANDOM_CONTROL,
    "dyrep_start50_per_weight": "dyrep_start50_random",
    "dyrep_topk3_per_weight": "dyrep_topk3_random",
    "dyrep_budget110_per_weight": "dyrep_budget110_random",
}
#: The pilot's recipe; ``net`` is set per depth.
RECIPE = DemoConfig(epochs=6, train_limit=30000, test_limit=None, batch_size=128, lr=0.1, weight_decay=1e-4,
                    width=8, net="depth10", augment=True, threads=1, progress=False)
#: An online run "collapses" when an epoch's test accuracy falls this far below plain's same epoch.
COLLAPSE_POINTS = 10.0


def recipe_for(depth: int, base: DemoConfig = RECIPE) -> DemoConfig:
    """The sweep's recipe at ``depth`` convs."""
    return replace(base, net=f"depth{depth}")


def run_path(results: Path, depth: int, variant: str, seed: int) -> Path:
    """Where the JSON of one run lives."""
    return results / f"depth{depth}" / variant / f"seed{seed}.json"


def run_one(depth: int, variant: str, seed: int, results: Path, base: DemoConfig = RECIPE) -> dict[str, Any]:
    """Train one (depth, variant, seed) in this process and write its JSON."""
    recipe = recipe_for(depth, base)
    demo_variant, options = DYREP_VARIANTS.get(variant, (variant, {}))
    prepare = None
    if variant in ABLATIONS:
        demo_variant, prepare = ABLATIONS[variant]
    started = time.time()
    run = run_variant(demo_variant, replace(recipe, seed=seed, dyrep_options=dict(options)), prepare=prepare)
    run.update(variant=variant, dyrep_options=options, depth=depth, seed=seed, recipe=recipe_record(recipe),
               machine=machine(),
               started=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)))
    write_json(run_path(results, depth, variant, seed), run)
    return run


def pending(depths: list[int], variants: list[str], seeds: list[int], results: Path,
            base: DemoConfig = RECIPE) -> list[tuple[int, str, int]]:
    """The runs without a result, in the order given (depths outer, then seeds, then variants)."""
    todo = []
    for depth in depths:
        want = recipe_record(recipe_for(depth, base))
        for seed in seeds:
            for variant in variants:
                path = run_path(results, depth, variant, seed)
                if not path.exists():
                    todo.append((depth, variant, seed))
                elif recipe_record(json.loads(path.read_text())["recipe"]) != want:
                    raise SystemExit(f"{path} was trained with another recipe; use another --results folder")
    return todo


def run_all(todo: list[tuple[int, str, int]], results: Path, jobs: int, base: DemoConfig = RECIPE) -> None:
    """Train every pending run, ``jobs`` fresh processes at a time."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = {pool.submit(run_one, d, v, s, results, base): (d, v, s) for d, v, s in todo}
        for future in concurrent.futures.as_completed(futures):
            depth, variant, seed = futures[future]
            run = future.result()
            print(f"depth {depth} {variant} seed {seed}: test acc {100 * run['test_acc']:.2f}%, "
                  f"{run['cpu_seconds_per_epoch']:.0f} CPU s/epoch", flush=True)


# -- statistics --------------------------------------------------------------------------------------
def load_runs(results: Path) -> dict[int, dict[str, dict[int, dict[str, Any]]]]:
    """``{depth: {variant: {seed: run}}}`` of every finished run."""
    runs: dict[int, dict[str, dict[int, dict[str, Any]]]] = {}
    for path in sorted(results.glob("depth*/*/seed*.json")):
        run = json.loads(path.read_text())
        runs.setdefault(run["depth"], {}).setdefault(run["variant"], {})[run["seed"]] = run
    return runs


def collapses(run: dict[str, Any], plain: dict[str, Any] | None) -> list[int]:
    """Epochs where ``run``'s test accuracy is :data:`COLLAPSE_POINTS` or more below plain's same epoch."""
    if plain is None:
        return []
    return [e["epoch"] for e, p in zip(run["epochs"], plain["epochs"])
            if 100 * (p["test_acc"] - e["test_acc"]) >= COLLAPSE_POINTS]


def calibrated_collapses(run: dict[str, Any], plain: dict[str, Any] | None) -> list[int] | None:
    """The same rule on the accuracies with BatchNorm statistics re-estimated (:func:`dyrep_fx.calibrate`,
    the eval gap's ``recalibrated``) for both runs: what an evaluation after calibration sees. ``None``
    when either run did not measure it (runs before the eval gap was recorded)."""
    if plain is None or any("eval_gap" not in e for e in run["epochs"] + plain["epochs"]):
        return None
    return [e["epoch"] for e, p in zip(run["epochs"], plain["epochs"])
            if 100 * (p["eval_gap"]["recalibrated"] - e["eval_gap"]["recalibrated"]) >= COLLAPSE_POINTS]


def collapse_details(run: dict[str, Any], plain: dict[str, Any] | None) -> list[str]:
    """Each collapsed epoch as ``"3 (49 / recal 75)"``: the accuracy, and with BatchNorm statistics recomputed
    when the run measured it (a collapse with a recalibrated accuracy near plain's is the running averages
    lagging behind the weights, not worse weights)."""
    out = []
    for epoch in collapses(run, plain):
        e = run["epochs"][epoch - 1]
        gap = e.get("eval_gap")
        recal = "" if gap is None else f" / recal {100 * gap['recalibrated']:.0f}"
        out.append(f"{epoch} ({100 * e['test_acc']:.0f}{recal})")
    return out


def calibrated_finals(mine: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Each seed's run as :func:`paired` reads it, with the last epoch's accuracy under calibrated BatchNorm
    statistics as ``test_acc`` (the runs that recorded it)."""
    return {s: {"test_acc": r["epochs"][-1]["eval_gap"]["recalibrated"]} for s, r in mine.items()
            if "eval_gap" in r["epochs"][-1]}


def _params_ratio(mine: dict[int, dict[str, Any]], plain: dict[int, dict[str, Any]]) -> float | None:
    """Median over seeds of the peak parameter count in training over plain's (the memory cost)."""
    ratios = [r["params_training_peak"] / plain[s]["params_training_peak"] for s, r in mine.items()
              if s in plain and "params_training_peak" in r and "params_training_peak" in plain[s]]
    return statistics.median(ratios) if ratios else None


def grown_order(run: dict[str, Any], first: int = 5) -> list[str]:
    """The sites a DyRep run grew, in the order it grew them (the first ``first``; nested growths by their path)."""
    return [name for event in run.get("branch_history", []) for name in event["grown"]][:first]


@functools.cache
def _depth_budget(depth: int) -> Budget:
    """The cost model over the sweep net at ``depth``, traced with a batch of the recipe's size."""
    recipe = recipe_for(depth)
    model = make_net(recipe.width, net=recipe.net)
    dyrep_fx.transform(model, example_inputs=(torch.zeros(recipe.batch_size, 1, 28, 28),))
    return structure_budget(model, dyrep_fx.sites(model))


def structure_cost(depth: int, structure: dict[str, list[str]]) -> float:
    """The predicted step time over plain's of the sweep net at ``depth`` with ``structure`` (``{site:
    kinds}``; nested blocks, which the cost model has no shapes for, count nothing)."""
    added = sum(_growth_cost(depth, name, tuple(kinds)) for name, kinds in structure.items())
    return _depth_budget(depth).ratio(added)


@functools.cache
def _growth_cost(depth: int, name: str, kinds: tuple[str, ...]) -> float:
    """What growing ``kinds`` at site ``name`` of the sweep net adds (0 for a site without a shape)."""
    return _depth_budget(depth).growth(name, list(kinds)) or 0.0


def training_ratios(run: dict[str, Any], depth: int) -> dict[str, float]:
    """A DyRep run's predicted step-time ratio to plain at the end of training and its mean over the
    training iterations (what a user pays), replaying its grow and cut events."""
    structure: dict[str, list[str]] = {}
    total = run.get("total_iterations") or 1
    weighted, last_unit, ratio = 0.0, 0, 1.0
    for event in run.get("events", []):
        weighted += ratio * (event["unit"] - last_unit)
        last_unit = event["unit"]
        for name, kinds in event["grown"].items():
            structure[name] = structure.get(name, []) + list(kinds)
        for name, kinds in event["cut"].items():
            structure[name] = [k for k in structure.get(name, []) if k not in kinds]
        ratio = structure_cost(depth, {n: k for n, k in structure.items() if k})
    weighted += ratio * (total - last_unit)
    return {"mean": weighted / total, "end": ratio}


def ceiling(runs_at_depth: dict[str, dict[int, dict[str, Any]]]) -> str | None:
    """The static variant with the largest mean paired gain over plain at one depth (3 seeds or more): the
    accuracy a DyRep run could reach by growing everything from the start."""
    plain = runs_at_depth.get("plain", {})
    gains = {}
    for variant in STATIC_VARIANTS[1:]:
        pair = paired(runs_at_depth.get(variant, {}), plain)
        if pair is not None and len(pair["seeds"]) >= 3:
            gains[variant] = pair["mean"]
    return max(gains, key=gains.get) if gains else None


#: Online against dbb mode, the same kinds: (online variant, dbb-mode variant).
MODE_PAIRS = (("rep_all_online", "rep_all_dbb"), ("rep_all_online_wn", "rep_all_dbb"), ("dyrep_online", "dyrep_dbb"))
#: Each ablation against the variant it changes: (ablation, its base).
ABLATION_PAIRS = tuple((name, base) for name, (base, _) in ABLATIONS.items())


def mode_gaps(runs: dict[int, dict[str, dict[int, dict[str, Any]]]],
              pairs: tuple[tuple[str, str], ...] = MODE_PAIRS) -> list[dict[str, Any]]:
    """Per depth, the first variant's accuracy minus the second's for each of ``pairs``, paired by seed
    (by default online mode minus dbb mode with the same kinds)."""
    out = []
    for depth in sorted(runs):
        for online, dbb in pairs:
            pair = paired(runs[depth].get(online, {}), runs[depth].get(dbb, {}))
            if pair is not None:
                out.append({"depth": depth, "online": online, "dbb": dbb, **pair})
    return out


def summarise(runs: dict[int, dict[str, dict[int, dict[str, Any]]]]) -> dict[str, Any]:
    """Per depth and variant: accuracy, the paired difference to plain (and, for DyRep, to random sites and
    to the depth's ceiling), cost and collapsed epochs; online against dbb mode per depth."""
    rows = []
    for depth in sorted(runs):
        plain = runs[depth].get("plain", {})
        best = ceiling(runs[depth])
        for variant in VARIANTS:
            mine = runs[depth].get(variant)
            if not mine:
                continue
            accs = [100 * r["test_acc"] for r in mine.values()]
            control = runs[depth].get(RANDOM_CONTROLS.get(variant), {})  # the same schedule at random sites
            rows.append({
                "depth": depth, "variant": variant, "seeds": sorted(mine),
                "acc_mean": statistics.fmean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "vs_plain": paired(mine, plain) if variant != "plain" else None,
                # secondary (issue 31's 18-epoch runs): the last epoch with calibrated BatchNorm statistics
                "vs_plain_calibrated": paired(calibrated_finals(mine), calibrated_finals(plain))
                if variant != "plain" else None,
                "vs_random_calibrated": paired(calibrated_finals(mine), calibrated_finals(control))
                if variant in RANDOM_CONTROLS else None,
                "vs_random": paired(mine, control) if variant in RANDOM_CONTROLS else None,
                "random_control": RANDOM_CONTROLS.get(variant),
                # the cost model is online mode's: a dbb-mode run is placed at its end structure only
                "predicted_mean_ratio": statistics.fmean(training_ratios(r, depth)["mean"] for r in mine.values())
                if variant in ONLINE_DYREP else None,
                "predicted_end_ratio": statistics.fmean(training_ratios(r, depth)["end"] for r in mine.values())
                if variant in ONLINE_DYREP else None,
                "vs_ceiling": paired(mine, runs[depth][best])
                if variant in DYREP_VARIANTS and best is not None else None,
                "ceiling": best if variant in DYREP_VARIANTS else None,
                # issue 31's yardstick: the cheap static variant a DyRep setting has to match
                "vs_orepa_all": paired(mine, runs[depth].get("orepa_all", {})) if variant in DYREP_VARIANTS else None,
                "params_training_peak_vs_plain": _params_ratio(mine, plain),
                "cpu_vs_plain": median_ratio(mine, plain, "cpu_seconds_per_epoch"),
                "cpu_seconds_per_epoch": statistics.median(r["cpu_seconds_per_epoch"] for r in mine.values()),
                "folded_equal": all(r["folded_test_acc"] == r["test_acc"] for r in mine.values()),
                "collapsed_epochs": {s: collapses(r, plain.get(s)) for s, r in sorted(mine.items())
                                     if variant != "plain"},
                "collapse_details": {s: collapse_details(r, plain.get(s)) for s, r in sorted(mine.items())
                                     if variant != "plain"},
                "calibrated_collapses": {s: calibrated_collapses(r, plain.get(s)) for s, r in sorted(mine.items())
                                         if variant != "plain"},
                "first_epoch_acc": {s: r["epochs"][0]["test_acc"] for s, r in sorted(mine.items())},
                "grown_first": {s: grown_order(r) for s, r in sorted(mine.items())}
                if variant in DYREP_VARIANTS else None,
            })
    return {"rows": rows, "mode_gaps": mode_gaps(runs), "ablation_gaps": mode_gaps(runs, ABLATION_PAIRS),
            "recipe": _recipe_of(runs),
            "collapse_points": COLLAPSE_POINTS}


def _recipe_of(runs: dict[int, dict[str, dict[int, dict[str, Any]]]]) -> dict[str, Any]:
    """The recipe the runs were trained with (the sweep's when there are none), less ``net`` (one per depth)."""
    first = next((run for at_depth in runs.values() for mine in at_depth.values() for run in mine.values()), None)
    record = recipe_record(RECIPE if first is None else first["recipe"])
    return {k: v for k, v in record.items() if k != "net"}


def _fmt_pair(p: dict[str, Any] | None) -> str:
    return "" if p is None else f"{p['mean']:+.2f} ± {p['se']:.2f} ({p['verdict']})"


def _fmt_ratio(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}"


def _fmt_calibrated(per_seed: dict[Any, list[int] | None]) -> str:
    """``"none (3 seeds)"``, ``"s1: 2"``, or what could not be measured."""
    measured = {s: e for s, e in per_seed.items() if e is not None}
    if not measured:
        return "not measured"
    hits = "; ".join(f"s{s}: {', '.join(map(str, e))}" for s, e in measured.items() if e)
    return hits or f"none ({len(measured)} seed{'s' if len(measured) > 1 else ''})"


def markdown(summary: dict[str, Any]) -> str:
    """The sweep's table for the benchmarks README."""
    lines = ["| convs | variant | seeds | test acc % (mean ± std) | Δ vs plain (paired, ± SE) "
             "| Δ vs random sites | training params × plain | CPU s/epoch "
             "| first-epoch acc per seed | epochs collapsed (≥ 10 points below plain): acc / recalibrated "
             "| collapsed with both calibrated |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        first = ", ".join(f"{100 * a:.0f}" for a in r["first_epoch_acc"].values())
        collapsed = calibrated = ""
        if r["variant"] != "plain":
            collapsed = "; ".join(f"s{s}: {', '.join(e)}" for s, e in r["collapse_details"].items() if e) or "none"
            calibrated = _fmt_calibrated(r.get("calibrated_collapses", {}))
        lines.append(f"| {r['depth']} | {r['variant']} | {len(r['seeds'])} | {r['acc_mean']:.2f} ± {r['acc_std']:.2f} "
                     f"| {_fmt_pair(r['vs_plain'])} | {_fmt_pair(r.get('vs_random'))} "
                     f"| {_fmt_ratio(r.get('params_training_peak_vs_plain'))} | {r['cpu_seconds_per_epoch']:.0f} "
                     f"| {first} | {collapsed} "
                     f"| {calibrated} |")
    return "\n".join(lines)


def stage_two_depths(summary: dict[str, Any]) -> list[int]:
    """The depths where some DyRep variant trained (stage 2)."""
    return sorted({r["depth"] for r in summary["rows"] if r["variant"] in DYREP_VARIANTS})


def _stage_two_rows(summary: dict[str, Any], depth: int) -> list[dict[str, Any]]:
    """Plain, the static variants and the DyRep variants at ``depth``, in :data:`VARIANTS` order."""
    return [r for r in summary["rows"] if r["depth"] == depth]


def load_cost(results: Path, depth: int) -> dict[str, Any] | None:
    """The side-by-side step times of ``benchmarks/sweep_cost.py`` at ``depth``, if measured."""
    path = results / f"cost_depth{depth}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _step_ratio(cost: dict[str, Any] | None, variant: str) -> float | None:
    entry = (cost or {}).get("variants", {}).get(variant)
    return None if entry is None else entry["vs_plain"]


def stage_two_markdown(summary: dict[str, Any], depth: int, cost: dict[str, Any] | None = None) -> str:
    """Stage 2's table at ``depth``: is DyRep above plain, how near the ceiling, at what cost, and is its
    site choice better than random sites. ``cost``: :func:`load_cost`'s step times (side by side)."""
    lines = ["| variant | seeds | test acc % (mean ± std) | Δ vs plain | Δ vs ceiling | Δ vs `orepa_all` "
             "| Δ vs random sites "
             "| training params × plain (peak) | step CPU time × plain (side by side; DyRep: end of training) "
             "| DyRep: mean over training (est.) | sites grown first (seed 0) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in _stage_two_rows(summary, depth):
        first = r.get("grown_first") or {}
        order = ", ".join(first.get(0, first.get("0", []))) if first else ""
        lines.append(f"| {r['variant']} | {len(r['seeds'])} | {r['acc_mean']:.2f} ± {r['acc_std']:.2f} "
                     f"| {_fmt_pair(r['vs_plain'])} | {_fmt_pair(r.get('vs_ceiling'))} "
                     f"| {_fmt_pair(r.get('vs_orepa_all'))} "
                     f"| {_fmt_pair(r.get('vs_random'))} | {_fmt_ratio(r.get('params_training_peak_vs_plain'))} "
                     f"| {_fmt_ratio(_step_ratio(cost, r['variant']))} "
                     f"| {_fmt_ratio(mean_step_ratio(r, cost)) if r['variant'] in DYREP_VARIANTS else ''} "
                     f"| {order} |")
    return "\n".join(lines)


def mean_step_ratio(row: dict[str, Any], cost: dict[str, Any] | None) -> float | None:
    """A DyRep variant's step time over plain's averaged over training, from its end structure's
    side-by-side measurement scaled by the cost model's mean over the end (what a user pays: a run
    grown late pays little of its end cost). Static variants: their measured ratio."""
    end = _step_ratio(cost, row["variant"])
    if end is None or row.get("predicted_mean_ratio") is None:
        return end
    pred_mean, pred_end = row["predicted_mean_ratio"], row["predicted_end_ratio"]
    if pred_end <= 1.0:
        return end
    return 1.0 + (end - 1.0) * (pred_mean - 1.0) / (pred_end - 1.0)


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The best gain at or below each cost: ``(cost, gain)`` steps through the points that raise it."""
    steps: list[tuple[float, float]] = []
    for cost_, gain in sorted(points):
        if not steps or gain > steps[-1][1]:
            steps.append((cost_, gain))
    return steps


def plot_stage_two(summary: dict[str, Any], depth: int, path: Path, cost: dict[str, Any] | None) -> bool:
    """The accuracy-cost frontier at ``depth``: gain over plain (± 2 SE) against training step time
    (× plain's, side by side: ``cost``). Static variants are squares and their frontier (the best gain at
    or below each cost) a step line; each DyRep setting is a circle at its mean step time over training,
    a hollow mark at its end-of-training structure's. False without ``cost``."""
    if cost is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(11, 5.2))
    static = [(1.0, 0.0)]
    for i, r in enumerate(_stage_two_rows(summary, depth)):
        end = _step_ratio(cost, r["variant"])
        if r["vs_plain"] is None or end is None:
            continue
        gain, err = r["vs_plain"]["mean"], 2 * r["vs_plain"]["se"]
        label = f"{r['variant']} ({len(r['vs_plain']['seeds'])} seeds)"
        if r["variant"] not in DYREP_VARIANTS:
            static.append((end, gain))
            ax.errorbar([end], [gain], yerr=[err], marker="s", capsize=3, color=plt.cm.tab20(i % 20), label=label)
            continue
        mean = mean_step_ratio(r, cost)
        ax.plot([mean, end], [gain, gain], color=plt.cm.tab20(i % 20), lw=0.8, alpha=0.6)
        ax.plot([end], [gain], marker="o", mfc="none", color=plt.cm.tab20(i % 20))
        ax.errorbar([mean], [gain], yerr=[err], marker="o", capsize=3, color=plt.cm.tab20(i % 20), label=label)
    steps = frontier(static)
    xs = [c for c, _ in steps] + [max(c for c, _ in static) * 1.05]
    ax.step(xs, [g for _, g in steps] + [steps[-1][1]], where="post", color="k", lw=1.2, ls="--",
            label="static frontier (best gain at or below a cost)")
    ax.axhline(0.0, color="grey", lw=1)
    ax.set_xscale("log")
    # plain numbers on the log axis ("2", not "2 x 10^0")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set(xlabel="training step CPU time × plain's (side by side; DyRep: filled = mean over training, "
                  "hollow = end structure)",
           ylabel="test accuracy − plain (points, ± 2 SE)",
           title=f"{depth} convs: accuracy against training cost, DyRep (circles) and static (squares)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot(summary: dict[str, Any], path: Path) -> None:
    """Paired gain over plain (± 2 SE) against depth, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, variant in enumerate(v for v in VARIANTS if v != "plain"):
        pts = [r for r in summary["rows"] if r["variant"] == variant and r["vs_plain"]]
        if pts:
            ax.errorbar([r["depth"] + 0.4 * (i - 2) for r in pts], [r["vs_plain"]["mean"] for r in pts],
                        yerr=[2 * r["vs_plain"]["se"] for r in pts], marker="o", capsize=3, label=variant)
    ax.axhline(0.0, color="grey", lw=1)
    ax.set(xlabel="convs (shortcut-free, VGG style)", ylabel="test accuracy − plain (points, ± 2 SE)",
           title="Depth sweep: static re-parameterization gain over plain")
    if ax.get_legend_handles_labels()[0]:  # (no variant has two paired seeds yet: nothing to label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean_curves(runs_at_depth: dict[str, dict[int, dict[str, Any]]]) -> dict[str, list[float]]:
    """Per variant, the test accuracy (%) of each epoch averaged over its seeds, with running BatchNorm
    statistics: the sweep's measure, the one its final accuracies and paired gains use."""
    return {variant: [statistics.fmean(100 * r["epochs"][i]["test_acc"] for r in mine.values())
                      for i in range(min(len(r["epochs"]) for r in mine.values()))]
            for variant, mine in runs_at_depth.items() if mine}


def plot_curves(runs: dict[int, dict[str, dict[int, dict[str, Any]]]], depth: int, path: Path) -> bool:
    """Test accuracy per epoch at ``depth``, each variant's mean over its seeds: when a gain appears and
    whether it lasts. False when there is no run at ``depth``."""
    curves = mean_curves(runs.get(depth, {}))
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, variant in enumerate(v for v in VARIANTS if v in curves):
        ax.plot(range(1, len(curves[variant]) + 1), curves[variant], marker="o", ms=3, color=f"C{i}",
                label=f"{variant} ({len(runs[depth][variant])} seeds)")
    ax.set(xlabel="epoch", ylabel="test acc. %, mean over seeds (running BN statistics)",
           title=f"{depth} convs: test accuracy per epoch")
    ax.set_ylim(bottom=max(60.0, min(min(c) for c in curves.values()) - 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_calibration(runs: dict[int, dict[str, dict[int, dict[str, Any]]]], depth: int, path: Path) -> bool:
    """Per seed (a panel each), test accuracy per epoch at ``depth`` with running BatchNorm statistics
    (dotted) and calibrated ones (solid, :func:`dyrep_fx.calibrate`), one colour per variant: what the
    library's calibration before evaluation changes. False when no run at ``depth`` measured it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    at_depth = runs.get(depth, {})
    seeds = sorted({s for mine in at_depth.values() for s, r in mine.items() if "eval_gap" in r["epochs"][0]})
    if not seeds:
        return False
    fig, axes = plt.subplots(1, len(seeds), figsize=(4.2 * len(seeds), 4), sharey=True, squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        for i, variant in enumerate(VARIANTS):
            run = at_depth.get(variant, {}).get(seed)
            if run is None or "eval_gap" not in run["epochs"][0]:
                continue
            epochs = [e["epoch"] for e in run["epochs"]]
            ax.plot(epochs, [100 * e["test_acc"] for e in run["epochs"]], color=f"C{i}", ls=":")
            ax.plot(epochs, [100 * e["eval_gap"]["recalibrated"] for e in run["epochs"]], color=f"C{i}",
                    marker="o", ms=3, label=variant)
        ax.set(title=f"{depth} convs, seed {seed}", xlabel="epoch")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test accuracy %")
    fig.suptitle("dotted: BatchNorm running statistics; solid: calibrated (dyrep_fx.calibrate, 20 batches)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def regime_variant() -> str | None:
    """The sweep variant that trains the main job's DyRep setting (``REGIME_DYREP``, online)."""
    return next((v for v, (demo, options) in DYREP_VARIANTS.items()
                 if demo == "dyrep_online" and options == REGIME_DYREP), None)


def regime_figures(summary: dict[str, Any], cost: dict[str, Any] | None, depth: int = 20) -> dict[str, Any]:
    """What the main job prints beside its single run: at ``depth``, per demo variant (plain, DyRep with
    the main job's setting, ``orepa_all``) the paired gain over plain, the site choice against random
    sites, and the step-time ratios."""
    rows = {r["variant"]: r for r in summary["rows"] if r["depth"] == depth}
    names = {"plain": "plain", "dyrep": regime_variant(), "orepa_all": "orepa_all"}
    variants = {}
    for demo_name, variant in names.items():
        row = rows.get(variant)
        if row is None:
            continue
        variants[f"{demo_name} ({variant})" if demo_name != variant else demo_name] = {
            "vs_plain": {"mean": 0.0, "se": 0.0} if variant == "plain" else row["vs_plain"],
            "vs_random": row.get("vs_random"),
            "step_ratio": _step_ratio(cost, variant) or 1.0,
            "mean_step_ratio": mean_step_ratio(row, cost) if variant in DYREP_VARIANTS else None}
    plain = rows["plain"]
    return {"depth": depth, "seeds": len(plain["seeds"]), "variants": variants,
            "recipe": f"{RECIPE.epochs} epochs on {RECIPE.train_limit // 1000}k images",
            "plain_spread": plain["acc_std"], "plot": f"benchmarks/results/sweep/stage2_depth{depth}.png"}


def report(results: Path) -> dict[str, Any]:
    """Write ``summary.json``, ``tables.md``, ``sweep.png``, ``calibration.png`` (30 convs) and
    ``stage2_depthN.png`` (each depth with DyRep runs) next to the runs; return the summary."""
    runs = load_runs(results)
    summary = summarise(runs)
    write_json(results / "summary.json", summary)
    costs = {depth: load_cost(results, depth) for depth in stage_two_depths(summary)}
    tables = [markdown(summary)]
    for depth, cost in costs.items():
        tables.append(f"Stage 2 at {depth} convs:\n\n{stage_two_markdown(summary, depth, cost)}")
    if summary["mode_gaps"]:
        tables.append("Online minus dbb mode, same kinds (paired):\n\n" + "\n".join(
            f"* {g['depth']} convs, {g['online']} − {g['dbb']}: {_fmt_pair(g)}" for g in summary["mode_gaps"]))
    if summary["ablation_gaps"]:
        tables.append("Ablations minus the variant they change (paired):\n\n" + "\n".join(
            f"* {g['depth']} convs, {g['online']} − {g['dbb']}: {_fmt_pair(g)}" for g in summary["ablation_gaps"]))
    (results / "tables.md").write_text("\n\n".join(tables) + "\n")
    if summary["rows"]:
        plot(summary, results / "sweep.png")
        plot_calibration(runs, 30, results / "calibration.png")
        for depth, cost in costs.items():
            plot_stage_two(summary, depth, results / f"stage2_depth{depth}.png", cost)
            plot_curves(runs, depth, results / f"curves_depth{depth}.png")
        if results == RESULTS and 20 in costs:  # the committed sweep, not a smoke or test folder
            write_json(REGIME_FIGURES, regime_figures(summary, costs[20]))
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", nargs="+", type=int, choices=DEPTHS, default=[10, 20, 30])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(STATIC_VARIANTS),
                   help="default: the static variants (stage 1); the dyrep_* ones are stage 2")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--report", action="store_true", help="only summarise the finished runs")
    p.add_argument("--smoke", action="store_true", help="a tiny recipe, results under out/sweep_smoke")
    p.add_argument("--long", action="store_true",
                   help=f"{LONG.epochs} epochs instead of {RECIPE.epochs}, results under results/sweep_long")
    return p.parse_args(argv)


SMOKE = replace(RECIPE, epochs=1, train_limit=500, test_limit=250)
#: Issue 31 item 3, "more time": the sweep's recipe with a 3x longer schedule (the DyRep schedule is a
#: fraction of training, so it stretches with it); its runs live apart, under ``sweep_long``.
LONG = replace(RECIPE, epochs=18)
LONG_RESULTS = RESULTS.parent / "sweep_long"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    base = SMOKE if args.smoke else LONG if args.long else RECIPE
    results = Path("out/sweep_smoke") if args.smoke else LONG_RESULTS if args.long else args.results
    if not args.report:
        todo = pending(args.depths, args.variants, args.seeds, results, base)
        print(f"{len(todo)} runs to train", flush=True)
        run_all(todo, results, args.jobs, base)
    summary = report(results)
    print((results / "tables.md").read_text())
    return summary


if __name__ == "__main__":
    main()
