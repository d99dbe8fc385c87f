"""The execution cost model (``dyrep_fx.cost_model``) and DyRep's ``budget``.

Costs are checked against sums written out by hand for one conv, and the budget's choices against what
fits: a step grows the sites with the best score per predicted cost while the structure's predicted
step time stays under the cap, and the cuts of the same step make room first.
"""

from __future__ import annotations

import pytest
import torch
from helpers.nets import SmallNet, spread_first_block
from torch import nn

import dyrep_fx
from dyrep_fx.cost_model import CostModel, meta_branch, predicted_ratio, site_shape, structure_budget
from dyrep_fx.geometry import ConvGeometry

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
MODEL = CostModel(elementwise=10.0, block=1000.0, term=100.0, term_element=2.0, fixed=50.0)


def test_a_plain_conv_costs_its_three_products_and_the_elementwise_layers_after_it():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
    shape = site_shape(conv, (4, 8, 10, 10), (4, 16, 5, 5), calls=2)
    macs = 4 * 5 * 5 * 16 * 8 * 9  # per call: N * Ho * Wo * Cout * Cin * kh * kw
    assert MODEL.conv_cost(shape, 4) == pytest.approx(2 * (3 * macs + 10.0 * 4 * 16 * 5 * 5))


def test_growing_a_conv_adds_the_block_and_each_branch_term():
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    shape = site_shape(conv, (4, 8, 6, 6), (4, 16, 6, 6), calls=1)
    one_by_one = 16 * 8 + 16  # its 1x1 kernel and its scale per output channel
    one_by_k = 16 * 8 * 3 + 16
    expected = 1000.0 + (100.0 + 2.0 * one_by_one) + (100.0 + 2.0 * one_by_k)
    assert MODEL.growth_cost(["1x1", "1xk"], shape, 4) == pytest.approx(expected)
    # a block that has 1x1 already pays only the new branch
    present = [meta_branch("1x1", ConvGeometry.from_conv(conv))]
    assert MODEL.growth_cost(["1xk"], shape, 4, present) == pytest.approx(100.0 + 2.0 * one_by_k)


def test_a_composed_branch_pays_its_composition():
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    big_map = site_shape(conv, (4, 8, 32, 32), (4, 16, 32, 32), calls=1)
    params = 8 * 8 + 16 * 8 * 9 + 16  # its 1x1, its kxk, its scale
    merged = 16 * 8 * 8 * 9  # on a large map the two kernels are merged: Cout * Cmid * Cin * kh * kw
    assert MODEL.growth_cost(["1x1_kxk"], big_map, 4) == pytest.approx(1000.0 + 100.0 + 2.0 * params + 3 * merged)


def transformed(**kw):
    torch.manual_seed(0)
    model = SmallNet().double()
    dyrep_fx.transform(model, example_inputs=(X,))
    return model


def test_predicted_ratio_of_plain_is_one_and_grows_with_blocks():
    model = transformed()
    assert predicted_ratio(model, dyrep_fx.sites(model), {}) == 1.0
    dyrep_fx.grow(model, ["conv3"], ["1x1"])
    budget = structure_budget(model, dyrep_fx.sites(model), cost_model=MODEL)
    added = MODEL.growth_cost(["1x1"], budget.shapes["conv3"], 8)
    assert budget.ratio(budget.added(dyrep_fx.blocks(model))) == pytest.approx((budget.plain + added) / budget.plain)


def size_score(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Scores by kernel size only: conv3 (2304) > conv2 (1152) > conv1 (216)."""
    return torch.tensor(float(weight.numel()))


def dyrep_with(limit: float, cost_model: CostModel, grow_at_start: float = 1.0, **kw):
    torch.manual_seed(0)
    model = SmallNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ctl = dyrep_fx.DyRep(model, opt, interval=1, grow_at_start=grow_at_start, budget=limit, cost_model=cost_model,
                         metric=size_score, example_inputs=(X,), **kw)
    return model, opt, ctl


def train_step(model, opt):
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), torch.arange(8) % 10).backward()
    opt.step()


def kinds_of(model) -> dict[str, list[str]]:
    return {s.name: [k for k in dyrep_fx.DYREP_KINDS if k in s.kinds] for s in dyrep_fx.sites(model)}


def test_the_budget_grows_what_fits_best_score_first():
    blocky = CostModel(elementwise=0.0, block=1e6, term=0.0, term_element=0.0, fixed=0.0)
    model, opt, ctl = dyrep_with(1.0, blocky)
    plain = ctl.budget.plain
    costs = {n: ctl.budget.growth(n, kinds) for n, kinds in kinds_of(model).items()}
    # about a block each (plus the 1x1_kxk composition): room for two, not three
    model, opt, ctl = dyrep_with((plain + costs["conv3"] + costs["conv2"] + 0.5e6) / plain, blocky)
    train_step(model, opt)
    result = ctl.step()
    assert sorted(result.grown) == ["conv2", "conv3"]  # similar costs: the two best scores
    assert ctl.predicted_step_ratio() == pytest.approx((plain + costs["conv3"] + costs["conv2"]) / plain)
    assert ctl.history[-1]["predicted_step_ratio"] == pytest.approx(ctl.predicted_step_ratio())


def test_the_budget_ranks_by_score_per_unit_of_cost():
    # branch elements dominate: conv1's block is so much cheaper that it comes first despite its low score
    elementy = CostModel(elementwise=0.0, block=0.0, term=0.0, term_element=1e4, fixed=0.0)
    model, opt, ctl = dyrep_with(1.0, elementy)
    costs = {n: ctl.budget.growth(n, kinds) for n, kinds in kinds_of(model).items()}
    per_cost = {n: size_score(model.get_submodule(n).weight, None).item() / c for n, c in costs.items()}
    best = max(per_cost, key=per_cost.get)
    assert best != "conv3"  # the best score alone would pick conv3: the test tells the two rankings apart
    limit = (ctl.budget.plain + costs[best] * 1.01) / ctl.budget.plain
    model, opt, ctl = dyrep_with(limit, elementy)
    train_step(model, opt)
    assert list(ctl.step().grown) == [best]
    # room for everything but one site per step: the ranking alone decides (by score it would be conv3)
    model, opt, ctl = dyrep_with(100.0, elementy, grow_at_start=0.01)
    train_step(model, opt)
    assert list(ctl.step().grown) == [best]


def test_cuts_of_the_same_step_make_room():
    blocky = CostModel(elementwise=0.0, block=1e6, term=1e5, term_element=0.0, fixed=0.0)
    model, opt, ctl = dyrep_with(100.0, blocky)
    costs = {n: ctl.budget.growth(n, kinds) for n, kinds in kinds_of(model).items()}
    # room for conv3 and conv2 at the start; conv1 fits later only if one branch's term is freed
    room = costs["conv3"] + costs["conv2"] + costs["conv1"] - 1e5 + 1.0
    model, opt, ctl = dyrep_with((ctl.budget.plain + room) / ctl.budget.plain, blocky)
    train_step(model, opt)
    assert sorted(ctl.step().grown) == ["conv2", "conv3"]
    spread_first_block(model)  # conv2's block: half its branches far weaker, so Dep cuts them
    train_step(model, opt)
    result = ctl.step()
    assert result.cut and "conv2" in result.cut
    assert list(result.grown) == ["conv1"]
    assert ctl.predicted_step_ratio() <= ctl.budget.limit


def test_budget_refusals_name_what_to_do():
    torch.manual_seed(0)
    model = SmallNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="example_inputs"):
        dyrep_fx.DyRep(model, opt, budget=1.2)
    with pytest.raises(ValueError, match="online"):
        dyrep_fx.DyRep(SmallNet().double(), opt, budget=1.2, mode="dbb", example_inputs=(X,))
    with pytest.raises(ValueError, match="step-time ratio"):
        dyrep_fx.DyRep(SmallNet().double(), opt, budget=0.5, example_inputs=(X,))
