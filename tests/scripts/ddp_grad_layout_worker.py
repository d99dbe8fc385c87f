"""One rank of a short DDP run of a grown model on gloo (CPU), recording every warning; launched by
tests/test_grad_layout.py.

    python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT \\
        tests/scripts/ddp_grad_layout_worker.py --out DIR --mode online [--model regnet_x_400mf]

DDP copies a gradient into its bucket and warns "Grad strides do not match bucket view strides" (once
per process) when the gradient's strides differ from its parameter's, also in size-1 dimensions, which
autograd's own layout check ignores. The worker grows every eligible conv with every kind, wraps the model
in DDP, trains a few iterations with all warnings recorded, and writes ``DIR/rank<r>.json``: the warning
messages and the parameters whose gradient strides differ from their own after the last iteration.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dyrep_fx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.rank_exit import end_rank, start_rank  # noqa: E402

ITERS = 3


class LayoutNet(nn.Module):
    """Conv + BN + ReLU layers of every shape that matters: 1x1 convs (plain, grouped, strided), whose
    gradients took other strides than the parameters, beside 3x3 ones (plain, grouped, depthwise), on 8x8
    inputs. (BatchNorms after the convs make every conv a dbb-mode site too.)"""

    SHAPES = {"stem": (3, 8, 3, 1, 1), "point": (8, 16, 1, 1, 1), "grouped": (16, 16, 3, 1, 4),
              "depthwise": (16, 16, 3, 1, 16), "point_grouped": (16, 16, 1, 1, 2), "down": (16, 16, 1, 2, 1)}

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleDict({name: nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False)
                                    for name, (i, o, k, s, g) in self.SHAPES.items()})
        self.bns = nn.ModuleDict({name: nn.BatchNorm2d(shape[1]) for name, shape in self.SHAPES.items()})
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.SHAPES:
            x = torch.relu(self.bns[name](self.convs[name](x)))
        return self.fc(x.mean((2, 3)))


def build(name: str, mode: str) -> tuple[nn.Module, int]:
    """The model (grown everywhere in ``mode``) and the input size it is run at."""
    if name == "small":
        model, size = LayoutNet(), 8
    else:
        import torchvision

        model, size = torchvision.models.get_model(name, weights=None, num_classes=10), 32
    dyrep_fx.transform(model, mode=mode)
    dyrep_fx.grow(model)
    return model, size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", default="online")
    parser.add_argument("--model", default="small", help="'small' or a torchvision model name")
    args = parser.parse_args()

    torch.set_num_threads(1)
    start_rank()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model, size = build(args.model, args.mode)
    model.train()
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    with warnings.catch_warnings(record=True) as caught:
        # DDP's warning is a TORCH_WARN_ONCE: the very first backward must be recorded.
        warnings.simplefilter("always")
        for _ in range(ITERS):
            x = torch.randn(2, 3, size, size, generator=g)
            y = torch.randint(0, 10, (2,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            mismatched = [n for n, p in model.named_parameters()
                          if p.grad is not None and p.grad.stride() != p.stride()]
            opt.step()
    result = {"rank": rank, "warnings": [str(w.message) for w in caught], "mismatched": mismatched,
              "params": sum(1 for _ in model.parameters())}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    del ddp
    end_rank()


if __name__ == "__main__":
    main()
