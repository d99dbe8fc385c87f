"""The live model's side of a DyRep step: a plan's growth and cuts carried out on the targets, inside the
controller's transaction (:class:`~dyrep_fx.ema_copies.EmaCopies` does the same for the EMA copies).

Growth is seeded by the plan and checked against the analysis the plan was decided on; every rank then holds
rank 0's values of what changed; dbb-mode blocks calibrate their new BatchNorms on data; cuts run target by
target, inner blocks first; the candidate rule hears of every change (its records are in the transaction).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .block import RepConv2d, main_parameters
from .calibration import calibrate_new_branches
from .distributed import broadcast_module
from .handle import Handle
from .passes.analysis import Site
from .passes.base import PassReport, Transaction
from .policies import CandidateRule
from .step_plan import StepPlan
from .target_names import join_name, split_name

__all__ = ["BranchCalibration", "LiveChanges"]


@dataclass
class BranchCalibration:
    """dbb mode: the data new branches' BatchNorms are fitted on (``loader`` None: no calibration)."""

    loader: Iterable | None
    batches: int
    forward_fn: Callable[[nn.Module, Any], Any]


class LiveChanges:
    """Grows and cuts the live model's targets (``{prefix: handle}``) as plans say."""

    def __init__(self, model: nn.Module, targets: dict[str, Handle], rule: CandidateRule,
                 calibration: BranchCalibration) -> None:
        self.model, self.targets, self.rule, self.calibration = model, targets, rule, calibration

    def grow(self, plan: StepPlan, analysis: dict[str, list[Site]],
             txn: Transaction) -> tuple[dict[str, list[str]], dict[str, nn.Parameter], int]:
        """Grow ``plan.grow``; ``({site: kinds grown}, {site: the conv weight it grew from}, batches
        calibrated)``."""
        grown: dict[str, list[str]] = {}
        sources: dict[str, nn.Parameter] = {}
        new_branches: dict[str, list[nn.Module]] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(plan.seed)
            for name, kinds in plan.grow.items():
                weight = main_parameters(self.model.get_submodule(name))[0]
                prefix, local = split_name(self.targets, name)
                report = self.targets[prefix].grow([local], list(kinds), txn=txn, prefix=prefix,
                                                   sites=analysis[prefix])
                if report.changed:
                    grown[name], sources[name] = list(report.changed[local]), weight
                    new_branches[name] = report.details["new_modules"][local]
        blocks = {name: self.model.get_submodule(name) for name in grown}
        for block in blocks.values():
            broadcast_module(block)
        batches = self._calibrate(blocks, new_branches)
        for name, block in blocks.items():
            self.rule.on_grown(name, block, plan.step)
        return grown, sources, batches

    def _calibrate(self, blocks: dict[str, RepConv2d], new_branches: dict[str, list[nn.Module]]) -> int:
        """dbb mode: the new branches' BatchNorms fitted on data, the function kept; batches used."""
        cal = self.calibration
        if cal.loader is None or not blocks or next(iter(blocks.values())).mode != "dbb":
            return 0
        return calibrate_new_branches(self.model, blocks, new_branches, cal.loader, cal.batches, cal.forward_fn)

    def cut(self, plan: StepPlan, txn: Transaction) -> dict[str, list[str]]:
        """Cut ``plan.cut`` target by target (inner blocks first, in the pass); ``{block: kinds cut}``."""
        by_target: dict[str, dict[str, list[str]]] = {}
        for name, kinds in plan.cut.items():
            prefix, local = split_name(self.targets, name)
            by_target.setdefault(prefix, {})[local] = list(kinds)
        cut: dict[str, list[str]] = {}
        for prefix, cuts in by_target.items():
            report: PassReport = self.targets[prefix].cut(cuts, txn=txn)
            cut.update({join_name(prefix, local): list(kinds) for local, kinds in report.changed.items()})
        for name in cut:
            block = self.model.get_submodule(name)
            self.rule.on_cut(name, block)
            # A cut folds each rank's own BatchNorm statistics into the kernel: make the ranks agree.
            broadcast_module(block)
        return cut
