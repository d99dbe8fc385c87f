"""Saliency as the DyRep controller collects it (dyrep_fx.saliency through dyrep_fx.DyRep).

Every expected value is computed by hand in the training loop, right before ``optimizer.step()``:
the metric of ``(weight, weight.grad)`` per watched conv (``snip``: ``sum |g*w|``; ``snip_per_weight``: the
same over the kernel's number of weights; ``synflow``:
``sum g*w``; ``grad_norm``: ``||g||``), averaged over the iterations of the interval.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from helpers.nets import SmallNet
from torch import nn

import dyrep_fx
from dyrep_fx.defaults import PAPER_SCHEDULE

# float64 / tiny convs on CPU: one intra-op thread is much faster than two here.
pytestmark = pytest.mark.usefixtures("one_thread")



def Net() -> SmallNet:  # noqa: N802 - keeps the tests' call sites short
    return SmallNet()


def make(seed: int = 0, mode: str = "online", dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    model = Net().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    ctl = dyrep_fx.DyRep(model, opt, mode=mode, **{**PAPER_SCHEDULE, **kw})
    return model, opt, ctl


def batch(i: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(8, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (8,), generator=g)


def by_hand(model: nn.Module, names: list[str], metric: str = "snip") -> dict[str, float]:
    """The metric of each site, from the gradients as they are now, in float64, written out in full."""
    out = {}
    for name in names:
        w = model.get_submodule(name).weight.detach().double().reshape(-1).tolist()
        g = model.get_submodule(name).weight.grad.double().reshape(-1).tolist()
        if metric == "snip":
            out[name] = math.fsum(abs(a * b) for a, b in zip(g, w))
        elif metric == "snip_per_weight":
            out[name] = math.fsum(abs(a * b) for a, b in zip(g, w)) / len(w)
        elif metric == "synflow":
            out[name] = math.fsum(a * b for a, b in zip(g, w))
        else:
            out[name] = math.sqrt(math.fsum(a * a for a in g))
    return out


def mean_of(records: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in records) / len(records) for k in records[0]}


def assert_close(got: dict[str, float], want: dict[str, float], rel: float = 1e-10,
                 scale: dict[str, float] | None = None) -> None:
    """Equal to ``rel``; with ``scale``, to ``rel * scale`` absolutely (for sums that cancel)."""
    assert set(got) == set(want)
    for k in want:
        tol = 1e-300 if scale is None else rel * scale[k]
        assert got[k] == pytest.approx(want[k], rel=rel, abs=tol), k


def loss_of(model, i, dtype=torch.float64):
    x, y = batch(i, dtype)
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("metric", ["snip", "snip_per_weight", "synflow", "grad_norm"])
def test_saliency_is_the_interval_mean_of_the_metric(metric):
    model, opt, ctl = make(interval=4, metric=metric)
    names = ctl.candidates()
    assert names == ["conv1", "conv2", "conv3"]
    assert ctl.saliency.names == names
    records, scale = [], []
    for i in range(4):
        opt.zero_grad()
        loss_of(model, i).backward()
        records.append(by_hand(model, names, metric))
        scale.append(by_hand(model, names, "snip"))
        opt.step()
        if i < 3:
            assert ctl.step().due is False
    want = mean_of(records)
    # Weights moved between iterations: a value taken from the last step only would differ.
    assert any(abs(records[0][k] - want[k]) > 1e-6 * abs(want[k]) for k in names)
    scale = mean_of(scale)  # synflow cancels: compare it to the size of its terms
    assert_close(ctl.saliency.mean(), want, scale=scale)
    result = ctl.step()
    assert result.due
    assert_close(result.saliency, want, scale=scale)
    # The top-1 site by that mean grew.
    assert list(result.grown) == [max(want, key=want.get)]


def test_snip_per_weight_ranks_unlike_snip_on_layers_of_different_sizes():
    """The same gradients: snip ranks by sum, snip_per_weight by mean, and the sites differ in size here,
    so a scorer that forgot to divide (or divided by the output channels only) ranks as snip does."""
    model, opt, ctl = make(interval=100)
    names = ctl.candidates()
    opt.zero_grad()
    loss_of(model, 0).backward()
    total, per = by_hand(model, names, "snip"), by_hand(model, names, "snip_per_weight")
    sizes = {n: model.get_submodule(n).weight.numel() for n in names}
    assert len(set(sizes.values())) > 1
    assert {n: total[n] / per[n] for n in names} == pytest.approx(sizes, rel=1e-12)
    assert sorted(names, key=total.get) != sorted(names, key=per.get)


def test_weight_decay_and_momentum_do_not_enter_saliency():
    # SGD adds weight decay inside step(); the saliency must be the pure loss gradient's.
    model, opt, ctl = make(interval=100)
    for group in opt.param_groups:
        group["weight_decay"] = 0.5
    names = ctl.candidates()
    records = []
    for i in range(3):
        opt.zero_grad()
        loss_of(model, i).backward()
        records.append(by_hand(model, names))
        opt.step()
    assert_close(ctl.saliency.mean(), mean_of(records))


def test_snip_is_not_the_absolute_value_of_synflow():
    """snip sums |g*w| element-wise (the reference's); |sum g*w| would be another score."""
    model, opt, ctl = make(interval=100, metric="snip")
    names = ctl.candidates()
    records = []
    for i in range(3):
        opt.zero_grad()
        loss_of(model, i).backward()
        records.append((by_hand(model, names, "snip"), by_hand(model, names, "synflow")))
        opt.step()
    got = ctl.saliency.mean()
    assert_close(got, mean_of([r[0] for r in records]))
    abs_of_sum = mean_of([{k: abs(v) for k, v in r[1].items()} for r in records])
    assert all(got[k] > 100 * abs_of_sum[k] for k in names)  # BatchNorm'ed convs: |sum g*w| ~ eps residual


def test_abs_metric_is_gone_with_a_pointer():
    with pytest.raises(ValueError, match="'abs'.*removed.*'snip'"):
        make(metric="abs")


def test_bad_metric_is_refused():
    with pytest.raises(ValueError, match="metric must be one of .*snip.*synflow.*grad_norm.*random"):
        make(metric="taylor")


def test_gradient_accumulation_and_clipping_are_seen():
    """Two backward passes per step, then clipping: the saliency uses the final gradient."""
    model, opt, ctl = make(interval=100)
    names = ctl.candidates()
    records = []
    for i in range(3):
        opt.zero_grad()
        loss_of(model, 2 * i).backward()
        loss_of(model, 2 * i + 1).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        assert norm > 0.05  # clipping really changed the gradients
        records.append(by_hand(model, names))
        opt.step()
    assert_close(ctl.saliency.mean(), mean_of(records))


@pytest.mark.parametrize("explicit_unscale", [False, True])
def test_grad_scaler_saliency_uses_unscaled_gradients(explicit_unscale):
    model, opt, ctl = make(interval=100)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
    assert scaler.is_enabled()
    names = ctl.candidates()
    records, scales = [], []
    for i in range(4):
        opt.zero_grad()
        scaler.scale(loss_of(model, i)).backward()
        scale = scaler.get_scale()
        scales.append(scale)
        if explicit_unscale:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            records.append(by_hand(model, names))
        else:
            scaled = by_hand(model, names)
            records.append({k: v / scale for k, v in scaled.items()})
        scaler.step(opt)
        scaler.update()
    assert len(set(scales)) > 1  # the scale changed along the way (growth_interval=1)
    got = ctl.saliency.mean()
    want = mean_of(records)
    assert_close(got, want, rel=1e-9)
    # and not the scaled gradients' (which would be >= 4096 times larger)
    assert all(abs(got[k]) < 100 * abs(want[k]) for k in names)


def test_grad_scaler_skipped_step_is_not_recorded():
    model, opt, ctl = make(interval=100)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    names = ctl.candidates()
    records = []
    for i in range(3):
        opt.zero_grad()
        scaler.scale(loss_of(model, i)).backward()
        if i == 1:  # an overflow: GradScaler skips optimizer.step()
            model.fc.weight.grad[0, 0] = float("inf")
        else:
            records.append({k: v / scaler.get_scale() for k, v in by_hand(model, names).items()})
        scaler.step(opt)
        scaler.update()
    assert ctl.saliency.count == 2
    assert_close(ctl.saliency.mean(), mean_of(records), rel=1e-9)


def test_gradients_zeroed_inside_the_update_call_still_give_saliency():
    """mmengine's OptimWrapper.update_params: backward, step and zero_grad in one call."""
    model, opt, ctl = make(interval=3)
    names = ctl.candidates()
    records = []

    def update_params(loss):
        loss.backward()
        records.append(by_hand(model, names))
        opt.step()
        opt.zero_grad(set_to_none=True)

    for unit in range(3):
        for i in range(2):
            update_params(loss_of(model, 2 * unit + i))
        assert all(p.grad is None for p in model.parameters())
        result = ctl.step()
    assert result.due and result.grown
    assert_close(result.saliency, mean_of(records))


def test_interval_restarts_after_a_due_step():
    model, opt, ctl = make(interval=1, nested="open")
    for i in range(2):
        opt.zero_grad()
        loss_of(model, i).backward()
        opt.step()
    result = ctl.step()
    assert result.grown
    grown = next(iter(result.grown))
    assert ctl.saliency.count == 0 and ctl.saliency.mean() == {}
    names = ctl.candidates()
    assert grown not in names and f"{grown}.branches.1x1_kxk.conv2" in names
    assert ctl.saliency.names == names
    records = []
    for i in range(2, 5):
        opt.zero_grad()
        loss_of(model, i).backward()
        records.append(by_hand(model, names))
        opt.step()
    assert_close(ctl.saliency.mean(), mean_of(records))


def test_close_removes_the_hook():
    model, opt, ctl = make(interval=100)
    opt.zero_grad()
    loss_of(model, 0).backward()
    opt.step()
    assert ctl.saliency.count == 1
    ctl.close()
    opt.zero_grad()
    loss_of(model, 1).backward()
    opt.step()
    assert ctl.saliency.count == 1


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
                "broadcast_object_list", "reduce", "reduce_scatter", "barrier", "all_to_all")


def test_no_collective_and_no_item_per_iteration(tmp_path, monkeypatch):
    """Per iteration the hook only adds tensors: no collective, no host sync (``.item()``)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        calls: dict[str, int] = {}

        def counting(name, fn):
            def wrapper(*args, **kwargs):
                calls[name] = calls.get(name, 0) + 1
                return fn(*args, **kwargs)
            return wrapper

        model, opt, ctl = make(interval=100)
        names = ctl.candidates()
        for name in _COLLECTIVES:
            if hasattr(dist, name):
                monkeypatch.setattr(dist, name, counting(name, getattr(dist, name)))
        for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
            monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        records = []
        for i in range(5):
            opt.zero_grad()
            loss_of(model, i).backward()
            with torch.no_grad():
                records.append({n: model.get_submodule(n).weight.grad.mul(model.get_submodule(n).weight)
                                .abs().sum() for n in names})
            opt.step()
        assert calls == {}, f"per-iteration work did {calls}"
        monkeypatch.undo()
        assert ctl.saliency.count == 5
        assert_close(ctl.saliency.mean(), {n: sum(float(r[n]) for r in records) / 5 for n in names})
    finally:
        dist.destroy_process_group()
