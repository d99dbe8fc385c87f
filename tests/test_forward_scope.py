"""A kept online kernel lives for one forward call of the transformed model and no longer.

Every write made between two forward calls (through ``.data``, ``set_``, a copy under ``no_grad``,
``load_state_dict``) must show in the next call's output, in train and eval mode, for convs called once
and convs called several times per forward, with either execution of the ``1x1_kxk`` branch. The
reference is the same forward under ``torch.no_grad()``, where nothing is kept.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.numerics import rel_err
from torch import nn

import dyrep_fx
from dyrep_fx import forward_scope
from dyrep_fx.block import RepConv2d, find_blocks
from dyrep_fx.kinds.composed import run_composed_as_convs

pytestmark = pytest.mark.usefixtures("one_thread")


class Shared(nn.Module):
    """One 3x3 conv applied twice per forward (a head conv over two pyramid levels)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        f = torch.relu(self.stem(x))
        return self.conv(f).mean((2, 3)) + self.conv(nn.functional.avg_pool2d(f, 2)).mean((2, 3))


def single_call_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))


def grown(kind: str, execution: str, train: bool) -> nn.Module:
    torch.manual_seed(0)
    model = (single_call_net() if kind == "single" else Shared()).double()
    dyrep_fx.transform(model)
    dyrep_fx.grow(model)
    with torch.no_grad():  # scales well away from their initial shares, so every branch counts
        for block in find_blocks(model).values():
            for branch in block.branches.values():
                branch.scale.uniform_(0.2, 0.6)
    for block in find_blocks(model).values():
        block.execution = execution
    return model.train(train)


def _main_scale(model: nn.Module) -> nn.Parameter:
    return next(iter(find_blocks(model).values())).main_scale


def _by_data(model):
    _main_scale(model).data.mul_(3.0)


def _by_set(model):
    p = _main_scale(model)
    with torch.no_grad():
        p.set_(p.detach().clone() * 3.0)


def _by_no_grad_copy(model):
    p = _main_scale(model)
    with torch.no_grad():
        p.copy_(p * 3.0)


def _by_load_state_dict(model):
    state = {k: v * 3.0 if k.endswith("main_scale") else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)


def _by_branch_data(model):
    block = next(iter(find_blocks(model).values()))
    block.branches["1x1_kxk"].conv1.weight.data.mul_(-2.0)


WRITES = {"data": _by_data, "set_": _by_set, "no_grad_copy": _by_no_grad_copy,
          "load_state_dict": _by_load_state_dict, "branch_data": _by_branch_data}


@pytest.mark.parametrize("write", sorted(WRITES))
@pytest.mark.parametrize("execution", ["assemble", "convs"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["single", "shared"])
def test_a_write_between_two_forward_calls_always_shows(kind, train, execution, write):
    model = grown(kind, execution, train)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    first = model(x)  # gradients on, no backward: the pre-fix code kept this call's kernel
    WRITES[write](model)
    second = model(x)
    with torch.no_grad():
        reference = model(x)
    assert rel_err(second, reference) < 1e-13
    assert rel_err(second, first) > 1e-3  # the write matters, so a stale kernel would show


def test_no_kernel_is_kept_after_the_call_even_when_it_raises():
    model = grown("shared", "assemble", True)
    model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert forward_scope.active_scope() is None
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 4, 8, 8, dtype=torch.float64))  # wrong channel count: raises inside forward
    assert forward_scope.active_scope() is None
    clone = copy.deepcopy(model)  # copies carry the hooks, and nothing of a forward call
    first = clone(torch.ones(1, 3, 8, 8, dtype=torch.float64))
    _by_data(clone)
    with torch.no_grad():
        assert rel_err(clone(torch.ones(1, 3, 8, 8, dtype=torch.float64)), first) > 1e-3


def test_fold_in_place_removes_the_scope_hooks():
    model = grown("single", "assemble", False)
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    assert hooks == (1, 1)
    dyrep_fx.fold(model, inplace=True)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == (0, 0)


class TwoMaps(nn.Module):
    """One conv on a large and on a 1x1 map in one forward: the two calls run the ``1x1_kxk`` branch
    differently (merged into the kernel on the large map, as two convolutions on the tiny one)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, big, tiny):
        return self.conv(big), self.conv(tiny)


def test_one_conv_on_a_large_and_a_tiny_map_in_one_training_forward():
    """The kept kernel's key holds the execution choice: a kernel assembled with the composed branch
    merged must not serve the call that adds that branch as convolutions (double counted: 21-46 %)."""
    torch.manual_seed(0)
    model = TwoMaps().double()
    dyrep_fx.transform(model)
    dyrep_fx.grow(model, ["conv"])
    block: RepConv2d = model.conv
    with torch.no_grad():
        for branch in block.branches.values():
            branch.scale.uniform_(0.2, 0.6)
    big, tiny = torch.randn(2, 8, 64, 64, dtype=torch.float64), torch.randn(2, 8, 1, 1, dtype=torch.float64)
    assert not run_composed_as_convs(block.geometry, tuple(big.shape), block.execution)
    assert run_composed_as_convs(block.geometry, tuple(tiny.shape), block.execution)
    reference = block.to_conv()
    out_big, out_tiny = model.train()(big, tiny)
    assert rel_err(out_big, reference(big)) < 1e-12
    assert rel_err(out_tiny, reference(tiny)) < 1e-12
    (out_big.square().mean() + out_tiny.square().sum()).backward()
    shared = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    # per-call assembly: the block called directly, outside any scope of the transformed model
    (block(big).square().mean() + block(tiny).square().sum()).backward()
    for n, p in block.named_parameters():
        torch.testing.assert_close(shared[n], p.grad, rtol=1e-12, atol=1e-15, msg=n)
