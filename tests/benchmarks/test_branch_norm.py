"""The weight-normalised online ablation (benchmarks/branch_norm.py): every path of a grown online block is
normalised per output channel, the function is kept when it starts and at fold time, and each normalised
kernel is scale-invariant (what a BatchNorm per path gives dbb mode)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dyrep_fx
from dyrep_fx.block import find_blocks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from branch_norm import normalise_every_path, normalised_weights  # noqa: E402

KINDS = ["1x1", "1x1_kxk", "identity"]  # convs inside: 1, 2 and none


def net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).double()


def grown(mode: str = "online") -> nn.Module:
    """The second and third convs grown with KINDS (trained scales, so every path counts); the first was
    grown and cut back: a block without branches, a plain conv in either mode."""
    torch.manual_seed(0)
    model = net()
    dyrep_fx.transform(model, mode=mode)
    dyrep_fx.grow(model, ["3", "6"], KINDS)
    dyrep_fx.grow(model, ["0"], ["1x1"])
    dyrep_fx.cut(model, "0", ["1x1"])
    with torch.no_grad():
        for block in find_blocks(model).values():
            for branch in block.branches.values():
                branch.gamma().uniform_(0.5, 1.5)
    return model.eval()


def x() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_every_path_of_each_grown_block_is_normalised_and_the_function_kept():
    model = grown()
    before = model(x())
    assert normalise_every_path(model) == 2 * (1 + 1 + 2)  # main kernel, the 1x1's conv, the 1x1_kxk's two
    ungrown = model.get_submodule("0")
    assert not ungrown.grown and not nn.utils.parametrize.is_parametrized(ungrown)  # a plain conv stays one
    torch.testing.assert_close(model(x()), before, rtol=0, atol=1e-13)


def test_each_normalised_kernel_is_scale_invariant():
    model = grown()
    normalise_every_path(model)
    before = model(x())
    for module, _ in normalised_weights(model):
        original = module.parametrizations.weight.original
        with torch.no_grad():
            original.mul_(torch.rand(original.shape[0], 1, 1, 1, dtype=original.dtype) * 3 + 0.5)
    torch.testing.assert_close(model(x()), before, rtol=0, atol=1e-13)
    # and the gradient of each is orthogonal to it, row by row (it turns the kernel, never scales it)
    model.train()
    model(x()).square().sum().backward()
    for module, _ in normalised_weights(model):
        v = module.parametrizations.weight.original
        cos = (v.grad * v).flatten(1).sum(1) / (v.grad.flatten(1).norm(dim=1) * v.flatten(1).norm(dim=1))
        assert cos.abs().max() < 1e-10


def test_trained_normalised_model_folds_exactly_into_the_plain_net():
    model = grown()
    normalise_every_path(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        model(x()).logsumexp(1).mean().backward()
        opt.step()
    model.eval()
    out = model(x())
    folded = dyrep_fx.fold(model).eval()
    torch.testing.assert_close(folded(x()), out, rtol=0, atol=1e-12)
    fresh = net()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    torch.testing.assert_close(fresh.eval()(x()), out, rtol=0, atol=1e-12)


def test_dbb_mode_blocks_are_refused_by_name():
    with pytest.raises(ValueError, match="^3: .*online blocks only"):
        normalise_every_path(grown("dbb"))
