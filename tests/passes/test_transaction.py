"""``Transaction``: the one undo mechanism of every rewrite, as a context manager.

A failure inside the block puts back modules, module trees, tensor values, a child transaction's model
and any registered state, last first, and re-raises; a block that completes keeps its changes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dyrep_fx.passes.base import PassError, Transaction


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))


def test_a_failure_inside_the_block_undoes_everything_and_re_raises():
    model, ema = net(), net()
    conv, ema_conv = model[0], ema[0]
    weight, running = conv.weight.detach().clone(), model[1].running_mean.clone()
    log: list[str] = []
    with pytest.raises(RuntimeError, match="injected"), Transaction(model) as txn:
        txn.save(model[1])
        model[1].running_mean.add_(1.0)
        model[1].register_buffer("extra", torch.ones(1))
        txn.save(conv)
        txn.replace("0", nn.Identity())
        twin = txn.child(ema)
        twin.replace("0", nn.Identity())
        txn.on_rollback(lambda: log.append("registered"))
        with torch.no_grad():
            conv.weight.zero_()
        raise RuntimeError("injected")
    assert model[0] is conv and ema[0] is ema_conv
    assert torch.equal(conv.weight, weight) and torch.equal(model[1].running_mean, running)
    assert "extra" not in model[1]._buffers and log == ["registered"]


def test_a_completed_block_keeps_its_changes():
    model = net()
    with Transaction(model) as txn:
        txn.replace("0", nn.Identity())
    assert isinstance(model[0], nn.Identity)
    txn.rollback()  # explicit rollback still works after the block
    assert isinstance(model[0], nn.Conv2d)
    txn.rollback()  # the records are spent: nothing left to undo
    assert isinstance(model[0], nn.Conv2d)


def test_every_record_is_undone_even_when_one_fails():
    model = net()
    log: list[str] = []
    txn = Transaction(model)
    txn.on_rollback(lambda: log.append("first"))
    txn.on_rollback(lambda: (_ for _ in ()).throw(RuntimeError("broken undo")))
    txn.on_rollback(lambda: log.append("last"))
    with pytest.raises(PassError, match="broken undo"):
        txn.rollback()
    assert log == ["last", "first"]
