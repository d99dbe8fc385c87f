"""The suite's one error measure, and randomising BatchNorms and block scales so that exactness checks
cannot pass by accident."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import dyrep_fx


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|``: the error measure every exactness check in the suite uses."""
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "non-finite values"
    scale = b.detach().abs().max()
    assert scale > 0, "reference is identically zero; the comparison would be vacuous"
    return float((a.detach() - b.detach()).abs().max() / scale)


def _fill(t: torch.Tensor, gen: torch.Generator | None, lo: float, hi: float) -> None:
    t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype, device=t.device) * (hi - lo) + lo)


@torch.no_grad()
def randomise_bns(model: nn.Module, seed: int | None = 0, signed: bool = False) -> None:
    """Every BatchNorm: running mean in [-0.5, 0.5), var in [0.5, 2), |weight| in [0.5, 1.5) (with random
    signs when ``signed``), bias in [-0.5, 0.5). ``seed=None`` draws from the global RNG (hypothesis
    tests seed that)."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            if m.track_running_stats:
                _fill(m.running_mean, gen, -0.5, 0.5)
                _fill(m.running_var, gen, 0.5, 2.0)
            if m.affine:
                _fill(m.weight, gen, 0.5, 1.5)
                if signed:
                    m.weight.mul_(torch.randint(0, 2, m.weight.shape, generator=gen).to(m.weight) * 2 - 1)
                _fill(m.bias, gen, -0.5, 0.5)


@torch.no_grad()
def randomise_scales(model: nn.Module, seed: int = 1, branch_bound: float = 0.5) -> None:
    """Every grown online block: main scale in [0.5, 1.5), branch scales in [-bound, bound)."""
    gen = torch.Generator().manual_seed(seed)
    for block in dyrep_fx.blocks(model).values():
        if block.mode == "online" and block.grown:
            _fill(block.main_scale, gen, 0.5, 1.5)
            for branch in block.branches.values():
                _fill(branch.scale, gen, -branch_bound, branch_bound)


def randomise(model: nn.Module, seed: int = 0, branch_bound: float = 0.5) -> None:
    """Both of the above."""
    randomise_bns(model, seed)
    randomise_scales(model, seed + 1, branch_bound)


def assert_same(a, b, where: str = "") -> None:
    """Bitwise equality of nested checkpoint data (tensors, dicts, lists, scalars)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max diff {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, list(a), list(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)
