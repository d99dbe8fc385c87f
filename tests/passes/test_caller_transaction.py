"""Passes rewrite in the caller's transaction when given one (``rep.run(..., txn=)``, ``dep.run(..., txn=)``,
``Handle.grow/cut(..., txn=)``), so that the caller's rollback undoes them; and there is one way a conv
becomes a block (``rep.grow_site``), which the rep pass and structure restores share."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dyrep_fx
from dyrep_fx import Handle
from dyrep_fx.block import RepConv2d
from dyrep_fx.passes import dep, rep
from dyrep_fx.passes.base import Transaction


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Net(nn.Module):
    """A model whose DyRep target is the submodule ``body``, beside a plain ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Body()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.body(x))


X = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def build() -> tuple[Net, Handle]:
    torch.manual_seed(0)
    model = Net().double()
    return model, Handle.transform(model.body)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


class Stop(Exception):
    """The caller's own failure after the pass succeeded."""


def test_a_grow_in_the_caller_s_parent_transaction_is_undone_by_its_rollback():
    model, body = build()
    before, ref = snapshot(model), model(X)
    with pytest.raises(Stop), Transaction(model) as txn:
        report = body.grow(["a", "b"], ["1x1", "prior"], txn=txn, prefix="body")
        assert set(report.changed) == {"a", "b"} and isinstance(model.body.a, RepConv2d)
        raise Stop
    assert type(model.body.a) is nn.Conv2d and type(model.body.b) is nn.Conv2d
    assert snapshot(model).keys() == before.keys()
    assert all(torch.equal(snapshot(model)[k], v) for k, v in before.items())
    assert torch.equal(model(X), ref)


def test_without_a_transaction_the_pass_keeps_its_own_all_or_nothing():
    model, body = build()
    with pytest.raises(Stop), Transaction(model):
        body.grow(["a"], ["1x1"])  # its own transaction, committed when the pass returns
        raise Stop
    assert isinstance(model.body.a, RepConv2d) and model.body.a.kinds == ["1x1"]


def test_a_cut_in_the_caller_s_transaction_is_undone_by_its_rollback():
    model, body = build()
    body.grow(["b"], ["1x1", "1x1_kxk", "prior"])
    before, kinds = snapshot(model), list(model.body.b.kinds)
    with pytest.raises(Stop), Transaction(model.body) as txn:
        assert dep.run(body.traced, model.body, cuts={"b": ["1x1"]}, txn=txn).changed == {"b": ["1x1"]}
        assert "1x1" not in model.body.b.kinds
        raise Stop
    assert model.body.b.kinds == kinds
    assert all(torch.equal(snapshot(model)[k], v) for k, v in before.items())


def test_restore_and_the_rep_pass_grow_the_same_block():
    """One grow path: a structure restored on a fresh model has the rep pass's blocks, key for key, and
    computes the same function once the grown weights load."""
    grown, body = build()
    body.grow(["a"], ["1x1_kxk", "prior"])
    body.grow(["a.branches.1x1_kxk.conv2"], ["1x1"])  # nested: the inner kxk conv of 1x1_kxk
    fresh, fresh_body = build()
    fresh_body.restore(body.structure())
    assert fresh.state_dict().keys() == grown.state_dict().keys()
    fresh.load_state_dict(grown.state_dict())
    assert torch.equal(fresh.eval()(X), grown.eval()(X))


def test_grow_site_refuses_what_is_not_a_conv_by_name():
    model, _ = build()
    with pytest.raises(dyrep_fx.passes.PassError, match=r"'body' is a Body, not a Conv2d"):
        rep.grow_site(model, "body", ["1x1"], mode="online")
