"""Training-step cost of a grown shared detection head, side by side with the plain head.

mmdet's RetinaNet head from its shipped config (two stacked 3x3 convs per tower, ``--channels`` wide,
9 anchors, 80 classes) on five FPN levels of a ``--size`` image: every conv is called once per level.
Variants, timed in interleaved rounds in one process (forward + backward + SGD step on the head alone):

* ``plain``: the head as built;
* ``grown``: every head conv grown with DyRep's branch kinds (online mode), kernels assembled once per
  forward pass (the library's behaviour);
* ``grown_per_call``: the same structure assembling its kernel at every call (what a conv called five
  times would cost without the shared assembly).

Wall time and CPU time are reported as median ratios to ``plain``, with the spread.

    .venv/bin/python benchmarks/shared_head_cost.py
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, summary, write_json  # noqa: E402

import dyrep_fx  # noqa: E402
from dyrep_fx import block as block_module  # noqa: E402
from dyrep_fx.controller import DYREP_KINDS  # noqa: E402


def build_head(channels: int) -> torch.nn.Module:
    """RetinaNet's head from mmdet's shipped config, ``channels`` wide (no weights loaded)."""
    import mmdet
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    cfg = Config.fromfile(os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs",
                                       "retinanet/retinanet_r50_fpn_1x_coco.py"))
    head_cfg = cfg.model.bbox_head
    head_cfg.update(in_channels=channels, feat_channels=channels, stacked_convs=2)
    init_default_scope("mmdet")
    torch.manual_seed(0)
    return MODELS.build(head_cfg)


def levels(channels: int, size: int, batch: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(batch, channels, size // 2 ** (3 + i), size // 2 ** (3 + i), generator=g)
                 for i in range(5))


def grown(head: torch.nn.Module, feats: tuple[torch.Tensor, ...]) -> torch.nn.Module:
    head = copy.deepcopy(head)
    dyrep_fx.transform(head, example_inputs=(feats,))
    for site in dyrep_fx.sites(head):
        if site.eligible:
            dyrep_fx.grow(head, [site.name], [k for k in DYREP_KINDS if k in site.kinds])
    return head


def step(head: torch.nn.Module, opt: torch.optim.Optimizer, feats, per_call: bool) -> tuple[float, float]:
    original = block_module.RepConv2d._call_kernel
    if per_call:
        block_module.RepConv2d._call_kernel = block_module.RepConv2d._online_kernel
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        cls, reg = head(feats)
        (sum(t.square().mean() for t in cls) + sum(t.square().mean() for t in reg)).backward()
        opt.step()
        return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        block_module.RepConv2d._call_kernel = original


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=256, help="image side; the levels are its 1/8 .. 1/128")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="out/benchmarks/shared_head_cost.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    feats = levels(args.channels, args.size, args.batch)
    plain = build_head(args.channels)
    models = {"plain": (plain, False), "grown": (grown(plain, feats), False)}
    models["grown_per_call"] = (models["grown"][0], True)
    opts = {name: torch.optim.SGD(m.parameters(), lr=1e-4) for name, (m, _) in models.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for r in range(args.rounds + 2):
        for name, (model, per_call) in models.items():
            t = step(model, opts[name], feats, per_call)
            if r >= 2:  # warm-up rounds
                times[name].append(t)
    rows = {}
    for name in models:
        wall = [w / p[0] for (w, _), p in zip(times[name], times["plain"])]
        cpu = [c / p[1] for (_, c), p in zip(times[name], times["plain"])]
        rows[name] = {"wall_ratio": summary(wall), "cpu_ratio": summary(cpu),
                      "step_s": statistics.median(w for w, _ in times[name])}
    report = {"machine": machine(), "args": vars(args), "rows": rows,
              "convs": sum(1 for s in dyrep_fx.sites(models["grown"][0]) if s.depth == 0)}
    write_json(args.out, report)
    print(f"RetinaNet head, {args.channels} channels, 5 levels of a {args.size}px image, batch {args.batch}, "
          f"{args.threads} thread(s); median [min, max] over {args.rounds} interleaved rounds")
    print("| variant | step time / plain | CPU time / plain | step s |\n|---|---|---|---|")
    for name, row in rows.items():
        w, c = row["wall_ratio"], row["cpu_ratio"]
        print(f"| {name} | {w['median']:.2f} [{w['min']:.2f}, {w['max']:.2f}] | {c['median']:.2f} "
              f"[{c['min']:.2f}, {c['max']:.2f}] | {row['step_s']:.4f} |")
    return report


if __name__ == "__main__":
    main()
