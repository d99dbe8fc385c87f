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
e.g. ``before`` / ``after`` a fix), each a summary small enough to read (:func:`summarise`): the loss of
every step, each step window's statistics computed from every step, each site's kernel change and norm
every ``SAMPLE_EVERY`` steps (what the report pairs with plain's), the branch shares' median per kind, the
eval gaps. ``--compact TAG_DIR...`` turns probes written with every step (before 2026-12-06) into that form.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import math
import multiprocessing
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from depth_sweep import RECIPE, recipe_for  # noqa: E402

from dyrep_fx.block import RepConv2d  # noqa: E402
from dyrep_fx_examples.data import fashion_mnist_loaders  # noqa: E402
from dyrep_fx_examples.demo import eval_gap, run_variant  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "stability"
#: The step windows ``[start, stop)`` the report summarises.
WINDOWS = ((0, 100), (100, 500), (500, 10**9))
#: Per-site values are written every this many steps (the window statistics use every step).
SAMPLE_EVERY = 10
#: A probe's settings, copied as they are into its summary.
META = ("depth", "variant", "seed", "epochs_run", "test_acc_per_epoch")


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


def probe_one(depth: int, variant: str, seed: int, epochs_run: int, steps: int | None = None) -> dict[str, Any]:
    """Train ``variant`` for ``epochs_run`` epochs of the sweep's schedule (or its first ``steps`` steps);
    the record of every step (:func:`write_probes` writes its summary)."""
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
    return {"depth": depth, "variant": variant, "seed": seed, "epochs_run": epochs_run,
            "test_acc_per_epoch": accs.values, "evals": probe.evals, "steps": probe.steps}


# -- the written form --------------------------------------------------------------------------------
def summarise(run: dict[str, Any], plain: dict[str, Any] | None = None, every: int = SAMPLE_EVERY) -> dict[str, Any]:
    """The compact form of a probe recorded with every step (``run["steps"]``, consecutive iterations).

    Kept whole: the settings, the test accuracy per epoch, the eval gaps and every step's loss (loss spikes
    need them all). Computed from every step: each window's :func:`step_stats`, :func:`radial_share` and,
    given plain's full record of the same depth and seed, :func:`paired_ratio` (``rel_vs_plain``).
    Every ``every``-th step: each site's relative kernel change and kernel norm (columns in ``sites``
    order, ``null`` where the step has none), the median main scale and the median kernel share per kind
    over the grown sites.
    """
    steps = run["steps"]
    its = [s["it"] for s in steps]
    if not its or its != list(range(its[0], its[0] + len(its))):
        raise ValueError(f"probe {run.get('variant')!r}: no steps, or steps that are not consecutive iterations; "
                         "summarise the full record of one run")
    sites = list(dict.fromkeys(name for s in steps for name in s["norm"]))
    sampled = [s for s in steps if s["it"] % every == 0]
    kinds = list(dict.fromkeys(k for s in sampled for share in s.get("share", {}).values() for k in share))
    return {
        **{key: run[key] for key in META}, "evals": run.get("evals", []),
        "first_step": its[0], "loss": [s["loss"] for s in steps],
        "windows": [{"start": a, "stop": b, **{k: _finite(v) for k, v in step_stats(steps, a, b).items()},
                     "radial_share": _finite(radial_share(steps, a, b)),
                     **({} if plain is None else {"rel_vs_plain": _finite(paired_ratio(steps, plain["steps"], a, b))})}
                    for a, b in WINDOWS],
        "sampled": {
            "every": every, "it": [s["it"] for s in sampled], "sites": sites,
            "rel": [[s["rel"].get(n) for n in sites] for s in sampled],
            "norm": [[s["norm"].get(n) for n in sites] for s in sampled],
            "main_scale_median": [_median(s.get("main_scale", {}).values()) for s in sampled],
            "share_median": {k: [_median(v[k] for v in s.get("share", {}).values() if k in v) for s in sampled]
                             for k in kinds},
        },
    }


def sampled_steps(probe: dict[str, Any]) -> list[dict[str, Any]]:
    """A summary's sampled steps as ``[{"it", "rel": {site: change}}]`` (sites without a value left out)."""
    cols = probe["sampled"]
    return [{"it": it, "rel": {n: v for n, v in zip(cols["sites"], row) if v is not None}}
            for it, row in zip(cols["it"], cols["rel"])]


def write_probe(path: Path, summary: dict[str, Any]) -> None:
    """Write a summary as JSON a reviewer can read: one line per key, and one per row of a table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_layout(summary) + "\n")


def write_probes(out: Path, runs: list[dict[str, Any]]) -> list[Path]:
    """Write each full record in ``runs`` as its summary under ``out``, paired with the plain run of the same
    depth and seed where ``runs`` holds one."""
    plains = {(r["depth"], r["seed"]): r for r in runs if r["variant"] == "plain"}
    paths = []
    for run in runs:
        plain = plains.get((run["depth"], run["seed"])) if run["variant"] != "plain" else None
        paths.append(out / f"depth{run['depth']}_{run['variant']}_seed{run['seed']}.json")
        write_probe(paths[-1], summarise(run, plain))
    return paths


def compact(tag_dir: Path) -> list[Path]:
    """Rewrite the probes of ``tag_dir`` recorded with every step (the form before 2026-12-06) as their
    summaries, in place, each paired with the folder's plain run."""
    runs = [json.loads(path.read_text()) for path in sorted(tag_dir.glob("*.json"))]
    done = [path.name for path, run in zip(sorted(tag_dir.glob("*.json")), runs) if "steps" not in run]
    if done:
        raise ValueError(f"{tag_dir}: {done} are summaries already (no 'steps'); compact a folder of full records")
    return write_probes(tag_dir, runs)


def _layout(value: Any, indent: str = "") -> str:
    inner = indent + "  "
    if isinstance(value, dict) and any(isinstance(v, (dict, list)) for v in value.values()):
        items = [f"{inner}{json.dumps(k)}: {_layout(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list) and value and all(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _compact(v) for v in value) + f"\n{indent}]"
    return _compact(value)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _finite(value: float) -> float | None:
    """``value`` to 6 significant digits (the report's 2-3 decimals stay as computed from every step),
    ``None`` (JSON ``null``) for NaN: a window with no steps."""
    return None if math.isnan(value) else float(f"{value:.6g}")


def _number(value: float | None, spec: str) -> str:
    return "nan" if value is None else format(value, spec)


def _median(values: Any) -> float | None:
    values = list(values)
    return _sig(statistics.median(values)) if values else None


# -- analysis ----------------------------------------------------------------------------------------
def step_stats(steps: list[dict[str, Any]], start: int, stop: int) -> dict[str, float]:
    """Median over steps ``[start, stop)`` of the median and max relative kernel change over sites."""
    window = [s for s in steps if start <= s["it"] < stop and s["rel"]]
    med = [statistics.median(s["rel"].values()) for s in window]
    top = [max(s["rel"].values()) for s in window]
    return {"median_rel": statistics.median(med) if med else float("nan"),
            "max_rel": statistics.median(top) if top else float("nan")}


def loss_spikes(losses: list[float], first_step: int = 1, factor: float = 2.0, span: int = 50) -> list[int]:
    """Iterations (the first loss is ``first_step``'s) whose loss exceeds ``factor`` times the median of the
    ``span`` steps before."""
    return [first_step + i for i in range(span, len(losses))
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
    """A table per tag: effective step size against plain's (paired on the sampled steps), its radial
    share, loss spikes, eval gap and accuracy per epoch, read from the probes' summaries."""
    lines = ["| tag | run | rel. kernel change / plain's (steps 0-100, 100-500, 500+) | radial share of the change "
             "(same windows) | loss spikes (>2x) | eval gap: recalibrated - running acc, mean (max) "
             "| test acc per epoch |", "|---|---|---|---|---|---|---|"]
    for tag_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        probes = {p.stem: json.loads(p.read_text()) for p in sorted(tag_dir.glob("*.json"))}
        for stem, run in probes.items():
            plain = probes.get(f"depth{run['depth']}_plain_seed{run['seed']}")
            ratios = "" if plain is None or run["variant"] == "plain" else ", ".join(
                _rel_vs_plain(run, plain, i) for i in range(len(WINDOWS)))
            radial = ", ".join(_number(w["radial_share"], ".3f") for w in run["windows"])
            spikes = loss_spikes(run["loss"], run["first_step"])
            accs = ", ".join(f"{100 * a:.0f}" for a in run["test_acc_per_epoch"])
            gaps = [100 * (e["recalibrated"] - e["running"]) for e in run.get("evals", [])]
            gap = f"{statistics.fmean(gaps):.1f} ({max(gaps):.1f})" if gaps else ""
            lines.append(f"| {tag_dir.name} | {stem} | {ratios} | {radial} | {len(spikes)} {spikes[:5]} | {gap} "
                         f"| {accs} |")
    return "\n".join(lines)


def _rel_vs_plain(run: dict[str, Any], plain: dict[str, Any], window: int) -> str:
    """Window ``window``'s paired ratio: from every step where the run was written with its plain run, else
    estimated on the sampled steps (marked ``~``)."""
    stored = run["windows"][window]
    if "rel_vs_plain" in stored:
        return _number(stored["rel_vs_plain"], ".2f")
    start, stop = WINDOWS[window]
    return "~" + _number(_finite(paired_ratio(sampled_steps(run), sampled_steps(plain), start, stop)), ".2f")


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
    p.add_argument("--compact", nargs="+", type=Path, metavar="TAG_DIR",
                   help="rewrite the folders' probes recorded with every step as their summaries, and stop")
    args = p.parse_args(argv)
    if args.compact:
        for tag_dir in args.compact:
            print("compacted", *compact(tag_dir))
        return
    if not args.report:
        out = args.results / args.tag
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
            runs = list(pool.map(probe_one, [args.depth] * len(args.variants), args.variants,
                                 [args.seed] * len(args.variants), [args.epochs_run] * len(args.variants),
                                 [args.steps] * len(args.variants)))
        print("wrote", *write_probes(out, runs), flush=True)
    print(report(args.results))
    if args.plot:
        plot(args.results, dict(item.split("=", 1) for item in args.plot), args.results / "stability.png")


if __name__ == "__main__":
    main()
