"""Multiply-adds and parameters a grown structure adds to the plain model: the floor under its step time.

For each model and input: the plain model's convolution multiply-adds per forward, what the online
``1x1_kxk`` branches add (merged into the kernel, run as convolutions, and what the per-call plan of
:mod:`dyrep_fx.execution` picks), and the parameter counts (the optimizer and the kernel assembly touch every
parameter once or a few times per step, whatever the batch). Counting, not timing: runs in seconds.

    .venv/bin/python benchmarks/macs.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_json  # noqa: E402
from train_cost import INPUTS  # noqa: E402
from variants import build  # noqa: E402

import dyrep_fx  # noqa: E402
from dyrep_fx.execution import composed_costs, run_composed_as_convs  # noqa: E402


def conv_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of every ``nn.Conv2d`` in one forward of ``x``."""
    total = [0]

    def count(mod: nn.Conv2d, args, out: torch.Tensor) -> None:
        total[0] += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]

    handles = [m.register_forward_hook(count) for m in model.modules() if type(m) is nn.Conv2d]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total[0]


def composed_macs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """``1x1_kxk`` multiply-adds per forward: all merged, all as convs, and as the plan runs them."""
    shapes: dict[str, tuple[int, ...]] = {}
    blocks = dyrep_fx.blocks(model)
    def record(name: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    handles = [b.register_forward_pre_hook(record(n)) for n, b in blocks.items()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    merged = convs = planned = 0
    for name, block in blocks.items():
        if "1x1_kxk" not in block.branches:
            continue
        # a nested block that the plan merges is never called; its merge is all it costs
        shape = shapes.get(name, (1, block.geometry.in_channels, 1, 1))
        m, c = composed_costs(block.geometry, shape)
        merged, convs = merged + m, convs + c
        planned += c if name in shapes and run_composed_as_convs(block.geometry, shape, block.execution) else m
    return {"merged": merged, "convs": convs, "planned": planned}


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--variant", default="dyrep_online")
    parser.add_argument("--out", default="out/benchmarks/macs.json")
    args = parser.parse_args()
    rows = []
    print("| model | input | plain conv GMAC | 1x1_kxk GMAC: merged / convs / plan | plan / plain "
          "| params: plain / grown |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        plain, grown = build(name, "plain"), build(name, args.variant)
        for label, (batch, size) in INPUTS.items():
            x = torch.randn(batch, 3, size, size)
            base, extra = conv_macs(plain, x), composed_macs(grown, x)
            row = {"model": name, "input": label, "plain_macs": base, **extra,
                   "params_plain": params(plain), "params_grown": params(grown)}
            rows.append(row)
            print(f"| {name} | {label} | {base / 1e9:.2f} | {extra['merged'] / 1e9:.2f} / {extra['convs'] / 1e9:.2f}"
                  f" / {extra['planned'] / 1e9:.2f} | +{100 * extra['planned'] / base:.0f}% "
                  f"| {params(plain) / 1e6:.1f} M / {params(grown) / 1e6:.1f} M |")
    write_json(args.out, rows)


if __name__ == "__main__":
    main()
