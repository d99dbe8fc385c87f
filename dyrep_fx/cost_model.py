"""The execution cost model: a grown structure's predicted training-step time, relative to plain's.

DyRep's ``budget`` (:class:`dyrep_fx.DyRep`) keeps the predicted step time of the structure it grows
under a multiple of the plain network's; this module predicts it. Costs are counted in multiply-adds of
a convolution's forward pass (a *conv MAC*), per training step at the training batch size:

* a site's convolution: forward and its two backward products, ``3 * B * Ho * Wo * Cout * Cin/g * kh *
  kw`` per call, plus ``elementwise`` conv MACs per output element for the layers that follow it (its
  norm and activation, forward and backward);
* an online block adds, per step and whatever the batch: ``block`` (the one assembly Function, its
  hooks and the extra kernel in autograd), ``term`` for each branch's share of the kernel plus
  ``term_element`` for each of the branch's parameter elements (kernel-sized operations); a branch that
  composes two kernels (an inner conv: ``1x1_kxk``) also pays its composition, merged into the kernel or
  run as two convolutions, whichever :mod:`dyrep_fx.execution` runs on that input.

Only online mode is modelled: there the cost of a branch is kernel-sized, so its growth is cheap and
the same whatever the data. In dbb mode every branch is its own convolution and BatchNorm over the
feature map (the model would be another one). The constants were fitted on CPU (one thread, the depth
sweep's nets at batch 128 and ResNet-18/50 at batch 16) and are checked against side-by-side measurement on the sweep nets
and ResNet-18/50 in ``benchmarks/cost_model_check.py``; the prediction ranks structures, it is no clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .block import RepConv2d
from .execution import CONV_MAC_COST
from .geometry import ConvGeometry
from .kinds import registry
from .kinds.composed import composed_costs, run_composed_as_convs

__all__ = ["Budget", "CostModel", "DEFAULT_COST_MODEL", "SiteShape", "meta_branch", "predicted_ratio", "site_shape",
           "structure_budget"]


@dataclass(frozen=True)
class SiteShape:
    """One conv site as the cost model sees it: its geometry, per-sample input and output shapes
    ``(C, H, W)``, and how often it runs per forward call."""

    geometry: ConvGeometry
    input_shape: tuple[int, int, int]
    output_shape: tuple[int, int, int]
    calls: int = 1

    def batched_input(self, batch: int) -> tuple[int, int, int, int]:
        """The input's ``(N, C, H, W)`` at ``batch``."""
        return (batch, *self.input_shape)


@dataclass(frozen=True)
class CostModel:
    """Predicted per-step training cost in conv MACs (see the module docstring for the terms).

    Args:
        elementwise: conv MACs per output element of a site for the layers after it (norm, activation).
        block: fixed cost per online block per step.
        term: fixed cost per branch per step.
        term_element: cost per parameter element of a branch per step.
        fixed: the rest of a step whatever the structure (loss, head, optimizer), counted in plain's cost.
    """

    elementwise: float = 530.0
    block: float = 1.0e6
    term: float = 9.0e6
    term_element: float = 430.0
    fixed: float = 7.7e8

    def conv_cost(self, site: SiteShape, batch: int) -> float:
        """A plain conv's step: its three convolution products and the elementwise layers after it."""
        geom = site.geometry
        cout, ho, wo = site.output_shape
        kh, kw = geom.kernel_size
        macs = batch * ho * wo * cout * (geom.in_channels // geom.groups) * kh * kw
        return site.calls * (3.0 * macs + self.elementwise * batch * cout * ho * wo)

    def branch_cost(self, branch: nn.Module, site: SiteShape, batch: int) -> float:
        """What one online branch adds per step at ``site``."""
        elements = sum(p.numel() for p in branch.parameters())
        cost = self.term + self.term_element * elements
        if branch.inner_convs():  # two kernels composed: merged, or run as two convolutions
            shape = site.batched_input(batch)
            merged, convs = composed_costs(site.geometry, shape)
            cost += 3.0 * (CONV_MAC_COST * convs * site.calls if run_composed_as_convs(site.geometry, shape)
                           else merged)
        return cost

    def block_cost(self, branches: Iterable[nn.Module], site: SiteShape, batch: int) -> float:
        """What a block with ``branches`` adds to its conv per step (0 without branches)."""
        parts = [self.branch_cost(b, site, batch) for b in branches]
        return self.block + sum(parts) if parts else 0.0

    def growth_cost(self, kinds: Sequence[str], site: SiteShape, batch: int,
                    present: Iterable[nn.Module] = ()) -> float:
        """What growing ``kinds`` at ``site`` adds per step (a conv becoming a block pays ``block`` too)."""
        new = [meta_branch(kind, site.geometry) for kind in kinds]
        present = list(present)
        return self.block_cost(present + new, site, batch) - self.block_cost(present, site, batch)


#: Constants fitted by ``benchmarks/cost_model_check.py --fit`` (2026-12-06, one thread, on the sweep nets
#: at batch 128 and ResNet-18/50 at batch 16, 64x64; non-negative least squares on relative step times):
#: grown structures' ratios to plain predicted within 0.07 on average (0.21 at worst), 0.09 for a net left
#: out of the fit. A second run on the same busy machine (``benchmarks/results/cost_model/check.json``):
#: these constants predict it within 0.10 on average (ResNet-18 with DyRep's kinds: 2.38 for a measured
#: 2.44); the small sweep nets' own measured ratios moved by up to 0.2 between the two runs, which bounds
#: what any fit can do there.
DEFAULT_COST_MODEL = CostModel()


def meta_branch(kind: str, geometry: ConvGeometry) -> nn.Module:
    """A branch of ``kind`` for ``geometry`` on the meta device: its shapes without memory or values."""
    return registry.get_kind(kind).make(geometry, "online", 1.0, torch.empty(0, device="meta"))


def site_shape(module: nn.Module, input_shape: Sequence[int], output_shape: Sequence[int],
               calls: int | None) -> SiteShape:
    """The :class:`SiteShape` of a conv or block, from one traced call's ``(N, C, H, W)`` shapes."""
    geometry = module.geometry if isinstance(module, RepConv2d) else ConvGeometry.from_conv(module)
    return SiteShape(geometry, tuple(input_shape[1:]), tuple(output_shape[1:]), max(1, calls or 1))


def ratio(plain: float, added: float) -> float:
    """The predicted step time of a structure over plain's, from plain's cost and what growth added."""
    return math.inf if plain <= 0 else (plain + added) / plain


class Budget:
    """A cap on the grown structure's predicted step time, ``limit`` times the plain network's.

    Args:
        limit: the step-time ratio to plain the structure must stay at or under.
        model: the cost model.
        shapes: ``{site name: SiteShape}`` of the sites whose cost is known (traced with example inputs);
            the plain cost is theirs, a site without a shape is never grown under the budget.
        batch: the batch size the costs are for (the example inputs').
    """

    def __init__(self, limit: float, model: CostModel, shapes: dict[str, SiteShape], batch: int) -> None:
        self.limit, self.model, self.shapes, self.batch = limit, model, shapes, batch
        self.plain = model.fixed + sum(model.conv_cost(s, batch) for s in shapes.values())

    def added(self, blocks: dict[str, RepConv2d]) -> float:
        """What the grown ``blocks`` (``{site name: block}``) add to plain's cost per step."""
        return sum(self.model.block_cost(b.branches.values(), self.shapes[name], self.batch)
                   for name, b in blocks.items() if name in self.shapes)

    def saving(self, block_name: str, block: RepConv2d, cut: Sequence[str]) -> float:
        """What cutting ``cut`` from ``block`` saves per step."""
        if block_name not in self.shapes:
            return 0.0
        shape, branches = self.shapes[block_name], block.branches
        kept = [b for k, b in branches.items() if k not in cut]
        return (self.model.block_cost(branches.values(), shape, self.batch)
                - self.model.block_cost(kept, shape, self.batch))

    def growth(self, name: str, kinds: Sequence[str], present: Iterable[nn.Module] = ()) -> float | None:
        """What growing ``kinds`` at site ``name`` adds per step; ``None`` when its shape is unknown."""
        if name not in self.shapes:
            return None
        return self.model.growth_cost(kinds, self.shapes[name], self.batch, present)

    def ratio(self, added: float) -> float:
        """The predicted step time over plain's with ``added`` cost."""
        return ratio(self.plain, added)


def structure_budget(model: nn.Module, sites: Iterable, limit: float = math.inf,
                     cost_model: CostModel = DEFAULT_COST_MODEL) -> Budget:
    """A :class:`Budget` over ``sites`` (``dyrep_fx.sites(model)`` of a model transformed with example
    inputs); refused when no site was traced with shapes."""
    traced = [s for s in sites if s.input_shape is not None and s.output_shape is not None]
    if not traced:
        raise ValueError("the cost model predicts the step time from the sites' feature-map shapes, and none "
                         "were traced: pass example_inputs=(a training batch,) to DyRep (or to "
                         "dyrep_fx.transform)")
    shapes = {s.name: site_shape(model.get_submodule(s.name), s.input_shape, s.output_shape, s.calls)
              for s in traced}
    return Budget(limit, cost_model, shapes, batch=traced[0].input_shape[0])


def predicted_ratio(model: nn.Module, sites: Iterable, blocks: dict[str, RepConv2d],
                    cost_model: CostModel = DEFAULT_COST_MODEL) -> float:
    """The predicted training-step time of ``model`` with its grown ``blocks`` over the plain network's."""
    budget = structure_budget(model, sites, cost_model=cost_model)
    return budget.ratio(budget.added(blocks))
