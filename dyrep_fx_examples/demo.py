"""The main job: plain vs DyRep vs DBB-all training of one small CNN on real Fashion-MNIST.

Each variant trains in a fresh process (so its peak memory is its own) with the same seed, data
order and recipe:

* ``plain``: the network as written;
* ``dyrep``: DyRep in online mode -- the most salient conv grows every few hundred iterations,
  unimportant branches are cut, and the model is folded at the end;
* ``dbb``: every 3x3 conv grown with all DBB branches (dbb mode) from the start, the static
  baseline of the DyRep paper.

The reproduction study (``benchmarks/accuracy_study.py``) also trains ``dyrep_online`` / ``dyrep_dbb``
(DyRep in a fixed mode, whatever ``mode`` says) and ``orepa`` (every 3x3 conv with OREPA's linear
branches, online, from the start).

:func:`run_demo` returns a JSON-serialisable report; the command line prints it and writes
``report.json`` and ``demo.png`` to the output folder.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import logging
import multiprocessing
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dyrep_fx import DBB_KINDS, DYREP_KINDS, OREPA_KINDS, DyRep, api, calibrate

from .data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist_loaders, random_crop_flip

__all__ = ["DemoConfig", "REGIME_DYREP", "REGIME_VARIANTS", "regime_figures", "make_net", "multiply_adds", "NET_LAYOUTS", "dyrep_schedule", "epoch_timing", "run_variant", "run_demo", "plot_report", "VARIANTS", "VARIANT_RECIPES"]

log = logging.getLogger(__name__)

#: What ``dyrep-fx demo`` trains by default. Variant names are the same in the demo, the study and the
#: benchmarks: ``plain``, ``dyrep`` (the block mode of the config), ``dyrep_online`` / ``dyrep_dbb``,
#: ``dbb_all`` / ``orepa_all`` (every 3x3 conv grown once with DBB's / OREPA's branches, no DyRep),
#: ``rep_all_online`` / ``rep_all_dbb`` (every 3x3 conv grown once with every DyRep kind that applies to
#: it, identity included where input and output match: RepVGG's recipe, in either mode).
VARIANTS = ("plain", "dyrep", "dbb_all")
#: Every variant :func:`run_variant` trains: ``(mode, static branch kinds)``; ``None`` kinds = DyRep.
VARIANT_RECIPES: dict[str, tuple[str | None, tuple[str, ...] | None]] = {
    "plain": (None, ()),
    "dyrep": (None, None),
    "dyrep_online": ("online", None),
    "dyrep_dbb": ("dbb", None),
    "dbb_all": ("dbb", DBB_KINDS),
    "orepa_all": ("online", OREPA_KINDS),
    "rep_all_online": ("online", DYREP_KINDS),
    "rep_all_dbb": ("dbb", DYREP_KINDS),
}


#: The committed paired figures of the depth sweep at 20 convs that the main job prints beside its run
#: (written by ``benchmarks/depth_sweep.py --report``).
REGIME_FIGURES = Path(__file__).with_name("regime_figures.json")
#: The variants the main job trains.
REGIME_VARIANTS = ("plain", "dyrep", "orepa_all")
#: DyRep's setting in the main job: the best measured at 20 convs (``benchmarks/README.md``, issue 31).
REGIME_DYREP: dict[str, Any] = {"grow_at_start": 0.5, "metric": "snip_per_weight"}


@dataclass
class DemoConfig:
    """Recipe of the demo; ``quick()`` is the setting the tests use."""

    epochs: int = 3
    train_limit: int | None = 6000
    test_limit: int | None = None
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 1e-4
    width: int = 16
    net: str = "demo"
    augment: bool = False
    seed: int = 0
    mode: str = "online"
    step_fraction: float = 0.08
    until_fraction: float = 0.75
    variants: tuple[str, ...] = VARIANTS
    threads: int = 2
    progress: bool = True
    out: str = "out/demo"
    dyrep_options: dict[str, Any] = field(default_factory=dict)  # more DyRep(...) arguments

    @classmethod
    def regime(cls, **overrides: Any) -> DemoConfig:
        """The main job's setting (``dyrep-fx demo``): the depth sweep's 20-conv shortcut-free net, where
        re-parameterization pays (:data:`REGIME_DYREP` for DyRep), on a shorter recipe that trains plain,
        DyRep and ``orepa_all`` in about 4 minutes on 2 cores (two runs at a time, one thread each)."""
        base = dict(epochs=3, train_limit=20000, test_limit=None, batch_size=128, lr=0.1, weight_decay=1e-4,
                    width=8, net="depth20", augment=True, threads=1, variants=REGIME_VARIANTS,
                    dyrep_options=dict(REGIME_DYREP))
        base.update(overrides)
        return cls(**base)

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A setting that runs in well under a minute (for tests and smoke runs)."""
        base = dict(epochs=2, train_limit=2000, test_limit=1000, batch_size=100, width=8, step_fraction=0.25,
                    progress=False)
        base.update(overrides)
        return cls(**base)


#: Convs per stage of each network :func:`make_net` builds (a 2x2 max-pool between stages).
NET_LAYOUTS: dict[str, tuple[int, ...]] = {
    "demo": (2, 2, 1),        # 5 convs: the demo's network
    "study": (2, 3, 3, 2),    # 10 convs: the reproduction study's (more sites than DyRep steps)
    # Deeper shortcut-free layouts for the depth sweep (benchmarks/depth_sweep.py), where plain training
    # degrades with depth: the regime re-parameterization is meant for.
    "depth10": (2, 3, 3, 2),
    "depth20": (5, 5, 5, 5),
    "depth30": (8, 8, 8, 6),
    "depth40": (10, 10, 10, 10),
}


def make_net(width: int = 16, num_classes: int = 10, net: str = "demo") -> nn.Sequential:
    """A small VGG-style CNN for 28x28 grey images: 3x3 convs with BatchNorm and ReLU.

    ``net`` picks the layout (:data:`NET_LAYOUTS`); stage ``i`` has ``width * 2**i`` channels.
    """
    if net not in NET_LAYOUTS:
        raise ValueError(f"unknown net {net!r}; choose from {sorted(NET_LAYOUTS)}")
    layers: list[nn.Module] = []
    cin = 1
    for stage, convs in enumerate(NET_LAYOUTS[net]):
        if stage:
            layers.append(nn.MaxPool2d(2))
        cout = width * 2 ** stage
        for _ in range(convs):
            layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def multiply_adds(model: nn.Module, shape: tuple[int, ...] = (1, 1, 28, 28)) -> int:
    """Multiply-adds of the convs and linear layers of one forward pass on ``shape``."""
    total = 0

    def count(module: nn.Module, inputs, output) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() * module.weight[0].numel()
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * (output.numel() // output.shape[-1])

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(shape))
    finally:
        for h in handles:
            h.remove()
        model.train()
    return total


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _accuracy(model: nn.Module, loader, batches: int | None = None) -> float:
    """Eval-mode accuracy over ``loader`` (its first ``batches`` batches when given); leaves ``model`` in
    train mode."""
    model.eval()
    correct = total = 0
    for i, (x, y) in enumerate(loader):
        if batches is not None and i >= batches:
            break
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train()
    return correct / total


@torch.no_grad()
def eval_gap(model: nn.Module, train_loader, test_loader, calib_batches: int = 20,
             test_batches: int = 16) -> dict[str, float]:
    """Accuracy on the first ``test_batches`` test batches with the BatchNorms' running statistics
    (``running``) and with statistics recomputed as plain averages over ``calib_batches`` training batches
    (``recalibrated``, :func:`dyrep_fx.calibrate`), on a copy. The difference is how far the running averages lag behind the weights:
    an eval-mode effect, not a worse trained function."""
    twin = copy.deepcopy(model)
    running = _accuracy(twin, test_loader, test_batches)  # (leaves twin in train mode)
    calibrate(twin, train_loader, calib_batches)
    return {"running": running, "recalibrated": _accuracy(twin, test_loader, test_batches)}


def _progress(iterable, enabled: bool, desc: str, total: int):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _build(variant: str, config: DemoConfig) -> tuple[nn.Module, str | None, tuple[str, ...] | None]:
    if variant not in VARIANT_RECIPES:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANT_RECIPES)}")
    mode, static_kinds = VARIANT_RECIPES[variant]
    model = make_net(config.width, net=config.net)
    if static_kinds:
        api.transform(model, mode=mode)
        for site in api.sites(model):
            # each 3x3 conv takes the kinds of the set that apply to it (identity only where shapes match)
            kinds = [k for k in static_kinds if k in site.kinds]
            if site.eligible and site.kernel_size == (3, 3) and kinds:
                api.grow(model, [site.name], kinds)
    return model, mode or config.mode, static_kinds


def dyrep_schedule(config: DemoConfig, steps_per_epoch: int) -> tuple[int, int]:
    """``(interval, until)`` in iterations: a step every ``step_fraction`` of training until ``until_fraction``."""
    total = steps_per_epoch * config.epochs
    return max(1, round(total * config.step_fraction)), int(total * config.until_fraction)


def run_variant(variant: str, config: DemoConfig,
                observer: Callable[[nn.Module, int, float], None] | None = None,
                prepare: Callable[[nn.Module], None] | None = None) -> dict[str, Any]:
    """Train one variant and return its measurements (runs in the calling process).

    ``observer(model, iteration, loss)``, when given, is called after every optimizer step (the
    stability probe of ``benchmarks/stability.py`` records kernels and scales through it).
    ``prepare(model)``, when given, changes the built (and grown) model in place before the optimizer
    is made (an ablation of ``benchmarks/depth_sweep.py`` reparametrizes its kernels through it).
    """
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    train_loader, test_loader = fashion_mnist_loaders(config.batch_size, config.train_limit, config.test_limit,
                                                      seed=config.seed)
    model, mode, static_kinds = _build(variant, config)
    if prepare is not None:
        prepare(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    ctl = None
    if static_kinds is None:
        interval, until = dyrep_schedule(config, steps_per_epoch)
        options = dict(config.dyrep_options)
        if options.get("budget") is not None:  # the cost model reads the sites' shapes at the training batch
            options.setdefault("example_inputs", (torch.zeros(config.batch_size, 1, 28, 28),))
        ctl = DyRep(model, optimizer, interval=interval, until=until, mode=mode, calib_loader=train_loader,
                    seed=config.seed, **options)
    # Augmentation draws from its own generator: the same batches for every variant of a seed.
    augment = torch.Generator().manual_seed(config.seed + 7919) if config.augment else None
    fill = -FASHION_MNIST_MEAN / FASHION_MNIST_STD
    peak_params = _param_count(model)
    epochs: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(config.epochs):
        start, cpu_start, busy_start = time.perf_counter(), time.process_time(), machine_busy_seconds()
        running = 0.0
        for x, y in _progress(train_loader, config.progress, f"{variant} epoch {epoch + 1}", steps_per_epoch):
            if augment is not None:
                x = random_crop_flip(x, augment, fill=fill)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += float(loss.detach())
            if observer is not None:
                observer(model, scheduler.last_epoch, float(loss.detach()))
            if ctl is not None:
                result = ctl.step()
                if result.changed:
                    events.append({"epoch": epoch + 1, "unit": result.unit, "grown": result.grown,
                                   "cut": result.cut})
                    peak_params = max(peak_params, _param_count(model))
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        busy = machine_busy_seconds()
        foreign = None if busy is None or busy_start is None else max(0.0, busy - busy_start - cpu_seconds)
        epochs.append({"epoch": epoch + 1, "train_loss": running / steps_per_epoch, "seconds": seconds,
                       "cpu_seconds": cpu_seconds, "foreign_cpu_seconds": foreign,
                       "test_acc": _accuracy(model, test_loader),
                       "eval_gap": eval_gap(model, train_loader, test_loader)})
        log.info("%s epoch %d: loss %.4f, test acc %.4f, %.1f s (CPU %.1f s)", variant, epoch + 1,
                 epochs[-1]["train_loss"], epochs[-1]["test_acc"], seconds, cpu_seconds)
    trained_params = _param_count(model)
    folded = api.fold(model) if api.is_transformed(model) else model
    model.eval()
    folded.eval()
    x, _ = next(iter(test_loader))
    with torch.no_grad():
        fold_error = float((folded(x) - model(x)).abs().max())
    fresh = make_net(config.width, net=config.net)
    fresh.load_state_dict(folded.state_dict(), strict=True)
    return {
        "variant": variant,
        "epochs": epochs,
        "test_acc": epochs[-1]["test_acc"],
        "folded_test_acc": _accuracy(fresh, test_loader),
        **epoch_timing(epochs),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params_training_peak": peak_params,
        "params_training_end": trained_params,
        "params_folded": _param_count(folded),
        "multiply_adds_folded": multiply_adds(fresh),
        "fold_max_abs_error": fold_error,
        "events": events,
        "branch_history": ctl.history if ctl is not None else [],
        "total_iterations": total_steps,
        "dyrep_interval": ctl.schedule.interval if ctl is not None else None,
        "final_structure": api.structure(model)["sites"] if api.is_transformed(model) else {},
    }


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy since boot (Linux ``/proc/stat``; else ``None``)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def epoch_timing(epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median wall and CPU seconds per epoch over the epochs after the first (warm-up), and load.

    ``foreign_cpu_share`` is the CPU time other processes used during those epochs per wall second
    (median); ``machine_loaded`` is set above a quarter of a core, when wall-clock ratios between runs
    are not to be trusted (CPU time is disturbed much less).
    """
    timed = epochs[1:] or epochs
    wall = statistics.median(e["seconds"] for e in timed)
    cpu = statistics.median(e["cpu_seconds"] for e in timed)
    shares = [e["foreign_cpu_seconds"] / e["seconds"] for e in timed if e.get("foreign_cpu_seconds") is not None]
    share = statistics.median(shares) if shares else None
    return {"seconds_per_epoch": wall, "cpu_seconds_per_epoch": cpu, "foreign_cpu_share": share,
            "machine_loaded": share is not None and share > 0.25}


def run_demo(config: DemoConfig, jobs: int | None = None) -> dict[str, Any]:
    """Run every variant of ``config`` in its own fresh process, ``jobs`` at a time (default: as many as
    the cores hold at ``config.threads`` each); return the report with the runs in ``config.variants``'
    order."""
    jobs = jobs or max(1, min(len(config.variants), (os.cpu_count() or 1) // max(1, config.threads)))
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = [pool.submit(run_variant, variant, config) for variant in config.variants]
        results = [f.result() for f in futures]
    return {"config": asdict(config), "plain_params": _param_count(make_net(config.width, net=config.net)),
            "runs": results}


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Accuracy per epoch for every run, and branch counts per layer over DyRep training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_br) = plt.subplots(1, 2, figsize=(11, 4))
    for run in report["runs"]:
        ax_acc.plot([e["epoch"] for e in run["epochs"]], [100 * e["test_acc"] for e in run["epochs"]],
                    marker="o", label=run["variant"])
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Fashion-MNIST test accuracy")
    ax_acc.legend()
    dyrep = next((r for r in report["runs"] if r["branch_history"]), None)
    if dyrep is not None:
        history = dyrep["branch_history"]
        sites = sorted({s for h in history for s in h["branches"]})
        # start from the plain model and hold the last structure to the end of training
        units = [0] + [h["unit"] for h in history] + [dyrep.get("total_iterations", history[-1]["unit"])]
        for site in sites:
            counts = [h["branches"].get(site, 0) for h in history]
            ax_br.step(units, [0] + counts + counts[-1:], where="post", label=site)
        ax_br.legend(fontsize=7)
    ax_br.set(xlabel="iteration", ylabel="branches", title="DyRep: branches per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``demo.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "report.json", out / "demo.png"
    json_path.write_text(json.dumps(report, indent=2))
    plot_report(report, png_path)
    return json_path, png_path


def regime_figures(path: Path | None = None) -> dict[str, Any] | None:
    """The depth sweep's committed figures at 20 convs (gain over plain ± SE over paired seeds, step-time
    ratios, the frontier plot's path), or ``None`` when the file is absent."""
    path = path or REGIME_FIGURES
    return json.loads(path.read_text()) if path.exists() else None
