"""``Handle``: one transformed model and its state; the structure-spec module; the Dep criterion object."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.nets import SmallNet
from helpers.numerics import randomise_bns

import dyrep_fx
from dyrep_fx import structure_spec
from dyrep_fx.handle import STATE_ATTR, Handle
from dyrep_fx.passes.base import PassError, Transaction
from dyrep_fx.passes.dep import DepCriterion

X = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def grown_net(mode: str = "online") -> SmallNet:
    torch.manual_seed(0)
    model = SmallNet().double()
    dyrep_fx.transform(model, mode=mode)
    dyrep_fx.grow(model, ["conv1", "conv2"])
    return model


def test_of_refuses_a_model_that_was_not_transformed():
    with pytest.raises(PassError, match="SmallNet has not been transformed; call dyrep_fx.transform"):
        Handle.of(SmallNet())


def test_the_handle_reads_and_writes_the_one_state_on_the_model():
    model = SmallNet()
    handle = Handle.transform(model, mode="dbb", init_scale=0.05)
    assert model.__dict__[STATE_ATTR] is handle.state
    assert Handle.of(model).state is handle.state
    assert (handle.mode, handle.init_scale) == ("dbb", 0.05)
    assert [s.name for s in handle.sites()] == ["conv1", "conv2", "conv3"]
    assert dyrep_fx.Handle is Handle


def test_an_ema_twin_shares_a_copy_of_the_state_without_tracing(monkeypatch):
    model = grown_net()
    twin = copy.deepcopy(model)
    twin.__dict__.pop(STATE_ATTR)
    import dyrep_fx.handle as handle_module

    monkeypatch.setattr(handle_module, "trace_model", lambda *a, **k: pytest.fail("traced again"))
    shared = Handle.of(model).share_with(twin)
    assert shared.module is twin and shared.state is not Handle.of(model).state
    assert shared.traced.convs.keys() == Handle.of(model).traced.convs.keys()
    assert Handle.of(model).share_with(twin).state is shared.state  # kept once there


@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_a_described_structure_rebuilds_on_a_fresh_model(mode):
    model = grown_net(mode)
    dyrep_fx.grow(model, ["conv1.branches.1x1_kxk.conv2"], ["1x1"])
    spec = Handle.of(model).structure()
    assert spec["format"] == structure_spec.FORMAT and spec["mode"] == mode
    assert set(spec["sites"]) == {"conv1", "conv2"}  # the nested block sits inside conv1's entry
    assert spec["sites"]["conv1"]["nested"] == {"branches.1x1_kxk.conv2": {"kinds": ["1x1"]}}
    fresh = SmallNet().double()
    dyrep_fx.restore(fresh, spec)
    assert Handle.of(fresh).structure() == spec
    fresh.load_state_dict(model.state_dict())
    randomise_bns(model)
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    assert torch.equal(model(X), fresh(X))


def test_recompute_reaches_every_block_grown_later_and_keeps_the_training_function():
    """``transform(recompute=True)``: blocks grown by ``grow`` (nested ones too), by a DyRep controller, on an
    EMA twin and from a restored structure all recompute; a training step then computes the same
    outputs and gradients as without, and keeps fewer bytes for backward."""
    from helpers.memory import saved_bytes

    def net(recompute: bool) -> SmallNet:
        torch.manual_seed(0)
        model = SmallNet().double()
        dyrep_fx.transform(model, mode="dbb", recompute=recompute)
        dyrep_fx.grow(model, ["conv1", "conv2"])
        dyrep_fx.grow(model, ["conv1.branches.1x1_kxk.conv2"], ["1x1", "1x1_avg"])
        return model

    plain, lean = net(False), net(True)
    assert Handle.of(lean).recompute and not Handle.of(plain).recompute
    assert len(dyrep_fx.blocks(lean)) == 3
    assert all(b.recompute for b in dyrep_fx.blocks(lean).values())
    assert not any(b.recompute for b in dyrep_fx.blocks(plain).values())
    twin = copy.deepcopy(lean)
    twin.__dict__.pop(STATE_ATTR)
    assert Handle.of(lean).share_with(twin).recompute
    fresh = SmallNet().double()
    Handle.transform(fresh, mode="dbb", recompute=True).restore(Handle.of(lean).structure(),
                                                                        Transaction(fresh))
    assert all(b.recompute for b in dyrep_fx.blocks(fresh).values()) and len(dyrep_fx.blocks(fresh)) == 3
    ctl_model = SmallNet().double()
    dyrep_fx.DyRep(ctl_model, torch.optim.SGD(ctl_model.parameters(), lr=0.1), mode="dbb", recompute=True)
    dyrep_fx.grow(ctl_model, ["conv3"])
    assert dyrep_fx.blocks(ctl_model)["conv3"].recompute
    x = X.clone().requires_grad_()
    outs = [m(x) for m in (plain, lean)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad(o.square().sum(), [x, *m.parameters()]) for o, m in zip(outs, (plain, lean))]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
    assert saved_bytes(lean, X) < saved_bytes(plain, X)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.update(format="other/1"), "not a dyrep_fx structure"),
    (lambda s: s.update(mode="dbb"), "structure is for 'dbb' mode"),
    (lambda s: s["sites"].update(fc={"kinds": ["1x1"]}), "'fc', which is a Linear, not a Conv2d"),
    (lambda s: s["sites"].update(nope={"kinds": ["1x1"]}), "site 'nope', which this model does not have"),
    (lambda s: s["sites"]["conv1"].update(kinds=["identity"]), r"grows \['identity'\] at 'conv1'"),
    (lambda s: s["sites"]["conv2"].update(nested={"branches.1x1.conv": {"kinds": []}}), "nests"),
])
def test_check_names_what_a_model_cannot_take_and_changes_nothing(edit, message):
    spec = Handle.of(grown_net()).structure()
    edit(spec)
    fresh = dyrep_fx.transform(SmallNet().double())  # online, so a dbb spec is refused
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(PassError, match=message):
        dyrep_fx.restore(fresh, spec)
    assert not dyrep_fx.blocks(fresh)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_apply_records_every_replacement_for_one_rollback():
    spec = Handle.of(grown_net()).structure()
    fresh = SmallNet().double()
    convs = {name: fresh.get_submodule(name) for name in spec["sites"]}
    handle = Handle.transform(fresh)
    txn = Transaction(fresh)
    handle.restore(spec, txn)
    assert set(dyrep_fx.blocks(fresh)) == {"conv1", "conv2"}
    txn.rollback()
    assert all(fresh.get_submodule(name) is conv for name, conv in convs.items())


def test_fuse_bn_entry_point_takes_a_folded_model_and_refuses_a_grown_one():
    model = grown_net()
    randomise_bns(model)
    model.eval()
    with pytest.raises(PassError, match="folded model"):
        dyrep_fx.fuse_bn(model)
    deploy = dyrep_fx.fold(model).eval()
    want = deploy(X)
    report = dyrep_fx.fuse_bn(deploy)
    assert report.changed == {"conv1": ["bn1"], "conv2": ["bn2"], "conv3": ["bn3"]}
    assert isinstance(deploy.bn1, torch.nn.Identity)
    assert torch.allclose(deploy(X), want, rtol=0, atol=1e-12)


def test_the_dep_criterion_is_one_object_with_the_reference_settings():
    criterion = DepCriterion()
    assert (criterion.std_gate, criterion.threshold) == (0.02, 0.1)
    spread = {"1x1": 0.01, "1xk": 0.5, "kx1": 0.05}
    assert criterion.judge(spread).cut == ["1x1", "kx1"]
    assert DepCriterion(threshold=0.03).judge(spread).cut == ["1x1"]
    assert DepCriterion(std_gate=0.5).judge(spread).cut == []
    with pytest.raises(AttributeError):
        criterion.threshold = 0.5  # frozen: a controller's criterion cannot drift
    model = SmallNet()
    ctl = dyrep_fx.DyRep(model, torch.optim.SGD(model.parameters(), lr=0.1), std_gate=0.3, threshold=0.2)
    assert ctl.criterion == DepCriterion(0.3, 0.2)
