"""torch.compile: a grown model trains compiled (one graph, no breaks) as it trains eagerly, and a DyRep
step between compiled steps makes torch.compile recompile for the new structure, which stays correct.

Each compiled model is checked against an eager twin with the same parameters, data and optimizer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.nets import SmallNet
from torch import nn

import dyrep_fx

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

#: float32, compiled (fused, reordered) vs eager kernels over a few SGD steps
TOL = 1e-5


def batch(i: int):
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)


def sgd_step(model, opt, i: int) -> float:
    x, y = batch(i)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_a_grown_model_trains_compiled_in_one_graph(mode):
    torch.manual_seed(0)
    model = SmallNet()
    dyrep_fx.transform(model, mode=mode)
    dyrep_fx.grow(model, ["conv2", "conv3"], ["1x1", "1x1_kxk", "1x1_avg", "1xk"])
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)  # any graph break raises
    opt, opt_eager = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, eager))
    for i in range(3):
        loss = sgd_step(compiled, opt, i)
        assert loss == pytest.approx(sgd_step(eager, opt_eager, i), rel=TOL)
        assert max_diff(model, eager) <= TOL


def test_dyrep_steps_between_compiled_steps_recompile_and_stay_correct():
    torch.manual_seed(0)
    model = SmallNet()
    eager = copy.deepcopy(model)
    opt, opt_eager = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, eager))
    ctl = dyrep_fx.DyRep(model, opt, interval=2, seed=1, grow_at_start=0.0)  # a step every 2 units from unit 2
    ctl_eager = dyrep_fx.DyRep(eager, opt_eager, interval=2, seed=1, grow_at_start=0.0)
    compiled = torch.compile(model)
    for i in range(6):
        loss = sgd_step(compiled, opt, i)
        assert loss == pytest.approx(sgd_step(eager, opt_eager, i), rel=TOL)
        result, result_eager = ctl.step(), ctl_eager.step()
        assert result.grown == result_eager.grown and result.cut == result_eager.cut
        assert max_diff(model, eager) <= TOL
    assert len(ctl.history) == 3 and all(e["grown"] for e in ctl.history)
    assert dyrep_fx.structure(model) == dyrep_fx.structure(eager)
