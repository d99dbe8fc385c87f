"""The ``dyrep-fx`` command line: ``demo``, ``inspect`` and ``fold``. The only code that prints."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo, write_report

    config = DemoConfig.quick() if args.quick else DemoConfig()
    for key in ("epochs", "train_limit", "test_limit", "mode", "seed", "width", "out"):
        value = getattr(args, key)
        if value is not None:
            setattr(config, key, value)
    if args.variants:
        config.variants = tuple(args.variants.split(","))
    config.progress = not args.no_progress and sys.stderr.isatty()
    print(f"dyrep-fx demo: Fashion-MNIST, {config.epochs} epochs, train subset {config.train_limit or 'all'}, "
          f"variants {', '.join(config.variants)} (each in a fresh process)", flush=True)
    try:
        report = run_demo(config)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json_path, png_path = write_report(report, Path(config.out))
    print(_demo_table(report))
    if any(r["machine_loaded"] for r in report["runs"]):
        print("note: other processes used over a quarter of a core during some runs (column 'other CPU'): "
              "compare CPU seconds, not wall seconds")
    for run in report["runs"]:
        for event in run["events"]:
            what = [f"grew {s} ({', '.join(k)})" for s, k in event["grown"].items()]
            what += [f"cut {', '.join(k)} from {s}" for s, k in event["cut"].items()]
            print(f"  [{run['variant']}] epoch {event['epoch']}, iteration {event['unit']}: " + "; ".join(what))
        if run["final_structure"]:
            print(f"  [{run['variant']}] final structure before folding:")
            print(_structure_lines(run["final_structure"]))
    print(f"report: {json_path}\nplot:   {png_path}")
    return 0


def _demo_table(report: dict) -> str:
    rows = ["| variant | test acc | folded acc | s/epoch wall | s/epoch CPU | other CPU | peak RSS MiB "
            "| params (train peak) | params folded | fold max err |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        other = "n/a" if r["foreign_cpu_share"] is None else f"{r['foreign_cpu_share']:.2f} core"
        rows.append(f"| {r['variant']} | {100 * r['test_acc']:.2f}% | {100 * r['folded_test_acc']:.2f}% "
                    f"| {r['seconds_per_epoch']:.1f} | {r['cpu_seconds_per_epoch']:.1f} | {other} "
                    f"| {r['peak_rss_mib']:.0f} | {r['params_training_peak']:,} "
                    f"| {r['params_folded']:,} | {r['fold_max_abs_error']:.1e} |")
    rows.append("(seconds: median over the epochs after the first; 'other CPU': what other processes used)")
    return "\n".join(rows)


def _structure_lines(structure: dict, indent: str = "    ") -> str:
    """One line per grown site with its branches; nested blocks indented under their parent."""
    lines = []
    for name, site in structure.items():
        lines.append(f"{indent}{name}: {', '.join(site['kinds']) or 'plain conv (every branch cut)'}")
        for inner, spec in site.get("nested", {}).items():
            lines.append(_structure_lines({f"{name}.{inner}": spec}, indent + "  "))
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    import torch
    import torchvision

    from . import api

    try:
        model = torchvision.models.get_model(args.name, weights=None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = args.size
    example = (torch.randn(1, 3, size, size),)
    api.transform(model, example_inputs=example, mode=args.mode)
    found = api.sites(model)
    if args.json:
        print(json.dumps([s.as_dict() for s in found], indent=1, default=str))
        return 0
    print(f"{args.name}: {len(found)} conv sites, {sum(s.eligible for s in found)} eligible ({args.mode} mode)")
    print(f"{'site':40} {'cin':>5} {'cout':>5} {'k':>5} {'s':>4} {'g':>5} {'output':>18}  kinds / reason")
    for s in found:
        k = "x".join(map(str, s.kernel_size))
        out = "x".join(map(str, s.output_shape[1:])) if s.output_shape else "?"
        tail = ",".join(s.kinds) if s.eligible else f"NOT ELIGIBLE: {s.reason}"
        print(f"{s.name:40} {s.in_channels:5} {s.out_channels:5} {k:>5} {s.stride[0]:4} {s.groups:5} {out:>18}  {tail}")
    return 0


def _fold(args: argparse.Namespace) -> int:
    from .mm.fold_checkpoint import fold_checkpoint

    out = fold_checkpoint(args.config, args.checkpoint, args.out, use_ema=args.ema)
    print(f"folded checkpoint written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dyrep-fx``."""
    parser = argparse.ArgumentParser(prog="dyrep-fx", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="plain vs DyRep vs DBB-all on real Fashion-MNIST (the main job)")
    demo.add_argument("--quick", action="store_true", help="a tiny setting that runs in well under a minute")
    demo.add_argument("--epochs", type=int)
    demo.add_argument("--train-limit", type=int, help="class-balanced training subset size")
    demo.add_argument("--test-limit", type=int)
    demo.add_argument("--mode", choices=["online", "dbb"], help="DyRep block mode (default online)")
    demo.add_argument("--seed", type=int)
    demo.add_argument("--width", type=int, help="channels of the first conv")
    demo.add_argument("--variants", help="comma-separated subset of plain,dyrep,dbb")
    demo.add_argument("--out", help="output folder for report.json and demo.png (default out/demo)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_demo)

    inspect = sub.add_parser("inspect", help="the conv sites table of a torchvision model")
    inspect.add_argument("name", help="a torchvision model name, e.g. resnet18")
    inspect.add_argument("--mode", choices=["online", "dbb"], default="online")
    inspect.add_argument("--size", type=int, default=224, help="input image size for shapes")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=_inspect)

    fold = sub.add_parser("fold", help="fold a DyRepHook training checkpoint into the config's plain model")
    fold.add_argument("config", help="the mmdet/mmseg config the checkpoint was trained with")
    fold.add_argument("checkpoint")
    fold.add_argument("-o", "--out", required=True, help="where to write the folded checkpoint")
    fold.add_argument("--ema", action="store_true", help="fold the EMA weights of the checkpoint")
    fold.set_defaults(func=_fold)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dyrep-fx`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
