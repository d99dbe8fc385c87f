"""A kind with a new kernel shape, added in one file (:mod:`dyrep_fx.kinds.cross`, ACNet's asymmetric pair as one
term) and registered as a user kind: its term adds itself and differentiates exactly through the block's
one assembly, and the kind grows, trains and folds exactly in float64 in both modes."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import dyrep_fx
from dyrep_fx.assembly import assemble_kernel
from dyrep_fx.geometry import ConvGeometry
from dyrep_fx.kernels import embed_kernel
from dyrep_fx.kinds import applicable_kinds, kind_names, register_kind, unregister_kind
from dyrep_fx.kinds.cross import KIND, CrossTerm

#: Max abs error of a float64 fold (the function is ~1, its terms a few dozen products).
EXACT = 1e-12


@pytest.fixture
def cross_kind():
    register_kind(KIND)
    yield KIND
    unregister_kind(KIND.name)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("size", [(3, 3), (5, 3), (2, 4)])
def test_the_term_equals_the_autograd_sum(size):
    kh, kw = size
    torch.manual_seed(kh * kw)
    weight, main_scale = rand(4, 2, kh, kw), rand(4)
    row, column, scale = rand(4, 2, 1, kw), rand(4, 2, kh, 1), rand(4)
    centre = ((kh - 1) // 2, (kw - 1) // 2)
    term = CrossTerm(row, column, scale, centre)
    got = assemble_kernel(weight, main_scale, [term])
    want = main_scale.reshape(-1, 1, 1, 1) * weight + scale.reshape(-1, 1, 1, 1) * (
        embed_kernel(row, size, (centre[0], 0)) + embed_kernel(column, size, (0, centre[1])))
    assert (got - want).abs().max() <= EXACT
    g = torch.randn_like(want)
    leaves = (weight, main_scale, row, column, scale)
    for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
        assert (a - b).abs().max() <= EXACT
    assert torch.autograd.gradcheck(
        lambda w, m, r, c, s: assemble_kernel(w, m, [CrossTerm(r, c, s, centre)]), leaves)


def test_it_is_opt_in_and_applies_where_rows_and_columns_do(cross_kind):
    assert kind_names()[-1] == "cross"  # a user kind: after the library's
    geometry = ConvGeometry.from_conv(nn.Conv2d(2, 2, (1, 3)))
    assert "cross" not in applicable_kinds(geometry) and KIND.applies(geometry) is not None


def test_without_registering_it_the_library_kinds_are_unchanged():
    assert "cross" not in kind_names()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 6, (3, 5), padding=(1, 2), groups=2)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.a(x)))
        return self.head(self.b(x).mean((2, 3)))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_it_grows_trains_and_folds_exactly(cross_kind, mode):
    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    dyrep_fx.transform(model, mode=mode)
    model.eval()
    with torch.no_grad():
        before = model(x)
    dyrep_fx.grow(model, ["a", "b"], ["1x1", "cross"])
    assert model.a.kinds == model.b.kinds == ["1x1", "cross"]
    with torch.no_grad():
        assert max_abs(model(x), before) <= EXACT  # growth keeps the function
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(x).logsumexp(1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.b.branches["cross"].parameters())
    optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(x)
        assert max_abs(trained, before) > 1e-6  # the step changed the function
        twin = Net().double()
        dyrep_fx.transform(twin, mode=mode)
        dyrep_fx.restore(twin, json.loads(json.dumps(dyrep_fx.structure(model))))
        twin.load_state_dict(model.state_dict(), strict=True)
        assert max_abs(twin.eval()(x), trained) <= EXACT
        deploy = dyrep_fx.fold(model)
        fresh = Net().double().eval()
        fresh.load_state_dict(deploy.state_dict(), strict=True)
        assert max_abs(fresh(x), trained) <= EXACT
