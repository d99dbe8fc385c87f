"""``DyRep``: the training controller that grows and prunes a transformed model during training.

Per interval (epochs or iterations, the caller's unit) it scores the growth candidates from the
optimizer's gradients (:mod:`dyrep_fx.saliency`); when a step is due it grows the most salient candidates
(Rep), cuts unimportant branches everywhere (Dep), calibrates new BatchNorms in dbb mode, keeps the
optimizer (and any attached EMA copies) consistent, and records every decision with its numbers
(``history``: candidate scores, branch importances and their spread, why a block kept its branches).

Which convs are candidates (each a stated choice with a parity setting):

* kernel size: convs with a kernel larger than 1x1 (the reference's rule); ``pointwise=True`` adds 1x1 convs.
* nesting: the inner kxk conv of a grown ``1x1_kxk`` branch can grow in turn. By default
  (``nested="gated"``) it is a candidate only once its branch has trained a whole interval and its
  importance rose above the value it had when grown: a fresh branch's inner conv has a tiny share of its
  block's kernel, and growing it spends a step on structure that stays inert. ``"open"`` offers it at once
  (the reference), ``"off"`` never.
* the main kernel of a grown block is not a candidate (the reference offers it, nesting a second block
  there): in online mode that second block's branches are linear in the same window as the first
  block's, so they add no function the block cannot already express; re-growing a block's own
  branches after a cut would undo the cut.

    ctl = dyrep_fx.DyRep(model, optimizer, interval=5, until=100, calib_loader=train_loader)
    for epoch in range(epochs):
        train_one_epoch(model, optimizer)
        if ctl.step().changed and ddp:          # after a change, DDP must be rebuilt
            model_ddp = dyrep_fx.distributed.rewrap_ddp(model_ddp)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import structure_spec
from .block import RepConv2d, find_blocks
from .calibration import calibrate_batchnorms, default_forward
from .defaults import INIT_SCALE, STD_GATE, THRESHOLD
from .distributed import broadcast_module, check_same_on_all_ranks
from .geometry import DYREP_KINDS
from .handle import Handle
from .optim_sync import GroupChooser, apply_layout, default_group, layout, sync_optimizer
from .passes.base import PassError, Transaction
from .passes.dep import DepCriterion
from .passes.rep import check_kind_names
from .saliency import DEFAULT_METRIC, SaliencyCollector, Scorer, metric_name

__all__ = ["DyRep", "StepResult", "DYREP_KINDS", "NESTED_POLICIES"]


#: How inner kxk convs of grown branches become candidates (see the module docstring).
NESTED_POLICIES: tuple[str, ...] = ("gated", "open", "off")
#: Candidate scores kept per step in ``history`` (the best first).
TOP_SCORES = 5

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one call of :meth:`DyRep.step` did."""

    unit: int
    due: bool
    grown: dict[str, list[str]] = field(default_factory=dict)
    cut: dict[str, list[str]] = field(default_factory=dict)
    saliency: dict[str, float] = field(default_factory=dict)
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibrated_batches: int = 0

    @property
    def changed(self) -> bool:
        """True when the structure changed (DDP wrappers must then be rebuilt)."""
        return bool(self.grown or self.cut)


def _describe_changes(changes: dict[str, list[str]], verb: str) -> str:
    return "; ".join(f"{verb} {name} {kinds}" for name, kinds in changes.items())


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


class DyRep:
    """Dynamic re-parameterization during training (DyRep, CVPR 2022) for a transformed model.

    Args:
        model: the model (or its DDP wrapper); transformed here if it was not yet.
        optimizer: the torch optimizer training it; kept consistent in place. One holding none of the
            targets' trainable parameters is refused (``ValueError``); one lacking only some growable
            convs' weights is accepted with a logged warning naming them (their saliency would be stale).
        interval: a step is due every ``interval`` calls of :meth:`step` (paper: 5 epochs).
        until: no growth or cut after this many calls (paper: 100 of 120 epochs); ``None`` = never stop.
        topk: sites grown per step (paper: 1).
        kinds: branch kinds to grow where they apply (default: DyRep's set; ``None``: every kind).
        metric: how candidates are scored: ``"snip"`` (default), ``"synflow"`` (the reference's default),
            ``"grad_norm"``, ``"random"``, or a callable ``(weight, grad) -> tensor``
            (see :mod:`dyrep_fx.saliency`).
        nested: ``"gated"``, ``"open"`` or ``"off"``: when inner kxk convs of grown branches are candidates.
        pointwise: whether 1x1 convs are candidates (the reference: no).
        std_gate, threshold: the Dep criterion (see :class:`dyrep_fx.passes.dep.DepCriterion`).
        calib_loader, calib_batches, forward_fn: dbb-mode BatchNorm calibration data (paper: 20 batches).
        group_chooser: which optimizer group a new Parameter joins (see :mod:`dyrep_fx.optim_sync`).
        seed: seeds branch initialisation per step, so runs and resumes are reproducible.
        targets: qualified names of the submodules to re-parameterize (each traced on its own, e.g.
            ``["backbone", "neck"]`` of a detector); ``None`` = the whole model. Site names are
            then relative to ``model`` (``"backbone.layer1.0.conv1"``).
        mode, init_scale, recompute: passed to :func:`dyrep_fx.transform` when a target is not transformed yet.
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
        kinds: Iterable[str] | None = DYREP_KINDS,
        metric: str | Scorer = DEFAULT_METRIC,
        nested: str = "gated",
        pointwise: bool = False,
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
        if interval < 1:
            raise ValueError("interval must be >= 1")
        if nested not in NESTED_POLICIES:
            raise ValueError(f"nested must be one of {NESTED_POLICIES}, got {nested!r}")
        kinds = None if kinds is None else check_kind_names(kinds)
        self.model = _unwrap(model)
        roots = {prefix: self.model.get_submodule(prefix) if prefix else self.model
                 for prefix in ([""] if targets is None else list(targets))}
        _refuse_foreign_optimizer(optimizer, roots)  # before transforming: a refusal changes nothing
        #: One handle per target, by its qualified name ("" is the whole model).
        self.targets: dict[str, Handle] = {}
        for prefix, root in roots.items():
            if Handle.is_transformed(root):
                self.targets[prefix] = Handle.of(root)
            else:
                inputs = example_inputs.get(prefix) if isinstance(example_inputs, dict) else example_inputs
                self.targets[prefix] = Handle.transform(root, inputs, mode, init_scale=init_scale,
                                                        recompute=recompute)
        modes = {target.mode for target in self.targets.values()}
        if len(modes) != 1:
            raise ValueError(f"targets were transformed in different modes: {sorted(modes)}")
        self.mode = modes.pop()
        self._warn_missing_weights(optimizer)
        self.optimizer = optimizer
        self.interval, self.until, self.topk = interval, until, topk
        self.kinds = kinds
        self.nested, self.pointwise = nested, pointwise
        self.criterion = DepCriterion(std_gate, threshold)
        self.calib_loader, self.calib_batches, self.forward_fn = calib_loader, calib_batches, forward_fn
        self.group_chooser = group_chooser
        self.seed = seed
        self.units = 0
        self.steps_done = 0
        self.history: list[dict[str, Any]] = []
        #: ``{block: {"step": n, "importance": {kind: value}}}`` at growth, for the nesting gate.
        self.births: dict[str, dict[str, Any]] = {}
        self._emas: list[nn.Module] = []
        self.saliency = SaliencyCollector(optimizer, metric, seed=seed)
        self._watch()

    def _warn_missing_weights(self, optimizer: torch.optim.Optimizer) -> None:
        """Warn when the optimizer lacks some growable convs' weights.

        Only a warning: training part of a network with this optimizer is legitimate, but such a conv's
        gradient is never zeroed or applied by it, so its saliency is stale and its new branches would
        train while its own kernel does not.
        """
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [s.name for s in self.sites()
                   if s.eligible and id(self.model.get_submodule(s.name).weight) not in held]
        if missing:
            log.warning("DyRep: the optimizer lacks the weights of %d growable conv(s) %s; they are still "
                        "scored and grown but this optimizer neither trains nor zeroes them: add them to it, "
                        "or freeze them (requires_grad=False) to keep them out of DyRep",
                        len(missing), missing[:5])

    # -- what can grow -------------------------------------------------------------------------
    @staticmethod
    def _join(prefix: str, name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    def _split(self, name: str) -> tuple[str, Handle, str]:
        """``(prefix, target, local name)`` of a site name."""
        for prefix in sorted(self.targets, key=len, reverse=True):
            if not prefix:
                return "", self.targets[""], name
            if name.startswith(prefix + "."):
                return prefix, self.targets[prefix], name[len(prefix) + 1:]
        raise KeyError(f"{name!r} is in none of the targets {list(self.targets)}")

    def sites(self) -> list[Any]:
        """Every site of every target, with names relative to the model."""
        found = []
        for prefix, target in self.targets.items():
            for site in target.sites():
                site.name = self._join(prefix, site.name)
                found.append(site)
        return found

    def candidates(self) -> list[str]:
        """Sites offered for growth now (see the module docstring for the rules).

        As in DyRep, a grown block does not regrow branches it lost (they were cut for a reason); it
        grows further through its inner kxk conv. A block whose branches were all cut is a conv again.
        """
        return [s.name for s in self.sites() if self._growable(s) and self._offered(s)]

    def _growable(self, site) -> bool:
        """Structurally able to grow one of the controller's kinds."""
        return (site.eligible and bool(site.kinds) and not site.grown and
                (self.kinds is None or any(k in site.kinds for k in self.kinds)))

    def _offered(self, site) -> bool:
        """The candidate policy: kernel size and the nesting gate."""
        if not self.pointwise and all(k == 1 for k in site.kernel_size):
            return False
        if site.depth == 0 or self.nested == "open":
            return True
        return self.nested == "gated" and self._parent_branch_grew(site.name)

    def _parent_branch_grew(self, name: str) -> bool:
        """Whether the branch holding inner conv ``name`` gained importance since its block grew.

        Blocks grown outside this controller (no birth record) are not gated.
        """
        parent, _, rest = name.rpartition(".branches.")
        kind = rest.split(".")[0]
        birth = self.births.get(parent)
        if birth is None or kind not in birth["importance"]:
            return True
        now = self.model.get_submodule(parent).importance().get(kind, 0.0)
        return now > birth["importance"][kind]

    def _watch(self, names: list[str] | None = None) -> None:
        """Score ``names`` (default: the current candidates) over the next interval."""
        names = self.candidates() if names is None else names
        self.saliency.watch([(name, self.model.get_submodule(name).weight) for name in names])

    def is_due(self) -> bool:
        """Whether the next :meth:`step` call will change the structure (if anything qualifies)."""
        unit = self.units + 1
        return unit % self.interval == 0 and (self.until is None or unit <= self.until)

    # -- the step --------------------------------------------------------------------------------
    def step(self) -> StepResult:
        """Call once per unit (epoch or N iterations). When due: grow, cut, calibrate, sync.

        Both decisions (what grows, what is cut) are taken first and checked to be the same on every
        rank; if they differ, it raises on every rank before anything changes (the unit count included).
        """
        due = self.is_due()
        result = StepResult(unit=self.units + 1, due=due)
        if not due:
            self.units += 1
            return result
        result.saliency = self.saliency.mean(self.steps_done)
        targets = self._choose(result.saliency)
        cuts = self._plan_cuts(result)
        check_same_on_all_ranks({"grow": targets, "cut": {self._join(prefix, local): kinds
                                                          for prefix, plan in cuts.items()
                                                          for local, kinds in plan.items()}},
                                "the DyRep step decision")
        self.units += 1
        before = {id(p) for p in self.model.parameters()}
        source_weights: dict[str, nn.Parameter] = {}
        grown_blocks: dict[str, RepConv2d] = {}
        new_branches: dict[str, list[nn.Module]] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._step_seed())
            for name in targets:
                source_weights[name] = self.model.get_submodule(name).weight
                _, target, local = self._split(name)
                report = target.grow([local], self._kinds_for(name))
                if report.changed:
                    result.grown[name] = list(report.changed[local])
                    grown_blocks[name] = self.model.get_submodule(name)
                    new_branches[name] = report.details["new_modules"][local]
        for block in grown_blocks.values():
            broadcast_module(block)
        result.calibrated_batches = self._calibrate(grown_blocks, new_branches)
        for name, block in grown_blocks.items():
            self.births[name] = {"step": self.steps_done, "importance": block.importance()}
        self._sync_ema_growth(result.grown)
        for prefix, target in self.targets.items():
            cut_report = target.cut(cuts[prefix])
            for local, what in cut_report.changed.items():
                result.cut[self._join(prefix, local)] = list(what)
        for name in result.cut:
            if not self.model.get_submodule(name).grown:
                self.births.pop(name, None)
        for name in result.cut:
            # A cut folds each rank's own BatchNorm statistics into the kernel: make the ranks agree.
            broadcast_module(self.model.get_submodule(name))
        self._sync_ema_cuts(result.cut)
        self._sync_optimizer(before, source_weights)
        self.steps_done += 1
        self._record(result)
        self._watch()
        return result

    def _plan_cuts(self, result: StepResult) -> dict[str, dict[str, list[str]]]:
        """``{target: {block: kinds}}`` the Dep criterion cuts, chosen before this step's growth.

        Every block's verdict (cuts, importance spread, reason) goes into ``result.verdicts``. Blocks
        grown in this step are not blocks yet, so they are judged next time (their branches start
        with equal scales); growing a block's inner kxk conv leaves the importances of the block's
        branches as they are.
        """
        cuts: dict[str, dict[str, list[str]]] = {}
        for prefix, target in self.targets.items():
            verdicts = target.judge(self.criterion)
            cuts[prefix] = {local: v.cut for local, v in verdicts.items() if v.cut}
            for local, verdict in verdicts.items():
                block = target.module.get_submodule(local)
                result.verdicts[self._join(prefix, local)] = {"importance": block.importance(),
                                                              **verdict.as_dict()}
        return cuts

    def _choose(self, saliency: dict[str, float]) -> list[str]:
        """The ``topk`` highest scores among the watched sites that can still grow (ties: by name)."""
        growable = {s.name for s in self.sites() if self._growable(s)}
        ranked = sorted(((v, n) for n, v in saliency.items() if n in growable), key=lambda t: (-t[0], t[1]))
        return [n for _, n in ranked][: self.topk]

    def _kinds_for(self, name: str) -> list[str] | None:
        if self.kinds is None:
            return None
        available = next(s.kinds for s in self.sites() if s.name == name)
        return [k for k in self.kinds if k in available]

    def _step_seed(self) -> int:
        digest = hashlib.sha256(f"{self.seed}:{self.steps_done}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF

    def _calibrate(self, grown: dict[str, RepConv2d], new_branches: dict[str, list[nn.Module]]) -> int:
        """dbb mode: fit the new branches' BatchNorms on data, then re-balance so the function is unchanged.

        Surviving branches keep their trained statistics.
        """
        if self.mode != "dbb" or not grown or self.calib_loader is None:
            return 0
        targets = {name: tuple(t.detach().clone() if t is not None else None for t in block.equivalent())
                   for name, block in grown.items()}
        bns = [m for branches in new_branches.values() for b in branches for m in b.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        used = calibrate_batchnorms(self.model, bns, self.calib_loader, self.calib_batches, self.forward_fn)
        for name, block in grown.items():
            block.rebalance(*targets[name])
        return used

    def _sync_optimizer(self, before: set[int], source_weights: dict[str, nn.Parameter]) -> None:
        new = []
        for name, p in self.model.named_parameters():
            if id(p) in before:
                continue
            site = max((s for s in source_weights if name.startswith(s + ".")), key=len, default=None)
            new.append((name, p, source_weights.get(site) if site else None))
        sync_optimizer(self.optimizer, self.model, new, self.group_chooser)

    def _record(self, result: StepResult) -> None:
        counts = {name: len(b.kinds) for name, b in find_blocks(self.model).items()}
        ranked = sorted(result.saliency.items(), key=lambda t: (-t[1], t[0]))[:TOP_SCORES]
        event = {"unit": result.unit, "step": self.steps_done, "grown": result.grown, "cut": result.cut,
                 "branches": counts, "scores": [[name, value] for name, value in ranked],
                 "candidates": len(result.saliency), "verdicts": result.verdicts}
        self.history.append(event)
        log.info("DyRep step %d (unit %d): %s; %s; top %s scores: %s", self.steps_done, result.unit,
                 _describe_changes(result.grown, "grew") or "grew nothing",
                 _describe_changes(result.cut, "cut") or "cut nothing", metric_name(self.saliency.metric),
                 ", ".join(f"{n} {v:.4g}" for n, v in ranked) or "no candidates")
        for name, verdict in result.verdicts.items():
            importance = ", ".join(f"{k} {v:.3g}" for k, v in verdict["importance"].items())
            log.info("DyRep step %d: block %s importance {%s}, std %.3g: %s%s", self.steps_done, name,
                     importance, verdict["std"], "cut " if verdict["cut"] else "kept: ", verdict["reason"])

    # -- EMA -------------------------------------------------------------------------------------
    def attach_ema(self, ema_module: nn.Module) -> None:
        """Keep ``ema_module`` (e.g. ``AveragedModel(model).module``) in step with every change.

        New branches in the EMA copy start from the live model's values; its main kernels are
        re-balanced so the EMA function is unchanged; cuts absorb the EMA's own averaged values.
        """
        ema_module = _unwrap(ema_module)
        structures = {prefix: target.structure() for prefix, target in self.targets.items()}
        for prefix, twin in self._ema_targets(ema_module).items():
            twin.check_structure(structures[prefix])
        self._restore_on(ema_module, structures)
        self._emas.append(ema_module)

    def _ema_targets(self, ema: nn.Module) -> dict[str, Handle]:
        """The handles of ``ema``'s targets, sharing the live targets' traces (same architecture)."""
        return {prefix: target.share_with(ema.get_submodule(prefix) if prefix else ema)
                for prefix, target in self.targets.items()}

    def _ema_target(self, ema: nn.Module, name: str) -> tuple[Handle, str]:
        prefix, _, local = self._split(name)
        return self._ema_targets(ema)[prefix], local

    @torch.no_grad()
    def _sync_ema_growth(self, grown: dict[str, list[str]]) -> None:
        """Grow the same kinds in every EMA copy, starting from the live values; EMA function kept."""
        for ema in self._emas:
            for name, kinds in grown.items():
                live = self.model.get_submodule(name)
                twin, local = self._ema_target(ema, name)
                old = ema.get_submodule(name)
                before = old.equivalent() if isinstance(old, RepConv2d) else (old.weight, old.bias)
                before = tuple(None if t is None else t.detach().clone() for t in before)
                # EMA copies are often frozen (mmengine's): grow them without the eligibility check.
                twin.grow_entry(local, {"kinds": kinds})
                block = ema.get_submodule(name)
                block.requires_grad_(old.weight.requires_grad)
                for kind in kinds:
                    dst, src = block.branches[kind].state_dict(), live.branches[kind].state_dict()
                    for key in dst:
                        dst[key].copy_(src[key])
                block.rebalance(*before)

    @torch.no_grad()
    def _sync_ema_cuts(self, cut: dict[str, list[str]]) -> None:
        """Cut the same branches in every EMA copy, absorbing the EMA's own averaged values."""
        for ema in self._emas:
            for name in sorted(cut, key=lambda n: -n.count(".")):
                twin, local = self._ema_target(ema, name)
                twin.cut({local: cut[name]})
                broadcast_module(ema.get_submodule(name))

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data: the structure, counters, history, interval saliency and optimizer layout."""
        return {
            "structures": {prefix: target.structure() for prefix, target in self.targets.items()},
            "units": self.units,
            "steps_done": self.steps_done,
            "history": self.history,
            "births": self.births,
            "saliency": self.saliency.state_dict(),
            "optimizer_layout": layout(self.optimizer, self.model),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the saved structure on this (fresh) model and restore counters and optimizer layout.

        Load the model's and optimizer's own state dicts after this call. A state that does not fit
        (other targets, mode, sites, branch kinds, optimizer parameters or watched sites) raises a
        ``ValueError`` naming what differs, and leaves the model, its EMA copies and the optimizer as
        they were.
        """
        structures = state["structures"]
        self._check_structures(structures)
        undo = [self._restore_on(self.model, structures)]
        groups = [(group, list(group["params"])) for group in self.optimizer.param_groups]
        births = self.births
        try:
            apply_layout(self.optimizer, self.model, state["optimizer_layout"])
            self._restore_on_emas(structures, undo)
            self.births = dict(state.get("births", {}))
            # The watched set as saved: the nesting gate reads branch values not loaded yet.
            growable = {s.name for s in self.sites() if self._growable(s)}
            self._watch([n for n in state["saliency"]["names"] if n in growable])
            self.saliency.load_state_dict(state["saliency"])
        except Exception:
            self._undo(groups, undo)
            self.births = births
            self._watch()
            raise
        self.units = state["units"]
        self.steps_done = state["steps_done"]
        self.history = list(state["history"])

    def load_structure(self, state: dict[str, Any]) -> None:
        """Rebuild the structure of a saved :meth:`state_dict` and start the schedule over (fine-tuning
        from a grown checkpoint, where :meth:`load_state_dict` is for resuming).

        The blocks are rebuilt on this (fresh) model and its EMA copies, so the checkpoint's grown weights
        load afterwards. What belonged to the run that saved the state is dropped: ``units`` and
        ``steps_done`` are 0 (the first step is due after ``interval`` units again), ``history`` and the
        nesting gate's birth records are empty (the loaded blocks count as grown outside this controller),
        and the interval saliency starts empty over the current candidates. The saved optimizer layout is
        ignored: the new Parameters join this optimizer's groups as grown ones do (``group_chooser``), so
        do not load the saved optimizer state after this call. A state that does not fit (other targets,
        mode, sites or branch kinds) raises a ``ValueError`` and changes nothing.
        """
        structures = state["structures"]
        self._check_structures(structures)
        sources = {self._join(prefix, name): self.model.get_submodule(self._join(prefix, name)).weight
                   for prefix, spec in structures.items() for name in spec["sites"]}
        before = {id(p) for p in self.model.parameters()}
        undo = [self._restore_on(self.model, structures)]
        groups = [(group, list(group["params"])) for group in self.optimizer.param_groups]
        try:
            self._restore_on_emas(structures, undo)
            self._sync_optimizer(before, sources)
        except Exception:
            self._undo(groups, undo)
            raise
        self.units = self.steps_done = 0
        self.history, self.births = [], {}
        self._watch()

    def _restore_on_emas(self, structures: dict[str, dict[str, Any]], undo: list[Transaction]) -> None:
        """Rebuild ``structures`` on every attached EMA copy too, each recorded in ``undo``."""
        for ema in self._emas:
            undo.append(self._restore_on(ema, structures))  # (it shares the live traces with the copy)

    def _undo(self, groups: list[tuple[dict, list]], undo: list[Transaction]) -> None:
        """Put the optimizer's groups and every restored model back as they were."""
        del self.optimizer.param_groups[len(groups):]
        for group, params in groups:
            group["params"] = params
        for txn in reversed(undo):
            txn.rollback()

    def _check_structures(self, structures: dict[str, dict[str, Any]]) -> None:
        """Everything :func:`dyrep_fx.restore` would refuse, for every target, before any target changes."""
        saved, here = set(structures), set(self.targets)
        if saved != here:
            raise ValueError(f"checkpoint structure is for targets {sorted(saved)}, this controller has "
                             f"{sorted(here)} (only in the checkpoint: {sorted(saved - here)}, only here: "
                             f"{sorted(here - saved)})")
        for prefix, target in self.targets.items():
            spec, where = structures[prefix], f"target {prefix or 'model'!r}"
            if target.blocks() and target.structure()["sites"] != spec["sites"]:
                raise ValueError(f"{where} already has a different grown structure; "
                                 "load into a freshly built model")
            if spec.get("format") != structure_spec.FORMAT or spec.get("mode") != self.mode:
                raise ValueError(f"checkpoint structure of {where} is a {spec.get('format')!r} in "
                                 f"{spec.get('mode')!r} mode; this controller takes "
                                 f"{structure_spec.FORMAT!r} in {self.mode!r} mode")
            try:
                target.check_structure(spec)
            except PassError as exc:
                raise PassError(f"checkpoint structure of {where}: {exc}") from exc

    def _restore_on(self, model: nn.Module, structures: dict[str, dict[str, Any]]) -> Transaction:
        """Grow the checked ``structures`` on each (transformed) target of ``model``, the live model or
        an EMA copy; the returned transaction puts every replaced conv back (all targets, or none)."""
        txn = Transaction(model)
        handles = self.targets if model is self.model else self._ema_targets(model)
        try:
            for prefix, spec in structures.items():
                handles[prefix].apply_structure(spec, txn, prefix)
        except Exception:
            txn.rollback()
            raise
        return txn

    def close(self) -> None:
        """Remove the optimizer hook."""
        self.saliency.remove()
