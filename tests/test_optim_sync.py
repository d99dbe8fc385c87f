"""The optimizer (and an LR scheduler) stays consistent while DyRep grows and cuts the model.

Real optimizers (SGD with momentum, AdamW) with user-built parameter groups, several structural
steps including nested growth and a cut, and training on after every step.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.nets import SmallNet
from torch import nn

import dyrep_fx
from dyrep_fx.block import main_parameters
from dyrep_fx.defaults import PAPER_SCHEDULE

# float64 / tiny convs on CPU: one intra-op thread is much faster than two here.
pytestmark = pytest.mark.usefixtures("one_thread")



def Net() -> SmallNet:  # noqa: N802 - keeps the tests' call sites short
    return SmallNet()


def batch(i: int):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)


def train(model, opt, iters: int, start: int = 0) -> list[float]:
    losses = []
    for i in range(start, start + iters):
        x, y = batch(i)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def three_groups(model: Net) -> list[dict]:
    """conv1 + fc kernels / conv2 + conv3 kernels (another lr) / every 1-D parameter without decay."""
    return [
        {"params": [model.conv1.weight, model.fc.weight], "lr": 0.02, "weight_decay": 1e-3},
        {"params": [model.conv2.weight, model.conv3.weight], "lr": 0.04, "weight_decay": 1e-3},
        {"params": [p for p in model.parameters() if p.dim() == 1], "lr": 0.02, "weight_decay": 0.0},
    ]


OPTIMIZERS = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.02, momentum=0.9, nesterov=True),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=0.01),
}
SCHEDULERS = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8, eta_min=1e-4),
}
STATE_KEYS = {"sgd": {"momentum_buffer"}, "adamw": {"exp_avg", "exp_avg_sq", "step"}}


def group_index(opt) -> dict[int, int]:
    return {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}


def site_of(name: str) -> str:
    """The top-level conv a parameter of the grown model descends from (``conv2.branches...`` -> ``conv2``)."""
    return name.split(".")[0]


@pytest.mark.parametrize("mode", ["online", "dbb"])
@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_optimizer_and_scheduler_follow_structure(opt_name, sched_name, mode):
    torch.manual_seed(0)
    model = Net().double()
    opt = OPTIMIZERS[opt_name](three_groups(model))
    sched = SCHEDULERS[sched_name](opt)
    # a reference scheduler on a dummy optimizer with the same groups: the lr it should produce
    ref_opt = OPTIMIZERS[opt_name]([{"params": [torch.zeros(1, requires_grad=True)], "lr": g["lr"],
                                     "weight_decay": g["weight_decay"]} for g in opt.param_groups])
    ref_sched = SCHEDULERS[sched_name](ref_opt)
    calib = [batch(500 + i) for i in range(3)]
    ctl = dyrep_fx.DyRep(model, opt, interval=1, mode=mode, calib_loader=calib, calib_batches=3, nested="open",
                         **PAPER_SCHEDULE)
    hyper = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in opt.param_groups]
    changed_steps, cut_seen, nested_seen = 0, False, False
    for unit in range(6):
        losses = train(model, opt, 2, start=2 * unit)
        assert all(math.isfinite(v) for v in losses)
        if unit == 3:  # force a cut at the first block
            forced, block = next(iter(dyrep_fx.blocks(model).items()))
            with torch.no_grad():
                for i, b in enumerate(block.branches.values()):
                    b.gamma().fill_(0.5 if i % 2 else 0.001)
        # -- before the structural step
        before = {n: p for n, p in model.named_parameters()}
        where_before = group_index(opt)
        state_before = {id(p): {k: (v, v.clone()) for k, v in opt.state[p].items() if torch.is_tensor(v)}
                        for p in before.values()}
        assert all(set(s) == STATE_KEYS[opt_name] for s in state_before.values())
        lrs = [g["lr"] for g in opt.param_groups]
        removed_candidates = {id(p): n for n, p in before.items()}

        result = ctl.step()
        assert result.changed
        changed_steps += 1
        cut_seen |= bool(result.cut)
        nested_seen |= any(".branches." in n for n in result.grown)

        # -- after: every live parameter exactly once, nothing else
        after = dict(model.named_parameters())
        in_opt = [p for g in opt.param_groups for p in g["params"]]
        assert len(in_opt) == len({id(p) for p in in_opt}) == len(after)
        assert {id(p) for p in in_opt} == {id(p) for p in after.values()}
        where = group_index(opt)
        # group settings untouched (lr included: only the scheduler moves it)
        assert [g["lr"] for g in opt.param_groups] == lrs
        assert [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in opt.param_groups] == hyper
        for name, p in after.items():
            if id(p) in where_before:  # a survivor: same group, same state objects, same values
                assert where[id(p)] == where_before[id(p)], name
                for key, (obj, value) in state_before[id(p)].items():
                    assert opt.state[p][key] is obj, (name, key)
                    assert torch.equal(obj, value), (name, key)
            else:  # new: no state yet; 1-D to the no-decay group, kernels to their conv's group
                assert not opt.state.get(p), name
                if p.dim() <= 1:
                    assert where[id(p)] == 2, name
                else:
                    assert where[id(p)] == where_before[id(main_parameters(getattr(model, site_of(name)))[0])], name
        gone = {i: n for i, n in removed_candidates.items() if i not in {id(p) for p in after.values()}}
        if unit == 3:
            assert result.cut and gone, "the forced cut removes parameters"
            assert forced in result.cut  # (another block whose branches spread may be cut too)
            assert all(any(n.startswith(c + ".branches.") for c in result.cut) for n in gone.values())
        state_ids = {id(p) for p in opt.state}
        assert not set(gone) & state_ids, [gone[i] for i in set(gone) & state_ids]

        sched.step()
        ref_opt.step()  # (no gradients: only keeps the scheduler's call-order check quiet)
        ref_sched.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
        assert sched.get_last_lr() == ref_sched.get_last_lr()

        # the next optimizer step gives the new parameters state, and updates them
        new = {n: p for n, p in after.items() if n not in before or before[n] is not p}
        snapshot = {n: p.detach().clone() for n, p in new.items()}
        train(model, opt, 1, start=100 + unit)
        for n, p in new.items():
            assert set(opt.state[p]) >= STATE_KEYS[opt_name], n
            assert p.grad is not None, f"{n} is not trained"
            # (a bias right before a train-mode BatchNorm has a zero gradient, up to rounding)
            if p.grad.abs().max() > 1e-12:
                assert not torch.equal(p, snapshot[n]), f"{n} was not updated"
        if opt_name == "adamw" and new:
            steps = {float(opt.state[p]["step"]) for n, p in after.items() if n in new}
            assert steps == {1.0}
    assert changed_steps == 6 and cut_seen and nested_seen
    losses = train(model, opt, 4, start=200)
    assert all(math.isfinite(v) for v in losses)


def test_single_group_takes_everything():
    torch.manual_seed(0)
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    ctl = dyrep_fx.DyRep(model, opt, interval=1, topk=3, **PAPER_SCHEDULE)
    train(model, opt, 1)
    assert len(ctl.step().grown) == 3
    assert len(opt.param_groups) == 1
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in model.parameters()}
    train(model, opt, 2, start=1)


def test_custom_group_chooser():
    torch.manual_seed(0)
    model = Net().double()
    groups = three_groups(model) + [{"params": [], "lr": 0.001, "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=0.02, momentum=0.9)
    calls = []

    def chooser(optimizer, m, name, param, source):
        calls.append((name, param, source))
        assert optimizer is opt and m is model
        return 3

    ctl = dyrep_fx.DyRep(model, opt, interval=1, group_chooser=chooser, **PAPER_SCHEDULE)
    train(model, opt, 1)
    (site,) = ctl.step().grown
    new = [n for n, p in model.named_parameters() if n.startswith(site + ".") and n != f"{site}.weight"]
    assert sorted(n for n, _, _ in calls) == sorted(new)
    for _name, param, source in calls:
        assert source is model.get_submodule(site).main_weight  # the kernel of the conv it grew from
        assert any(param is p for p in opt.param_groups[3]["params"])
    assert len(opt.param_groups[3]["params"]) == len(new)
    train(model, opt, 1, start=1)
