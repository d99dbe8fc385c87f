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
import json
import logging
import multiprocessing
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import api
from .controller import DyRep
from .data import fashion_mnist_loaders
from .geometry import DBB_KINDS, OREPA_KINDS

__all__ = ["DemoConfig", "make_net", "run_variant", "run_demo", "plot_report", "VARIANTS", "VARIANT_RECIPES"]

log = logging.getLogger(__name__)

VARIANTS = ("plain", "dyrep", "dbb")
#: Every variant :func:`run_variant` trains: ``(mode, static branch kinds)``; ``None`` kinds = DyRep.
VARIANT_RECIPES: dict[str, tuple[str | None, tuple[str, ...] | None]] = {
    "plain": (None, ()),
    "dyrep": (None, None),
    "dyrep_online": ("online", None),
    "dyrep_dbb": ("dbb", None),
    "dbb": ("dbb", DBB_KINDS),
    "orepa": ("online", OREPA_KINDS),
}


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
    seed: int = 0
    mode: str = "online"
    grows_per_epoch: int = 2
    until_fraction: float = 0.75
    variants: tuple[str, ...] = VARIANTS
    threads: int = 2
    progress: bool = True
    out: str = "out/demo"
    dyrep_options: dict[str, Any] = field(default_factory=dict)  # more DyRep(...) arguments

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A setting that runs in well under a minute (for tests and smoke runs)."""
        base = dict(epochs=2, train_limit=2000, test_limit=1000, batch_size=100, width=8, grows_per_epoch=2,
                    progress=False)
        base.update(overrides)
        return cls(**base)


def make_net(width: int = 16, num_classes: int = 10) -> nn.Sequential:
    """A small VGG-style CNN for 28x28 grey images: 3x3 convs with BatchNorm and ReLU."""
    def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    w = width
    return nn.Sequential(
        *block(1, w), *block(w, w), nn.MaxPool2d(2),
        *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
        *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes),
    )


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train()
    return correct / total


def _progress(iterable, enabled: bool, desc: str, total: int):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def run_variant(variant: str, config: DemoConfig) -> dict[str, Any]:
    """Train one variant and return its measurements (runs in the calling process)."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    train_loader, test_loader = fashion_mnist_loaders(config.batch_size, config.train_limit, config.test_limit,
                                                      seed=config.seed)
    if variant not in VARIANT_RECIPES:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANT_RECIPES)}")
    mode, static_kinds = VARIANT_RECIPES[variant]
    mode = mode or config.mode
    model = make_net(config.width)
    ctl = None
    if static_kinds:
        api.transform(model, mode=mode)
        api.grow(model, [s.name for s in api.sites(model) if s.eligible and s.kernel_size == (3, 3)],
                 list(static_kinds))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    if static_kinds is None:
        interval = max(1, steps_per_epoch // config.grows_per_epoch)
        ctl = DyRep(model, optimizer, interval=interval, until=int(total_steps * config.until_fraction),
                    mode=mode, calib_loader=train_loader, seed=config.seed, **config.dyrep_options)
    peak_params = _param_count(model)
    epochs: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(config.epochs):
        start = time.perf_counter()
        running = 0.0
        for x, y in _progress(train_loader, config.progress, f"{variant} epoch {epoch + 1}", steps_per_epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += float(loss.detach())
            if ctl is not None:
                result = ctl.step()
                if result.changed:
                    events.append({"epoch": epoch + 1, "unit": result.unit, "grown": result.grown,
                                   "cut": result.cut})
                    peak_params = max(peak_params, _param_count(model))
        seconds = time.perf_counter() - start
        epochs.append({"epoch": epoch + 1, "train_loss": running / steps_per_epoch, "seconds": seconds,
                       "test_acc": _accuracy(model, test_loader)})
        log.info("%s epoch %d: loss %.4f, test acc %.4f, %.1f s", variant, epoch + 1, epochs[-1]["train_loss"],
                 epochs[-1]["test_acc"], seconds)
    trained_params = _param_count(model)
    folded = api.fold(model) if "_dyrep_fx" in model.__dict__ else model
    model.eval()
    folded.eval()
    x, _ = next(iter(test_loader))
    with torch.no_grad():
        fold_error = float((folded(x) - model(x)).abs().max())
    fresh = make_net(config.width)
    fresh.load_state_dict(folded.state_dict(), strict=True)
    return {
        "variant": variant,
        "epochs": epochs,
        "test_acc": epochs[-1]["test_acc"],
        "folded_test_acc": _accuracy(fresh, test_loader),
        "seconds_per_epoch": sum(e["seconds"] for e in epochs) / len(epochs),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params_training_peak": peak_params,
        "params_training_end": trained_params,
        "params_folded": _param_count(folded),
        "fold_max_abs_error": fold_error,
        "events": events,
        "branch_history": ctl.history if ctl is not None else [],
        "total_iterations": total_steps,
        "final_structure": api.structure(model)["sites"] if "_dyrep_fx" in model.__dict__ else {},
    }


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run every variant of ``config`` in its own fresh process; return the report."""
    results = []
    ctx = multiprocessing.get_context("spawn")
    for variant in config.variants:
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            results.append(pool.submit(run_variant, variant, config).result())
    return {"config": asdict(config), "plain_params": _param_count(make_net(config.width)), "runs": results}


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
