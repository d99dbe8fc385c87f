"""Cost of ``dyrep_fx.transform`` (trace + analyse) over the torchvision classification zoo.

    .venv/bin/python benchmarks/transform_cost.py                 # every builder in torchvision's registry
    .venv/bin/python benchmarks/transform_cost.py --models resnet50,mobilenet_v3_large
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, summary, write_json  # noqa: E402

import dyrep_fx  # noqa: E402


def measure(name: str, repeats: int) -> dict:
    """Median wall time of transform (fresh model each time) and the site counts."""
    times = []
    for _ in range(repeats):
        model = torchvision.models.get_model(name, weights=None)  # building it is not what is measured
        start = time.perf_counter()
        dyrep_fx.transform(model)
        times.append(time.perf_counter() - start)
    sites = dyrep_fx.sites(model)
    return {"model": name, "seconds": summary(times), "sites": len(sites),
            "eligible": sum(s.eligible for s in sites)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated names (default: the whole classification registry)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="out/benchmarks/transform_cost.json")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
    rows = []
    print("| model | transform s (median) | sites | eligible |\n|---|---|---|---|")
    for name in names:
        try:
            row = measure(name, args.repeats)
        except Exception as exc:  # a model that cannot be transformed is reported, not fatal
            print(f"| {name} | failed: {type(exc).__name__}: {exc} | | |", flush=True)
            continue
        rows.append(row)
        print(f"| {name} | {row['seconds']['median']:.3f} | {row['sites']} | {row['eligible']} |", flush=True)
    write_json(args.out, {"machine": machine(), "rows": rows})
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
