"""The ``dyrep-fx`` command line: ``demo``, ``inspect``, ``train`` and ``fold``. The only code that prints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from dyrep_fx_examples.demo import DemoConfig, run_demo, write_report

    config = DemoConfig.quick() if args.quick else DemoConfig.regime()
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
    if not args.quick:
        print(_regime_lines(config))
    return 0


def _regime_lines(config) -> str:
    """The committed paired figures of the regime beside the single run: what one run can and cannot show."""
    from dyrep_fx_examples.demo import regime_figures

    figures = regime_figures()
    if figures is None:
        return "(the depth sweep's committed figures are not installed: see benchmarks/README.md)"
    lines = [f"\nThe same net over {figures['seeds']} paired seeds (depth sweep, {figures['recipe']}; "
             f"this run: {config.epochs} epochs on {config.train_limit} images, one seed):",
             "| variant | gain over plain (points ± SE) | vs random sites | step time × plain: end structure (mean over training) |",
             "|---|---|---|---|"]
    for name, row in figures["variants"].items():
        gain = row["vs_plain"]
        lines.append(f"| {name} | {gain['mean']:+.2f} ± {gain['se']:.2f} | "
                     + (f"{row['vs_random']['mean']:+.2f} ± {row['vs_random']['se']:.2f}" if row.get("vs_random") else "")
                     + f" | {row['step_ratio']:.2f}" + (f" ({row['mean_step_ratio']:.2f})" if row.get("mean_step_ratio") else "")
                     + " |")
    lines.append(f"One run is one seed: plain's accuracy alone spreads by {figures['plain_spread']:.1f} points "
                 "(std over seeds), so a single run's differences of that size say nothing; the paired "
                 f"figures above do. Frontier plot: {figures['plot']}")
    return "\n".join(lines)


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


def _is_config(name: str) -> bool:
    """An OpenMMLab config (a ``.py`` file or ``package::path``) rather than a torchvision model name."""
    return name.endswith(".py") or "::" in name


def _sites_table(found: list) -> list[str]:
    """The sites table: one line per site, eligible ones with the kinds they can grow, others with why not."""
    lines = [f"{'site':44} {'cin':>5} {'cout':>5} {'k':>5} {'s':>3} {'g':>5} {'output':>16} {'calls':>5}"
             "  kinds / reason"]
    for s in found:
        k = "x".join(map(str, s.kernel_size))
        out = "x".join(map(str, s.output_shape[1:])) if s.output_shape else "?"
        calls = "?" if s.calls is None else str(s.calls)
        tail = ",".join(s.kinds) if s.eligible else f"NOT ELIGIBLE: {s.reason}"
        lines.append(f"{s.name:44} {s.in_channels:5} {s.out_channels:5} {k:>5} {s.stride[0]:3} {s.groups:5} "
                     f"{out:>16} {calls:>5}  {tail}")
    return lines


def _inspect(args: argparse.Namespace) -> int:
    if _is_config(args.name):
        return _inspect_config(args)
    if args.targets or args.cfg_options:
        print("error: --targets and --cfg-options apply to OpenMMLab configs only", file=sys.stderr)
        return 2
    import torch
    import torchvision

    from . import api

    try:
        model = torchvision.models.get_model(args.name, weights=None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = args.size or 224
    mode = args.mode or "online"
    example = (torch.randn(1, 3, size, size),)
    api.transform(model, example_inputs=example, mode=mode)
    found = api.sites(model)
    if args.json:
        print(json.dumps([s.as_dict() for s in found], indent=1, default=str))
        return 0
    print(f"{args.name}: {len(found)} conv sites, {sum(s.eligible for s in found)} eligible ({mode} mode)")
    print("\n".join(_sites_table(found)))
    return 0


def _inspect_config(args: argparse.Namespace) -> int:
    try:
        from .mm.inspect_config import inspect_config
        from .mm.train import TrainConfigError
    except ImportError as exc:
        print(f"error: inspecting a config needs OpenMMLab's mmengine ({exc}); install dyrep_fx[mm]", file=sys.stderr)
        return 2
    size = None if args.size is None else (args.size, args.size)
    try:
        targets = args.targets.split(",") if args.targets else None
        found = inspect_config(args.name, size=size, mode=args.mode, targets=targets,
                               cfg_options=args.cfg_options)
    except TrainConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(found.as_dict(), indent=1, default=str))
        return 0
    height, width = found.image_size
    print(f"{found.config}: {found.model_type}, DyRep targets {', '.join(found.targets)} ({found.mode} mode), "
          f"dummy input 1x3x{height}x{width}")
    if not found.hook_found:
        print("note: the config has no DyRepHook in custom_hooks: showing DyRepHook's default targets "
              f"{found.targets}")
    if found.forward_error:
        print(f"note: the model's tensor-mode forward failed on the dummy input ({found.forward_error}); "
              "the targets were traced without example inputs")
    for entry in found.per_target:
        eligible = sum(s.eligible for s in entry.sites)
        print(f"\n[{entry.target}] {len(entry.sites)} conv sites, {eligible} eligible")
        if entry.note:
            print(f"note: {entry.note}")
        if entry.sites:
            print("\n".join(_sites_table(entry.sites)))
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))  # torch.distributed.launch's argument
    try:
        from .mm.checkpoint import CheckpointError
        from .mm.train import TrainConfigError, train_from_config
    except ImportError as exc:
        print(f"error: dyrep-fx train needs OpenMMLab's mmengine and the config's package (mmdet, mmseg...) "
              f"({exc}); install dyrep_fx[mm]", file=sys.stderr)
        return 2
    try:
        runner = train_from_config(args.config, work_dir=args.work_dir, resume=args.resume,
                                   cfg_options=args.cfg_options, launcher=args.launcher, amp=args.amp,
                                   auto_scale_lr=args.auto_scale_lr)
    except (TrainConfigError, CheckpointError) as exc:
        return _error(args, exc)
    if runner.rank == 0:
        print(f"dyrep-fx train: finished at iteration {runner.iter} (epoch {runner.epoch}); "
              f"work dir {runner.work_dir}")
    return 0


def _error(args: argparse.Namespace, exc: Exception) -> int:
    """Print ``exc`` as one ``error:`` line on stderr and return exit code 2; with ``--debug``, re-raise
    it instead (the whole traceback)."""
    if getattr(args, "debug", False):
        raise exc
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    print(f"error: {message}", file=sys.stderr)
    return 2


def _fold(args: argparse.Namespace) -> int:
    try:
        from .mm.checkpoint import CheckpointError
        from .mm.fold_checkpoint import fold_checkpoint
        from .mm.train import TrainConfigError
    except ImportError as exc:
        print(f"error: dyrep-fx fold needs OpenMMLab's mmengine and the config's package (mmdet, mmseg...) "
              f"({exc}); install dyrep_fx[mm]", file=sys.stderr)
        return 2
    try:
        out = fold_checkpoint(args.config, args.checkpoint, args.out, use_ema=args.ema)
    except (CheckpointError, TrainConfigError) as exc:
        return _error(args, exc)
    print(f"folded checkpoint written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dyrep-fx``."""
    parser = argparse.ArgumentParser(prog="dyrep-fx", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the whole traceback instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="plain vs DyRep vs DBB-all on real Fashion-MNIST (the main job)")
    demo.add_argument("--quick", action="store_true", help="a tiny setting that runs in well under a minute")
    demo.add_argument("--epochs", type=int)
    demo.add_argument("--train-limit", type=int, help="class-balanced training subset size")
    demo.add_argument("--test-limit", type=int)
    demo.add_argument("--mode", choices=["online", "dbb"], help="DyRep block mode (default online)")
    demo.add_argument("--seed", type=int)
    demo.add_argument("--width", type=int, help="channels of the first conv")
    demo.add_argument("--variants", help="comma-separated variants (default plain,dyrep,dbb_all; also dyrep_online, dyrep_dbb, orepa_all)")
    demo.add_argument("--out", help="output folder for report.json and demo.png (default out/demo)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_demo)

    inspect = sub.add_parser(
        "inspect", help="the conv sites table of a torchvision model or of an OpenMMLab config's DyRep targets",
        description="The conv sites of a torchvision model, or of the DyRepHook targets of an OpenMMLab config "
                    "(a .py file or package::path such as mmdet::retinanet/retinanet_r50_fpn_1x_coco.py; "
                    "the targets and mode of its DyRepHook entry, ['backbone'] without one): geometry, "
                    "output shape, calls per forward, and the branch kinds each site can grow or why not. "
                    "A config's model is built without loading any weights and run once on a dummy image.")
    inspect.add_argument("name", help="a torchvision model name (e.g. resnet18) or an OpenMMLab config")
    inspect.add_argument("--mode", choices=["online", "dbb"],
                         help="block mode (default: the config's DyRepHook mode, else online)")
    inspect.add_argument("--size", type=int, help="square input size for shapes (default: 224 for torchvision "
                                                  "models; a config's own image scale, else 256)")
    inspect.add_argument("--targets", help="a config's submodules to inspect, comma-separated (default: its "
                                           "DyRepHook targets)")
    inspect.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE",
                         help="override a config's entries (as for train), e.g. model.backbone.frozen_stages=1")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=_inspect)

    train = sub.add_parser(
        "train", help="train an OpenMMLab config with mmengine's Runner (what mmdet's / mmseg's tools/train.py do)",
        description="Train an OpenMMLab (mmdet, mmseg, ...) config with mmengine's Runner, as the tools/train.py "
                    "of mmdet and mmseg do, which pip installs do not ship. CONFIG is a file, or package::path "
                    "in the installed package's shipped configs (its .mim/configs folder), e.g. "
                    "mmdet::retinanet/retinanet_r50_fpn_1x_coco.py. Registries resolve in the config's "
                    "default_scope. Distributed: torchrun --nproc_per_node N -m dyrep_fx.cli train CONFIG "
                    "--launcher pytorch (without a GPU the ranks train on CPU over gloo).")
    train.add_argument("config", help="config file, or package::path (e.g. mmdet::retinanet/...py)")
    train.add_argument("--work-dir", help="where logs and checkpoints go (default: the config's work_dir, "
                                          "else work_dirs/<config name>)")
    train.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                       help="resume training: from CHECKPOINT, or without a value from the latest checkpoint in "
                            "the work dir")
    train.add_argument("--amp", action="store_true",
                       help="mixed precision: OptimWrapper becomes AmpOptimWrapper (needs a CUDA GPU)")
    train.add_argument("--auto-scale-lr", action="store_true",
                       help="scale the learning rate by the total batch size (the config's auto_scale_lr)")
    train.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE",
                       help="override config entries, parsed by mmengine's DictAction, e.g. "
                            "train_cfg.max_iters=100 'train_dataloader.dataset.pipeline.2.scale=(256,256)' "
                            "custom_hooks.0.interval=10")
    train.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                       help="'pytorch' under torchrun (one process per rank)")
    train.add_argument("--local-rank", "--local_rank", type=int, dest="local_rank",
                       help=argparse.SUPPRESS)  # torch.distributed.launch passes it
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, show the whole traceback instead of one line")
    train.set_defaults(func=_train)

    fold = sub.add_parser("fold", help="fold a DyRepHook training checkpoint into the config's plain model")
    fold.add_argument("config", help="the mmdet / mmseg / mmpretrain config the checkpoint was trained with")
    fold.add_argument("checkpoint")
    fold.add_argument("-o", "--out", required=True, help="where to write the folded checkpoint")
    fold.add_argument("--ema", action="store_true", help="fold the EMA weights of the checkpoint")
    fold.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help="on an error, show the whole traceback instead of one line")
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
