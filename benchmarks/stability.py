"""Stability probe: what online training does to each site's effective kernel, step by step, beside plain.

A conv followed by BatchNorm computes the same function for any positive scale of its kernel, so what
an optimizer step does to it is the *relative* change of its effective kernel, ``||W_t - W_{t-1}|| /
||W_{t-1}||`` (the effective step size). Plain training changes ``W`` by the SGD step alone; an online
block's ``W = main_scale * weight + sum_b scale_b * K_b`` changes through every trained factor at once.
This probe trains one variant with the depth sweep's recipe (same seed, same batches as plain) and
records, after every optimizer step: the loss, each site's relative kernel change and kernel norm, the
*radial* part of that change (the median over output channels of the relative change of the channel's
kernel norm), and for online blocks the main scale and each branch's scale and kernel share.

Why the radial part: BatchNorm after a conv makes the loss blind to each output channel's kernel norm,
so plain SGD's gradient is orthogonal to every channel's kernel and a step changes the channel norms only
to second order. The channel norm sets the conv output's variance, which is what the BatchNorm's running
statistics must follow; a step that changes it to first order moves those statistics faster than their
running averages (momentum 0.1) can follow, and eval-mode accuracy drops while training does not.

    .venv/bin/python benchmarks/stability.py --depth 30 --variants plain orepa_all --epochs-run 3
    .venv/bin/python benchmarks/stability.py --report     # before/after table from the saved probes

Results: ``results/stability/<tag>/depthN_variant_seedS.json`` (``--tag`` names the library state,
e.g. ``before`` / ``after`` a fix).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_json  # noqa: E402
from depth_sweep import RECIPE, recipe_for  # noqa: E402

from dyrep_fx.block import RepConv2d  # noqa: E402
from dyrep_fx_examples.data import fashion_mnist_loaders  # noqa: E402
from dyrep_fx_examples.demo import eval_gap, run_variant  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "stability"


class _Enough(Exception):
    """Raised by the probe to end a run after the steps asked for (the schedule stays the full one's)."""


def effective_kernel(module: nn.Module) -> torch.Tensor:
    """The kernel the site's conv computes with (online blocks: the assembled one; dbb: eval equivalent)."""
    if isinstance(module, RepConv2d):
        return module.equivalent()[0].detach()
    return module.weight.detach()


def top_sites(model: nn.Module) -> dict[str, nn.Module]:
    """The model's own convs (grown or not), not the convs inside branches."""
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, RepConv2d)) and not any(name.startswith(n + ".") for n in found):
            found[name] = m
    return found


class Probe:
    """The observer :func:`dyrep_fx_examples.demo.run_variant` calls after every optimizer step.

    Every ``eval_every`` steps it also measures the eval-mode gap: test accuracy with the BatchNorms'
    running statistics against the same weights with statistics recomputed on training batches
    (``recalibrated``). A gap means the running averages lag behind the weights, not that the weights
    are bad.
    """

    def __init__(self, stop_after: int | None, eval_every: int = 50, loaders: tuple | None = None) -> None:
        self.stop_after = stop_after
        self.eval_every = eval_every
        self.loaders = loaders
        self.previous: dict[str, torch.Tensor] = {}
        self.steps: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []

    def __call__(self, model: nn.Module, iteration: int, loss: float) -> None:
        with torch.no_grad():
            record: dict[str, Any] = {"it": iteration, "loss": round(loss, 5), "rel": {}, "radial": {}, "norm": {}}
            for name, m in top_sites(model).items():
                w = effective_kernel(m).double()
                old = self.previous.get(name)
                if old is not None and old.shape == w.shape:
                    record["rel"][name] = _sig((w - old).norm() / old.norm())
                    record["radial"][name] = _sig(radial_change(old, w))
                record["norm"][name] = _sig(w.norm())
                self.previous[name] = w.clone()
                if isinstance(m, RepConv2d) and m.grown and m.mode == "online":
                    record.setdefault("main_scale", {})[name] = _sig(m.main_scale.abs().mean())
                    record.setdefault("share", {})[name] = {k: _sig(v) for k, v in m.importance().items()}
        self.steps.append(record)
        if self.loaders is not None and iteration % self.eval_every == 0:
            self.evals.append({"it": iteration, **eval_gap(model, *self.loaders, test_batches=10)})
        if self.stop_after is not None and iteration >= self.stop_after:
            raise _Enough


def radial_change(old: torch.Tensor, new: torch.Tensor) -> float:
    """Median over output channels of ``|‖new_c‖ - ‖old_c‖| / ‖old_c‖``: how much a step rescales channels."""
    before, after = old.flatten(1).norm(dim=1), new.flatten(1).norm(dim=1)
    return float(((after - before).abs() / before).median())


class _EpochAccuracies(logging.Handler):
    """Collects the test accuracy the demo logs after each epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if " epoch %d: " in str(record.msg) and record.args:
            self.values.append(float(record.args[3]))


def _sig(value: float | torch.Tensor) -> float:
    return float(f"{float(value):.4g}")


def probe_one(depth: int, variant: str, seed: int, epochs_run: int, out: Path, steps: int | None = None) -> Path:
    """Train ``variant`` for ``epochs_run`` epochs of the sweep's schedule (or its first ``steps`` steps),
    recording every step."""
    recipe = replace(recipe_for(depth), seed=seed)
    steps_per_epoch = -(-recipe.train_limit // recipe.batch_size)
    # (stop at the first step after the last epoch wanted: that epoch's test accuracy is then logged)
    loaders = fashion_mnist_loaders(recipe.batch_size, recipe.train_limit, None, seed=seed + 1)
    stop = epochs_run * steps_per_epoch + 1 if epochs_run < recipe.epochs else None
    probe = Probe(stop_after=steps if steps is not None else stop, loaders=loaders)
    accs = _EpochAccuracies()
    logging.getLogger("dyrep_fx_examples.demo").addHandler(accs)
    logging.getLogger("dyrep_fx_examples.demo").setLevel(logging.INFO)
    try:
        run_variant(variant, recipe, observer=probe)
    except _Enough:
        pass
    path = out / f"depth{depth}_{variant}_seed{seed}.json"
    write_json(path, {"depth": depth, "variant": variant, "seed": seed, "epochs_run": epochs_run,
                      "test_acc_per_epoch": accs.values, "evals": probe.evals, "steps": probe.steps}, compact=True)
    return path


# -- analysis ----------------------------------------------------------------------------------------
def step_stats(steps: list[dict[str, Any]], start: int, stop: int) -> dict[str, float]:
    """Median over steps ``[start, stop)`` of the median and max relative kernel change over sites."""
    window = [s for s in steps if start <= s["it"] < stop and s["rel"]]
    med = [statistics.median(s["rel"].values()) for s in window]
    top = [max(s["rel"].values()) for s in window]
    return {"median_rel": statistics.median(med) if med else float("nan"),
            "max_rel": statistics.median(top) if top else float("nan")}


def loss_spikes(steps: list[dict[str, Any]], factor: float = 2.0, span: int = 50) -> list[int]:
    """Iterations whose loss exceeds ``factor`` times the median of the ``span`` steps before."""
    losses = [s["loss"] for s in steps]
    return [steps[i]["it"] for i in range(span, len(steps))
            if losses[i] > factor * statistics.median(losses[i - span:i])]


def paired_ratio(mine: list[dict[str, Any]], plain: list[dict[str, Any]], start: int, stop: int) -> float:
    """Median over steps and sites of (this variant's relative kernel change / plain's), same step and site."""
    by_it = {s["it"]: s for s in plain}
    ratios = [s["rel"][k] / by_it[s["it"]]["rel"][k] for s in mine if start <= s["it"] < stop and s["it"] in by_it
              for k in s["rel"] if by_it[s["it"]]["rel"].get(k)]
    return statistics.median(ratios) if ratios else float("nan")


def radial_share(steps: list[dict[str, Any]], start: int, stop: int) -> float:
    """Median over steps ``[start, stop)`` and sites of radial change / relative change: the part of a step
    that rescales output channels (about 0 for plain SGD before BatchNorm; probes before it lack it)."""
    shares = [s["radial"][k] / s["rel"][k] for s in steps if start <= s["it"] < stop
              for k in s.get("radial", {}) if s["rel"].get(k)]
    return statistics.median(shares) if shares else float("nan")


def report(root: Path) -> str:
    """A table per tag: effective step size against plain's, its radial share, loss spikes, accuracy per
    epoch."""
    lines = ["| tag | run | rel. kernel change / plain's (steps 0-100, 100-500, 500+) | radial share of the change "
             "(same windows) | loss spikes (>2x) | eval gap: recalibrated - running acc, mean (max) "
             "| test acc per epoch |", "|---|---|---|---|---|---|---|"]
    for tag_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        probes = {p.stem: json.loads(p.read_text()) for p in sorted(tag_dir.glob("*.json"))}
        for stem, run in probes.items():
            plain = probes.get(f"depth{run['depth']}_plain_seed{run['seed']}")
            ratios = "" if plain is None or run["variant"] == "plain" else ", ".join(
                f"{paired_ratio(run['steps'], plain['steps'], a, b):.2f}" for a, b in ((0, 100), (100, 500), (500, 10**9)))
            windows = ((0, 100), (100, 500), (500, 10**9))
            radial = ", ".join(f"{radial_share(run['steps'], a, b):.3f}" for a, b in windows)
            spikes = loss_spikes(run["steps"])
            accs = ", ".join(f"{100 * a:.0f}" for a in run["test_acc_per_epoch"])
            gaps = [100 * (e["recalibrated"] - e["running"]) for e in run.get("evals", [])]
            gap = f"{statistics.fmean(gaps):.1f} ({max(gaps):.1f})" if gaps else ""
            lines.append(f"| {tag_dir.name} | {stem} | {ratios} | {radial} | {len(spikes)} {spikes[:5]} | {gap} "
                         f"| {accs} |")
    return "\n".join(lines)


def plot(root: Path, runs: dict[str, str], path: Path) -> None:
    """Test accuracy with running and with recomputed BatchNorm statistics against the step, one colour per
    ``{label: "tag/stem"}`` probe (solid: recomputed, dotted: running)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, (label, where) in enumerate(runs.items()):
        evals = json.loads((root / f"{where}.json").read_text()).get("evals", [])
        steps = [e["it"] for e in evals]
        ax.plot(steps, [100 * e["recalibrated"] for e in evals], color=f"C{i}", label=f"{label}: recomputed")
        ax.plot(steps, [100 * e["running"] for e in evals], color=f"C{i}", ls=":", label=f"{label}: running")
    ax.set(xlabel="training step (235 per epoch)", ylabel="test accuracy % (1,280 test images)",
           title="30 convs, seed 0: BatchNorm running vs recomputed statistics")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=30)
    p.add_argument("--variants", nargs="+", default=["plain", "orepa_all", "rep_all_online"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs-run", type=int, default=RECIPE.epochs)
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: the epochs)")
    p.add_argument("--tag", default="before")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--report", action="store_true")
    p.add_argument("--plot", nargs="*", metavar="LABEL=TAG/STEM",
                   help="with --report: plot these probes' eval gaps into stability.png")
    args = p.parse_args(argv)
    if not args.report:
        out = args.results / args.tag
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
            for path in pool.map(probe_one, [args.depth] * len(args.variants), args.variants,
                                 [args.seed] * len(args.variants), [args.epochs_run] * len(args.variants),
                                 [out] * len(args.variants), [args.steps] * len(args.variants)):
                print("wrote", path, flush=True)
    print(report(args.results))
    if args.plot:
        plot(args.results, dict(item.split("=", 1) for item in args.plot), args.results / "stability.png")


if __name__ == "__main__":
    main()
