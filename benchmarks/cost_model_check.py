"""The execution cost model (:mod:`dyrep_fx.cost_model`) against side-by-side measurement.

DyRep's ``budget`` trusts the cost model's predicted step-time ratio of a grown structure to plain's.
This script builds structures on the depth sweep's nets (10, 20, 30 convs, batch 128, 28x28) and on
torchvision's ResNet-18 and ResNet-50 (batch 16, 64x64): plain, every 3x3 site grown with one, three,
OREPA's or DyRep's kinds, half of the sites grown; it times training steps of all of them in one process,
one thread, interleaved round by round (the median CPU seconds per step), and prints each structure's
measured and predicted ratio to its net's plain.

``--fit`` fits the cost model's constants by non-negative least squares on every net's structures (each
step time a linear function of the model's terms); beside each prediction it prints the one made with
constants fitted on the other nets only (a net the fit never saw). The constants in
:data:`dyrep_fx.cost_model.DEFAULT_COST_MODEL` come from such a fit.

    .venv/bin/python benchmarks/cost_model_check.py --fit     # writes results/cost_model/check.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_json  # noqa: E402
from sweep_cost import step_seconds  # noqa: E402

import dyrep_fx  # noqa: E402
from dyrep_fx.cost_model import DEFAULT_COST_MODEL, CostModel, structure_budget  # noqa: E402
from dyrep_fx_examples.demo import make_net  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cost_model"
#: The nets: name -> (builder, batch, input size, channels); the sweep nets are fitted, the ResNets checked.
NETS: dict[str, tuple[Callable[[], nn.Module], int, int, int]] = {
    "depth10": (lambda: make_net(8, net="depth10"), 128, 28, 1),
    "depth20": (lambda: make_net(8, net="depth20"), 128, 28, 1),
    "depth30": (lambda: make_net(8, net="depth30"), 128, 28, 1),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 16, 64, 3),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), 16, 64, 3),
}
#: The structures: name -> (which 3x3 sites grow: "all", "first_half"; the kinds offered).
STRUCTURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "plain": ("all", ()),
    "one_kind": ("all", ("1x1",)),
    "three_kinds": ("all", ("1x1", "1xk", "kx1")),
    "orepa": ("all", tuple(dyrep_fx.OREPA_KINDS)),
    "dyrep_kinds": ("all", tuple(dyrep_fx.DYREP_KINDS)),
    "half_dyrep_kinds": ("first_half", tuple(dyrep_fx.DYREP_KINDS)),
}


def build(net: str, structure: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``net`` with ``structure`` grown (transformed with a training batch, so its sites have shapes)."""
    make, batch, size, channels = NETS[net]
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(batch, channels, size, size), torch.randint(0, 10, (batch,))
    dyrep_fx.transform(model, example_inputs=(x,))
    which, kinds = STRUCTURES[structure]
    sites = [s for s in dyrep_fx.sites(model) if s.eligible and s.kernel_size == (3, 3)]
    if which == "first_half":
        sites = sites[: len(sites) // 2]
    for site in sites:
        offered = [k for k in kinds if k in site.kinds]
        if offered:
            dyrep_fx.grow(model, [site.name], offered)
    return model, x, y


def terms(model: nn.Module) -> np.ndarray:
    """The model's predicted cost split by the cost model's constants: ``[conv products and compositions,
    elementwise, blocks, branch terms, branch elements, fixed]`` (the cost is their sum, linear in the
    constants)."""
    zero = CostModel(elementwise=0.0, block=0.0, term=0.0, term_element=0.0, fixed=0.0)
    base = _cost(model, zero)
    out = [base]
    for field in ("elementwise", "block", "term", "term_element", "fixed"):
        out.append(_cost(model, dataclasses.replace(zero, **{field: 1.0})) - base)
    return np.array(out)


def _cost(model: nn.Module, cost_model: CostModel) -> float:
    budget = structure_budget(model, dyrep_fx.sites(model), cost_model=cost_model)
    return budget.plain + budget.added(dyrep_fx.blocks(model))


def measure(rounds: int, steps: int) -> dict[str, dict[str, Any]]:
    """Median CPU seconds per step of every (net, structure), interleaved round by round within a net."""
    out: dict[str, dict[str, Any]] = {}
    for net in NETS:
        built = {s: build(net, s) for s in STRUCTURES}
        for model, x, y in built.values():
            step_seconds(model, x, y, 2)  # warm-up
        samples: dict[str, list[float]] = {s: [] for s in built}
        for _ in range(rounds):
            for structure, (model, x, y) in built.items():
                samples[structure].append(step_seconds(model, x, y, steps))
        for structure, (model, _, _) in built.items():
            out[f"{net}/{structure}"] = {"net": net, "structure": structure,
                                         "seconds": statistics.median(samples[structure]),
                                         "terms": terms(model).tolist()}
        print(f"{net}: measured", flush=True)
    return out


def fit(rows: dict[str, dict[str, Any]], nets: tuple[str, ...]) -> CostModel:
    """Non-negative least-squares constants (in conv products' units) from the rows of ``nets``.

    Each row's step time is the model's terms weighted by the constants over a time per conv MAC; rows are
    weighted by 1 / their time, so relative errors count alike on every net. A constant the data would make
    negative is held at zero (the others refitted).
    """
    fitted = [r for r in rows.values() if r["net"] in nets]
    a = np.array([r["terms"] for r in fitted])
    t = np.array([r["seconds"] for r in fitted])
    a = a / t[:, None]
    free = list(range(a.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(a[:, free], np.ones_like(t), rcond=None)
        if (coef >= 0).all() or len(free) == 1:
            break
        free.pop(int(np.argmin(coef)))
    full = np.zeros(a.shape[1])
    full[free] = np.clip(coef, 0.0, None)
    per_mac = full[0] if full[0] > 0 else 1.0
    e, b, term, te, fixed = (float(c / per_mac) for c in full[1:])
    return CostModel(elementwise=e, block=b, term=term, term_element=te, fixed=fixed)


def held_out(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each net's ratios predicted by constants fitted on the other nets only."""
    out = []
    for net in NETS:
        others = tuple(n for n in NETS if n != net)
        out += [r for r in ratios(rows, fit(rows, others)) if r["net"] == net]
    return out


def ratios(rows: dict[str, dict[str, Any]], cost_model: CostModel) -> list[dict[str, Any]]:
    """Per row: measured and predicted ratio to its net's plain."""
    weights = np.array([1.0, cost_model.elementwise, cost_model.block, cost_model.term, cost_model.term_element,
                        cost_model.fixed])
    out = []
    for key, r in rows.items():
        plain = rows[f"{r['net']}/plain"]
        measured = r["seconds"] / plain["seconds"]
        predicted = float(np.dot(r["terms"], weights) / np.dot(plain["terms"], weights))
        out.append({"row": key, "net": r["net"], "measured": measured, "predicted": predicted,
                    "error": predicted - measured})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--fit", action="store_true", help="fit the constants on every net (else: the library's)")
    p.add_argument("--out", type=Path, default=RESULTS / "check.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.rounds, args.steps)
    cost_model = fit(rows, tuple(NETS)) if args.fit else DEFAULT_COST_MODEL
    table, unseen = ratios(rows, cost_model), {r["row"]: r for r in held_out(rows)}
    print("structure                    measured  predicted  (constants fitted without its net)")
    for r in table:
        print(f"{r['row']:28s} {r['measured']:8.2f}  {r['predicted']:9.2f}  ({unseen[r['row']]['predicted']:.2f})")
    grown = [r for r in table if not r["row"].endswith("/plain")]
    out = {"cost_model": dataclasses.asdict(cost_model), "fitted": args.fit, "rows": rows, "ratios": table,
           "held_out": list(unseen.values()),
           "mean_abs_error": statistics.fmean(abs(r["error"]) for r in grown),
           "held_out_mean_abs_error": statistics.fmean(abs(unseen[r["row"]]["error"]) for r in grown),
           "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    print(f"mean |predicted - measured| ratio: {out['mean_abs_error']:.3f} "
          f"(held out net by net: {out['held_out_mean_abs_error']:.3f})")
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
