"""Multiply-adds and parameters a grown structure adds to the plain model: the floor under its step time.

For each model and input: the plain model's convolution multiply-adds per forward, what the online
``1x1_kxk`` branches add (merged into the kernel, run as convolutions, and what the per-call plan of
:mod:`dyrep_fx.kinds.composed` picks), and the parameter counts (the optimizer and the kernel assembly touch every
parameter once or a few times per step, whatever the batch). Counting, not timing: runs in seconds.

The **MAC floor** of a variant (:func:`mac_floor`, printed by ``train_cost.py`` beside every time ratio)
is the multiply-adds one training forward of it really runs -- every convolution and matrix product as
executed: dbb-mode branch convolutions, the online kernel's merges, the 1x1_kxk plan -- over the plain
model's. Backward costs about twice forward for both, so a step time ratio below the floor would need
the extra work to run faster per multiply-add than the plain model's.

    .venv/bin/python benchmarks/macs.py
    .venv/bin/python benchmarks/macs.py --floors --models resnet18     # the MAC floor of every variant
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_json  # noqa: E402
from variants import VARIANTS, build  # noqa: E402

import dyrep_fx  # noqa: E402
from dyrep_fx.kinds.composed import ComposedBranch, composed_costs, run_composed_as_convs  # noqa: E402

#: The benchmark inputs: ``label: (batch, size)`` (train_cost.py measures the same).
INPUTS = {"8x224": (8, 224), "32x32": (32, 32)}


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
        if ComposedBranch.kind not in block.branches:
            continue
        # a nested block that the plan merges is never called; its merge is all it costs
        shape = shapes.get(name, (1, block.geometry.in_channels, 1, 1))
        m, c = composed_costs(block.geometry, shape)
        merged, convs = merged + m, convs + c
        planned += c if name in shapes and run_composed_as_convs(block.geometry, shape, block.execution) else m
    return {"merged": merged, "convs": convs, "planned": planned}


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _MacCounter(TorchDispatchMode):
    """Multiply-adds of the convolutions and matrix products that reach ATen (what really runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if packet is torch.ops.aten.convolution:
            weight = args[1]
            self.macs += out.numel() * weight.shape[1] * weight[0, 0].numel()
        elif packet in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm):
            a = args[-2] if packet in (torch.ops.aten.addmm, torch.ops.aten.baddbmm) else args[0]
            self.macs += out.numel() * a.shape[-1]
        return out


def forward_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of one training-mode forward with gradients (as a step runs it), every op counted."""
    model.train()
    with _MacCounter() as counter:
        model(x)
    return counter.macs


@functools.cache
def _variant_macs(model_name: str, variant: str, batch: int, size: int) -> int:
    return forward_macs(build(model_name, variant), torch.randn(batch, 3, size, size))


def mac_floor(model_name: str, variant: str, batch: int, size: int) -> float:
    """:func:`forward_macs` of ``variant`` over the plain model's: the floor under its step-time ratio."""
    return _variant_macs(model_name, variant, batch, size) / _variant_macs(model_name, "plain", batch, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--variant", default="dyrep_online")
    parser.add_argument("--floors", action="store_true", help="print the MAC floor of every variant instead")
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "plain"))
    parser.add_argument("--out", default="out/benchmarks/macs.json")
    args = parser.parse_args()
    if args.floors:
        print_floors(args)
        return
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


def print_floors(args: argparse.Namespace) -> None:
    """The MAC floor table: every variant, model and input."""
    rows = []
    print("| model | input | variant | MAC floor (training forward / plain) |")
    print("|---|---|---|---|")
    for name in args.models.split(","):
        for label, (batch, size) in INPUTS.items():
            for variant in args.variants.split(","):
                floor = mac_floor(name, variant, batch, size)
                rows.append({"model": name, "input": label, "variant": variant, "mac_floor": floor})
                print(f"| {name} | {label} | {variant} | {floor:.2f} |", flush=True)
    write_json(args.out, rows)


if __name__ == "__main__":
    main()
