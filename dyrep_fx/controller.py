"""``DyRep``: the training controller that grows and prunes a transformed model during training.

Per interval (epochs or iterations, the caller's unit) it scores the growth candidates from the
optimizer's gradients (:mod:`dyrep_fx.saliency`). When a step is due it first *decides*
(:meth:`DyRep.decide`: a frozen :class:`~dyrep_fx.step_plan.StepPlan` of what grows with which kinds and
what is cut, with the scores and verdicts behind it), then *applies* the plan (:meth:`DyRep.apply`: the
model, its EMA copies and the optimizer, once each, as one transaction) and records it in ``history``.

What is decided comes from three policies (:mod:`dyrep_fx.policies`), each replaceable: the scorer
(``metric``), the candidate rule (``candidates``; by default :class:`~dyrep_fx.policies.DyRepCandidates`:
kernels larger than 1x1 and the nesting gate) and the cut criterion (``criterion``; by default
:class:`~dyrep_fx.passes.dep.DepCriterion`). The main kernel of a grown block is never a candidate (the
reference offers it, nesting a second block there): in online mode that second block's branches are
linear in the same window as the first block's, so they add no function the block cannot already
express; re-growing a block's own branches after a cut would undo the cut.

    ctl = dyrep_fx.DyRep(model, optimizer, interval=5, until=100, calib_loader=train_loader)
    for epoch in range(epochs):
        train_one_epoch(model, optimizer)
        if ctl.step().changed and ddp:          # after a change, DDP must be rebuilt
            model_ddp = dyrep_fx.distributed.rewrap_ddp(model_ddp)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .block import main_parameters
from .calibration import default_forward
from .checkpoint_state import CheckpointState
from .cost_model import DEFAULT_COST_MODEL, Budget, CostModel, structure_budget
from .defaults import GROW_AT_START, INIT_SCALE, STD_GATE, THRESHOLD
from .distributed import check_same_on_all_ranks
from .ema_copies import EmaCopies
from .handle import Handle
from .kinds import DYREP_KINDS
from .live_changes import BranchCalibration, LiveChanges
from .optim_sync import GroupChooser, default_group, sync_after_change
from .passes.analysis import Site
from .passes.base import Transaction
from .passes.dep import CutCriterion, DepCriterion
from .passes.rep import check_kind_names
from .policies import (
    NESTED_POLICIES,
    CandidateRule,
    DyRepCandidates,
    GrowthSelection,
    TopScores,
    WithinBudget,
    as_candidate_rule,
    check_cut_criterion,
    growable_kinds,
)
from .saliency import DEFAULT_METRIC, SaliencyCollector, Scorer, metric_name
from .schedule import Schedule
from .step_history import history_entry, log_step
from .step_plan import StepPlan, step_seed
from .step_transaction import step_transaction
from .target_set import TargetSet

__all__ = ["DyRep", "StepResult", "StepPlan", "DYREP_KINDS", "NESTED_POLICIES"]


log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one call of :meth:`DyRep.step` (or :meth:`DyRep.apply`) did.

    ``grown`` and ``cut`` are what changed (``{site: kinds}``); ``saliency`` and ``verdicts`` are the
    plan's scores and verdicts; ``plan`` is the plan itself (``None`` when no step was due).
    """

    unit: int
    due: bool
    grown: dict[str, list[str]] = field(default_factory=dict)
    cut: dict[str, list[str]] = field(default_factory=dict)
    saliency: dict[str, float] = field(default_factory=dict)
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibrated_batches: int = 0
    plan: StepPlan | None = None

    @property
    def changed(self) -> bool:
        """True when the structure changed (DDP wrappers must then be rebuilt)."""
        return bool(self.grown or self.cut)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _refuse_foreign_optimizer(optimizer: torch.optim.Optimizer, roots: dict[str, nn.Module]) -> None:
    """Refuse an optimizer that holds none of the targets' trainable parameters: it was built for
    another model instance (a copy, an EMA twin) or before the model was rebuilt, and would train nothing
    DyRep grows."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {f"{prefix}.{name}" if prefix else name: p for prefix, root in roots.items()
                 for name, p in root.named_parameters() if p.requires_grad}
    if trainable and not any(id(p) in held for p in trainable.values()):
        raise ValueError(
            f"the optimizer holds none of the {len(trainable)} trainable parameters DyRep works on "
            f"(e.g. {list(trainable)[:3]}); build it from this model's parameters (e.g. "
            "torch.optim.SGD(model.parameters(), ...)), not from another instance or a copy")


def _candidate_rule(candidates: CandidateRule | Callable | None, nested: str, pointwise: bool) -> CandidateRule:
    """The user's rule, or DyRep's with ``nested`` and ``pointwise`` (which a user rule replaces)."""
    if candidates is None:
        return DyRepCandidates(pointwise=pointwise, nested=nested)
    if nested != "gated" or pointwise:
        raise ValueError("nested and pointwise configure the default candidate rule; with candidates=... "
                         "the rule you pass decides (give it those settings instead)")
    return as_candidate_rule(candidates)


def _cut_criterion(criterion: CutCriterion | None, std_gate: float, threshold: float) -> CutCriterion:
    """The user's criterion, or DyRep's Dep criterion with ``std_gate`` and ``threshold``."""
    if criterion is None:
        return DepCriterion(std_gate, threshold)
    if std_gate != STD_GATE or threshold != THRESHOLD:
        raise ValueError("std_gate and threshold configure the default cut criterion; with criterion=... "
                         "the criterion you pass decides (give it those settings instead)")
    return check_cut_criterion(criterion)


def _check_budget(budget: float | None, mode: str) -> None:
    """Refuse a budget that cannot work, naming the setting and what it takes."""
    if budget is not None and not budget >= 1.0:
        raise ValueError(f"budget is a step-time ratio to the plain network (>= 1.0, e.g. 1.2), got {budget}")
    if budget is not None and mode != "online":
        raise ValueError("budget predicts online blocks' cost (dyrep_fx.cost_model); dbb mode runs every "
                         "branch as its own convolution and BatchNorm, which it does not model: use "
                         "mode='online' or budget=None")


def _target_handles(roots: dict[str, nn.Module], example_inputs: tuple | dict[str, tuple] | None, mode: str,
                    init_scale: float, recompute: bool) -> TargetSet:
    """One handle per target root (transformed here unless it was), all in one mode."""
    handles = {}
    for prefix, root in roots.items():
        if Handle.is_transformed(root):
            handles[prefix] = Handle.of(root)
        else:
            inputs = example_inputs.get(prefix) if isinstance(example_inputs, dict) else example_inputs
            handles[prefix] = Handle.transform(root, inputs, mode, init_scale=init_scale, recompute=recompute)
    return TargetSet(handles)


def _warn_missing_weights(model: nn.Module, optimizer: torch.optim.Optimizer, sites: list[Site]) -> None:
    """Warn when the optimizer lacks some growable convs' weights.

    Only a warning: training part of a network with this optimizer is legitimate, but such a conv's
    gradient is never zeroed or applied by it, so its saliency is stale and its new branches would
    train while its own kernel does not.
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [s.name for s in sites
               if s.eligible and id(main_parameters(model.get_submodule(s.name))[0]) not in held]
    if missing:
        log.warning("DyRep: the optimizer lacks the weights of %d growable conv(s) %s; they are still "
                    "scored and grown but this optimizer neither trains nor zeroes them: add them to it, "
                    "or freeze them (requires_grad=False) to keep them out of DyRep",
                    len(missing), missing[:5])


def _growth_selection(growth: GrowthSelection | None, budget: Budget | None) -> GrowthSelection:
    """The user's selection, or DyRep's: the top scores, within ``budget`` when there is one."""
    if growth is None:
        return TopScores() if budget is None else WithinBudget(budget)
    if budget is not None:
        raise ValueError("budget configures the default growth selection; with growth=... the selection you "
                         "pass decides (give it the budget instead, e.g. WithinBudget)")
    if not isinstance(growth, GrowthSelection):
        raise TypeError(f"growth must be a dyrep_fx.policies.GrowthSelection, got {type(growth).__name__}")
    return growth


class DyRep(CheckpointState):
    """Dynamic re-parameterization during training (DyRep, CVPR 2022) for a transformed model.

    Args:
        model: the model (or its DDP wrapper); transformed here if it was not yet.
        optimizer: the torch optimizer training it; kept consistent in place. One holding none of the
            targets' trainable parameters is refused (``ValueError``); one lacking only some growable
            convs' weights is accepted with a logged warning naming them (their saliency would be stale).
        interval: a step is due every ``interval`` calls of :meth:`step` (paper: 5 epochs).
        until: no growth or cut after this many calls (paper: 100 of 120 epochs); ``None`` = never stop.
        topk: sites grown per step (paper: 1); ``0`` grows nothing after the first step (with
            ``grow_at_start=1.0``: start fully grown and only cut, the reverse path).
        budget: the largest predicted training-step time of the grown structure, as a multiple of the
            plain network's (e.g. ``1.2``), by the execution cost model (:mod:`dyrep_fx.cost_model`; online
            mode only). Sites are then ranked by score per unit of predicted added cost and grown while the
            structure fits; cuts decided in the same step make room first. Needs the sites' shapes: pass
            ``example_inputs`` (a batch of the training batch size, whose cost is predicted). ``None``: no cap.
        cost_model: the :class:`~dyrep_fx.cost_model.CostModel` the budget predicts with.
        growth: the growth selection, a :class:`~dyrep_fx.policies.GrowthSelection` (which scored candidates
            grow); default :class:`~dyrep_fx.policies.TopScores`, or
            :class:`~dyrep_fx.policies.WithinBudget` with ``budget``.
        grow_at_start: the fraction of the candidate sites grown at the first :meth:`step` call, scored on
            that first iteration's gradients, i.e. at initialisation (what SNIP was defined for); then the
            usual steps every ``interval`` units. Default :data:`~dyrep_fx.defaults.GROW_AT_START` (half, the
            best setting measured; see there). ``0``: the paper's schedule, the first step after
            ``interval`` units. ``1.0`` grows every candidate from the start.
        kinds: branch kinds to grow where they apply (default: DyRep's set; ``None``: every kind).
        metric: the scorer: ``"snip_per_weight"`` (default; no preference for large layers, the one site
            choice measured above random sites), ``"snip"`` (the default until issue 31),
            ``"synflow"`` (the reference's default), ``"grad_norm"``, ``"random"``, or a callable
            ``(weight, grad) -> tensor`` (see :mod:`dyrep_fx.saliency`).
        candidates: the candidate rule, a :class:`~dyrep_fx.policies.CandidateRule` or a function
            ``(site, model) -> bool`` (see :mod:`dyrep_fx.policies`); default DyRep's, set by ``nested``
            and ``pointwise``.
        nested: ``"gated"``, ``"open"`` or ``"off"``: when inner kxk convs of grown branches are candidates.
        pointwise: whether 1x1 convs are candidates (the reference: no).
        criterion: the cut criterion, any object with ``judge(importance) -> Verdict``
            (:class:`~dyrep_fx.passes.dep.CutCriterion`); default the Dep criterion set by ``std_gate``
            and ``threshold`` (see :class:`~dyrep_fx.passes.dep.DepCriterion`).
        calib_loader, calib_batches, forward_fn: dbb-mode BatchNorm calibration data (paper: 20 batches).
        group_chooser: which optimizer group a new Parameter joins (see :mod:`dyrep_fx.optim_sync`).
        seed: seeds branch initialisation per step, so runs and resumes are reproducible.
        targets: qualified names of the submodules to re-parameterize (each traced on its own, e.g.
            ``["backbone", "neck"]`` of a detector); ``None`` = the whole model. Site names are
            then relative to ``model`` (``"backbone.layer1.0.conv1"``).
        mode, init_scale, recompute: passed to :func:`dyrep_fx.transform` when a target is not transformed yet
            (``mode="online"`` by default: as accurate as ``"dbb"`` for DyRep in the depth sweep's stage 2
            at under half its step time; ``benchmarks/README.md``).
        example_inputs: for that transform; a tuple, or ``{target: tuple}`` with ``targets``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        interval: int = 5,
        until: int | None = None,
        topk: int = 1,
        grow_at_start: float = GROW_AT_START,
        budget: float | None = None,
        cost_model: CostModel = DEFAULT_COST_MODEL,
        growth: GrowthSelection | None = None,
        kinds: Iterable[str] | None = DYREP_KINDS,
        metric: str | Scorer = DEFAULT_METRIC,
        candidates: CandidateRule | Callable[[Site, nn.Module], bool] | None = None,
        nested: str = "gated",
        pointwise: bool = False,
        criterion: CutCriterion | None = None,
        std_gate: float = STD_GATE,
        threshold: float = THRESHOLD,
        calib_loader: Iterable | None = None,
        calib_batches: int = 20,
        forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
        group_chooser: GroupChooser = default_group,
        seed: int = 0,
        mode: str = "online",
        init_scale: float = INIT_SCALE,
        example_inputs: tuple | dict[str, tuple] | None = None,
        targets: Iterable[str] | None = None,
        recompute: bool = False,
    ) -> None:
        #: When steps are due and how many sites each grows (:mod:`dyrep_fx.schedule`).
        self.schedule = Schedule(interval, until, topk, grow_at_start)
        _check_budget(budget, mode)
        kinds = None if kinds is None else check_kind_names(kinds)
        #: Which growable sites are offered (:mod:`dyrep_fx.policies`).
        self.candidate_rule = _candidate_rule(candidates, nested, pointwise)
        #: Which branches of a block are cut.
        self.criterion = _cut_criterion(criterion, std_gate, threshold)
        self.model = _unwrap(model)
        roots = {prefix: self.model.get_submodule(prefix) if prefix else self.model
                 for prefix in ([""] if targets is None else list(targets))}
        _refuse_foreign_optimizer(optimizer, roots)  # before transforming: a refusal changes nothing
        #: One handle per target, by its qualified name ("" is the whole model).
        self.targets = _target_handles(roots, example_inputs, mode, init_scale, recompute)
        self.mode = self.targets.mode
        sites = self.sites()
        _warn_missing_weights(self.model, optimizer, sites)
        self.optimizer = optimizer
        #: Predicts the structure's step time for ``budget`` (:mod:`dyrep_fx.cost_model`); ``None``: no cap.
        self.budget = None if budget is None else structure_budget(self.model, sites, budget, cost_model)
        #: Which scored candidates grow (:mod:`dyrep_fx.policies`).
        self.growth = _growth_selection(growth, self.budget)
        self.kinds = kinds
        self.group_chooser = group_chooser
        self.seed = seed
        self.units = 0
        self.steps_done = 0
        #: One entry per applied plan: its unit, step, what grew and was cut, the top scores and verdicts.
        self.history: list[dict[str, Any]] = []
        #: The attached EMA copies, kept in step with every change.
        self.emas = EmaCopies(self.targets)
        #: The live model's side of each step: its growth and cuts.
        self.live = LiveChanges(self.model, self.targets, self.candidate_rule,
                                BranchCalibration(calib_loader, calib_batches, forward_fn))
        self.saliency = SaliencyCollector(optimizer, metric, seed=seed)
        self._watch(self.candidates())  # the same analysis as ``sites`` (kept by the targets)

    @property
    def births(self) -> dict[str, dict[str, Any]]:
        """The default candidate rule's birth records (``{}`` for a rule that keeps none)."""
        return getattr(self.candidate_rule, "births", {})

    # -- the analysis: what can grow ---------------------------------------------------------------
    def sites(self) -> list[Site]:
        """Every site of every target, with names relative to the model (one analysis of each target)."""
        return self.targets.sites()

    def candidates(self) -> list[str]:
        """Sites offered for growth now: growable ones the candidate rule offers.

        As in DyRep, a grown block does not regrow branches it lost (they were cut for a reason); it
        grows further through its inner kxk conv. A block whose branches were all cut is a conv again.
        """
        sites = self.sites()
        growable = growable_kinds(sites, self.kinds)
        return [s.name for s in sites if s.name in growable and self.candidate_rule.offers(s, self.model)]

    def _watch(self, names: list[str]) -> None:
        """Score ``names`` over the next interval."""
        self.saliency.watch([(name, main_parameters(self.model.get_submodule(name))[0]) for name in names])

    def is_due(self) -> bool:
        """Whether the next :meth:`step` call will change the structure (if anything qualifies)."""
        return self.schedule.is_due(self.units, self.steps_done)

    # -- the step: decide, then apply ------------------------------------------------------------------
    def step(self) -> StepResult:
        """Call once per unit (epoch or N iterations). When due: :meth:`decide`, then :meth:`apply`.

        The plan is checked to be the same on every rank before anything changes; if it differs, or if
        applying it fails, every rank raises and the model, its EMA copies, the optimizer and the unit
        count are as they were.
        """
        if not self.is_due():
            self.units += 1
            return StepResult(unit=self.units, due=False)
        result = self.apply(self.decide())
        self.units += 1
        return result

    def predicted_step_ratio(self) -> float | None:
        """The current structure's predicted training-step time over the plain network's (with a budget)."""
        if self.budget is None:
            return None
        return self.budget.ratio(self.budget.added(self.targets.blocks()))

    def decide(self) -> StepPlan:
        """The plan for the next step: the candidates the growth selection picks from the interval's scores
        (``topk`` of them), and what the cut criterion cuts from the blocks as they are now; changes
        nothing (no analysis: the one made after the last step, unless the model changed since).

        Blocks grown by the plan are judged at the next step (their branches start with equal scales);
        growing a block's inner kxk conv leaves the importances of the block's branches as they are.
        """
        scores = self.saliency.mean(self.steps_done)
        verdicts = self.targets.judge(self.criterion)
        cut = {name: v["cut"] for name, v in verdicts.items() if v["cut"]}
        kinds = growable_kinds(self.sites(), self.kinds)
        count = self.schedule.growth_count(sum(1 for name in scores if name in kinds), self.units, self.steps_done)
        grow = self.growth.choose(scores, kinds, count, cut, self.targets.blocks())
        return StepPlan(unit=self.units + 1, step=self.steps_done, seed=step_seed(self.seed, self.steps_done),
                        grow=grow, cut=cut, scores=scores, verdicts=verdicts)

    def apply(self, plan: StepPlan) -> StepResult:
        """Carry ``plan`` out on the model, its EMA copies and the optimizer, as one transaction.

        Grows (seeded by the plan), calibrates new BatchNorms (dbb mode), cuts, makes every rank hold
        rank 0's values of what changed, and syncs the optimizer; then records the plan in ``history``
        and watches the new candidates. A plan of another step, or one the ranks disagree on, is refused
        before anything changes; a failure midway puts everything back and re-raises. The unit count is
        :meth:`step`'s: a plan applied by hand does not advance it.
        """
        if plan.step != self.steps_done:
            raise ValueError(f"the plan was decided at step {plan.step}, this controller is at step "
                             f"{self.steps_done}; decide again")
        check_same_on_all_ranks(plan.decision(), "the DyRep step decision")
        plain = plan.to_dict()
        result = StepResult(unit=plan.unit, due=True, saliency=plain["scores"], verdicts=plain["verdicts"],
                            plan=plan)
        # the analysis the plan was decided on (kept by the targets while the model is unchanged)
        analysis, before = self.targets.analyse(), {id(p) for p in self.model.parameters()}
        with self._transaction() as txn:
            result.grown, sources, result.calibrated_batches = self.live.grow(plan, analysis, txn)
            self.emas.grow(self.model, result.grown, txn)
            result.cut = self.live.cut(plan, txn)
            self.emas.cut(result.cut, txn)
            sync_after_change(self.optimizer, self.model, before, sources, self.group_chooser)
        self.steps_done += 1
        self._record(plan, result)
        self._watch(self.candidates())
        return result

    def _transaction(self) -> AbstractContextManager[Transaction]:
        """One all-or-nothing unit over the model, the optimizer, the candidate rule's records and the
        saliency interval (:func:`~dyrep_fx.step_transaction.step_transaction`)."""
        return step_transaction(self.model, self.optimizer, self.candidate_rule, self.saliency, self._watch)

    def _record(self, plan: StepPlan, result: StepResult) -> None:
        """Append the plan and what it changed to ``history``, and log it (:mod:`dyrep_fx.step_history`)."""
        entry = history_entry(plan, result.grown, result.cut, result.saliency, result.verdicts, self.model)
        if self.budget is not None:
            entry["predicted_step_ratio"] = self.predicted_step_ratio()
        self.history.append(entry)
        log_step(log, entry, metric_name(self.saliency.metric))

    # -- EMA copies ------------------------------------------------------------------------------
    def attach_ema(self, ema_module: nn.Module) -> None:
        """Keep ``ema_module`` (e.g. ``AveragedModel(model).module``) in step with every change.

        New branches in the EMA copy start from the live model's values; its main kernels are
        re-balanced so the EMA function is unchanged; cuts absorb the EMA's own averaged values
        (:mod:`dyrep_fx.ema_copies`).
        """
        self.emas.attach(_unwrap(ema_module))

    def close(self) -> None:
        """Remove the optimizer hook."""
        self.saliency.remove()
