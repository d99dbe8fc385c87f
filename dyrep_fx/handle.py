"""The handle on one transformed model (or target submodule): its trace, mode and initial scale, and
every pass on it.

:func:`dyrep_fx.transform` keeps a :class:`DyRepState` (plain data) in the model's ``__dict__`` under
:data:`STATE_ATTR`, outside its state_dict; :class:`Handle` pairs the model with that state and runs the
passes with it. The functional API (:mod:`dyrep_fx.api`), the controller and the mm hook all go
through a handle, so the state has one reader and one writer.

    handle = Handle.transform(model, mode="online")   # or Handle.of(model) once transformed
    handle.grow(["layer1.0.conv1"])
    handle.cut({"layer1.0.conv1": ["avg"]})
    deploy = handle.fold()
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import forward_scope, passes, structure_spec
from .block import MODES, RepConv2d, find_blocks
from .defaults import INIT_SCALE
from .passes.analysis import Site
from .passes.base import PassError, PassReport, Transaction, transaction_for
from .passes.dep import CutCriterion, DepCriterion
from .tracing import TracedModel, trace_model

__all__ = ["Handle", "DyRepState", "STATE_ATTR"]

log = logging.getLogger(__name__)

#: The attribute (in the module's ``__dict__``, outside its state_dict) holding :class:`DyRepState`.
STATE_ATTR = "_dyrep_fx"


@dataclass
class DyRepState:
    """What :func:`dyrep_fx.transform` keeps on a model: the trace facts and the block settings."""

    traced: TracedModel
    mode: str
    init_scale: float
    recompute: bool = False


class Handle:
    """One transformed module and its :class:`DyRepState`; each method runs one pass or spec step."""

    def __init__(self, module: nn.Module, state: DyRepState) -> None:
        self.module = module
        self.state = state

    # -- making one ----------------------------------------------------------------------------
    @staticmethod
    def is_transformed(module: nn.Module) -> bool:
        """Whether ``module`` carries a state (it was transformed and not folded since)."""
        return STATE_ATTR in module.__dict__

    @classmethod
    def of(cls, module: nn.Module) -> Handle:
        """The handle of a transformed ``module``; a clear error if it was not transformed."""
        state = module.__dict__.get(STATE_ATTR)
        if state is None:
            raise PassError(f"{type(module).__name__} has not been transformed; call dyrep_fx.transform(model) first")
        return cls(module, state)

    @classmethod
    def transform(
        cls,
        module: nn.Module,
        example_inputs: Sequence[Any] | None = None,
        mode: str = "online",
        *,
        init_scale: float = INIT_SCALE,
        leaf_modules: Iterable[type[nn.Module]] = (),
        concrete_args: dict[str, Any] | None = None,
        recompute: bool = False,
    ) -> Handle:
        """Trace ``module`` and keep the state on it (see :func:`dyrep_fx.transform`); on error nothing changes."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        old = module.__dict__.get(STATE_ATTR)
        if old is not None and old.mode != mode:
            raise PassError(f"model was transformed in {old.mode!r} mode; fold it before using {mode!r}")
        inputs = tuple(example_inputs) if example_inputs is not None else None
        traced = trace_model(module, inputs, leaf_modules, concrete_args)
        return cls.attach(module, DyRepState(traced=traced, mode=mode, init_scale=init_scale, recompute=recompute))

    @classmethod
    def without_trace(cls, module: nn.Module, mode: str, init_scale: float, why: str) -> Handle:
        """A state with an empty trace, for restoring a structure on a model that does not trace
        (the spec names its convs; nothing else can grow)."""
        traced = TracedModel(convs={}, untraceable={"": why}, root_traced=False, graph_differs_in_eval=False)
        return cls.attach(module, DyRepState(traced=traced, mode=mode, init_scale=init_scale))

    @classmethod
    def attach(cls, module: nn.Module, state: DyRepState) -> Handle:
        """Keep ``state`` on ``module`` and return the handle; each forward call of ``module`` is then the
        span its online blocks may reuse an assembled kernel in (:mod:`dyrep_fx.forward_scope`)."""
        module.__dict__[STATE_ATTR] = state
        forward_scope.install(module)
        return cls(module, state)

    def share_with(self, twin: nn.Module) -> Handle:
        """The handle of ``twin``, a module of the same architecture (e.g. an EMA copy), transformed with
        a copy of this state instead of a second trace (kept if ``twin`` was already transformed)."""
        if self.is_transformed(twin):
            return self.of(twin)
        return self.attach(twin, copy.deepcopy(self.state))

    # -- settings --------------------------------------------------------------------------------
    @property
    def traced(self) -> TracedModel:
        """The torch.fx facts of the module as it was transformed."""
        return self.state.traced

    @property
    def mode(self) -> str:
        """``"online"`` or ``"dbb"``."""
        return self.state.mode

    @property
    def init_scale(self) -> float:
        """The initial share of a new branch."""
        return self.state.init_scale

    @property
    def recompute(self) -> bool:
        """Whether new dbb-mode blocks run their 1x1 stages again in backward (see ``RepConv2d.recompute``)."""
        return self.state.recompute

    # -- analysis ----------------------------------------------------------------------------------
    def sites(self) -> list[Site]:
        """Every conv site: name, geometry, calls, shapes, eligible or why not."""
        return passes.analysis.analyse(self.traced, self.module, self.mode)

    def blocks(self) -> dict[str, RepConv2d]:
        """Every block by qualified name (nested ones included)."""
        return find_blocks(self.module)

    def judge(self, criterion: CutCriterion, protect: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
        """``criterion``'s verdict on every block except those in ``protect``, with the importances it
        judged, as plain data (:func:`dyrep_fx.passes.dep.judge_blocks`)."""
        return passes.dep.judge_blocks(self.module, criterion, protect)

    # -- rewrites ------------------------------------------------------------------------------------
    def grow(self, names: Iterable[str] | None = None, kinds: Iterable[str] | None = None,
             txn: Transaction | None = None, prefix: str = "", sites: Sequence[Site] | None = None) -> PassReport:
        """Grow ``kinds`` at ``names`` (see :func:`dyrep_fx.grow`); all or nothing, in ``txn`` when given
        (a transaction over this module, or over a parent model of which it is the submodule ``prefix``),
        checked against ``sites`` (this module's analysis as it is now) when given."""
        report = passes.rep.run(self.traced, self.module, names=names, kinds=kinds, mode=self.mode,
                                init_scale=self.init_scale, recompute=self.recompute, txn=txn, prefix=prefix,
                                sites=sites)
        for name in report.changed:
            log.info("grow %s: %s", name, report.describe(name))
        return report

    def cut(self, cuts: Mapping[str, Sequence[str]] | None = None, criterion: CutCriterion | None = None,
            txn: Transaction | None = None) -> PassReport:
        """Cut ``{block: kinds}``, or what ``criterion`` selects when ``cuts`` is None; exact in eval mode;
        all or nothing, in ``txn`` when given (over this module or a parent model)."""
        report = passes.dep.run(self.traced, self.module, cuts=cuts, criterion=criterion or DepCriterion(),
                                txn=txn)
        for name in report.changed:
            log.info("cut %s: %s", name, report.describe(name))
        return report

    def fold(self, inplace: bool = False) -> nn.Module:
        """The module with every block folded into one conv, without the state (see :func:`dyrep_fx.fold`)."""
        target = self.module if inplace else copy.deepcopy(self.module)
        report = passes.fold.run(self.traced, target)
        target.__dict__.pop(STATE_ATTR, None)
        forward_scope.uninstall(target)
        log.info("fold %s: %d blocks folded", type(self.module).__name__, len(report.changed))
        return target

    def fuse_bn(self) -> PassReport:
        """Fuse conv + BatchNorm pairs of the folded-in-place module (see ``passes.fuse_bn``)."""
        return passes.fuse_bn.run(self.traced, self.module)

    # -- structure specs --------------------------------------------------------------------------
    def structure(self) -> dict[str, Any]:
        """The spec of every block (see :mod:`dyrep_fx.structure_spec`)."""
        return structure_spec.describe(self.module, self.mode, self.init_scale)

    def check_structure(self, spec: dict[str, Any]) -> None:
        """Raise :class:`PassError` naming what this module cannot take from ``spec``; changes nothing."""
        structure_spec.check(self.module, spec, self.mode)

    def restore(self, spec: dict[str, Any], txn: Transaction | None = None, prefix: str = "") -> None:
        """Rebuild the checked ``spec`` (branch values fresh until a state_dict loads).

        The changes are recorded in ``txn``, which may be a parent model's (this module being its submodule
        ``prefix``) so that one rollback undoes several targets; without one, all or nothing on its own.
        """
        with transaction_for(self.module, txn) as active:
            structure_spec.restore(self.module, spec, active, self.init_scale, prefix, self.recompute)

    def grow_block(self, name: str, kinds: Sequence[str], txn: Transaction | None = None,
                   prefix: str = "") -> list[nn.Module]:
        """Grow ``kinds`` at ``name`` without the rep pass's eligibility check (e.g. on a frozen EMA copy whose
        live twin was checked), through the one grow path (:func:`dyrep_fx.passes.rep.grow_site`), recorded
        in ``txn`` (over this module or a parent model of which it is the submodule ``prefix``); the new
        branches, with fresh values."""
        return passes.rep.grow_site(self.module, name, kinds, mode=self.mode, init_scale=self.init_scale,
                                    recompute=self.recompute, txn=txn, prefix=prefix)

    def restore_block(self, name: str, entry: dict[str, Any]) -> None:
        """Rebuild the block a spec entry describes at ``name`` without the eligibility check (e.g. on a
        frozen EMA copy); branch values are fresh."""
        structure_spec.restore_block(self.module, name, entry, self.mode, self.init_scale, self.recompute)
