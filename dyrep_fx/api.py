"""The public entry points: thin wrappers that run the passes on a model's stored trace.

``transform`` traces and analyses the model and keeps the facts on it (plain data, under the
attribute ``_dyrep_fx``); the other functions run one pass each on the user's own model object.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import passes
from .block import MODES, RepConv2d, find_blocks
from .defaults import INIT_SCALE
from .geometry import ConvGeometry
from .passes.analysis import Site
from .passes.base import PassError, PassReport, get_module
from .tracing import TracedModel, TraceFailure, trace_model

__all__ = ["transform", "sites", "grow", "cut", "fold", "structure", "restore", "blocks", "DyRepState",
           "STRUCTURE_FORMAT", "STATE_ATTR", "state_of", "is_transformed", "restore_block", "check_restorable",
           "apply_structure"]

log = logging.getLogger(__name__)

STRUCTURE_FORMAT = "dyrep_fx.structure/1"
#: The attribute (in the module's ``__dict__``, outside its state_dict) holding :class:`DyRepState`.
STATE_ATTR = "_dyrep_fx"


@dataclass
class DyRepState:
    """What :func:`transform` keeps on a model: the trace facts and the block settings."""

    traced: TracedModel
    mode: str
    init_scale: float


def is_transformed(model: nn.Module) -> bool:
    """Whether :func:`transform` has prepared ``model`` (its state is kept on it)."""
    return STATE_ATTR in model.__dict__


def state_of(model: nn.Module) -> DyRepState:
    """What :func:`transform` kept on ``model``; a clear error if it was not transformed."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        raise PassError(f"{type(model).__name__} has not been transformed; call dyrep_fx.transform(model) first")
    return state


def transform(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    mode: str = "online",
    *,
    init_scale: float = INIT_SCALE,
    leaf_modules: Iterable[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
) -> nn.Module:
    """Trace ``model`` with torch.fx, find its conv sites and prepare it for growth, in place.

    Args:
        model: any nn.Module; it keeps its class, methods, hooks and parameter names.
        example_inputs: optional positional inputs; adds shapes and run-time call counts to the sites,
            and lets tuple arguments (e.g. an FPN's list of feature maps) trace.
        mode: ``"online"`` (OREPA-style, one conv per site) or ``"dbb"`` (branches with BatchNorms).
        init_scale: initial scale of new branches (DyRep: 0.01).
        leaf_modules: extra module classes torch.fx should not trace into.
        concrete_args: passed to torch.fx (e.g. to fix a mode flag argument).

    Returns the same model. Nothing is replaced until :func:`grow`; on error the model is unchanged.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    old = model.__dict__.get(STATE_ATTR)
    if old is not None and old.mode != mode:
        raise PassError(f"model was transformed in {old.mode!r} mode; fold it before using {mode!r}")
    inputs = tuple(example_inputs) if example_inputs is not None else None
    traced = trace_model(model, inputs, leaf_modules, concrete_args)
    model.__dict__[STATE_ATTR] = DyRepState(traced=traced, mode=mode, init_scale=init_scale)
    found = sites(model)
    log.info("transform %s: %d conv sites, %d eligible, %d untraceable submodules", type(model).__name__,
             len(found), sum(s.eligible for s in found), len(traced.untraceable))
    return model


def sites(model: nn.Module) -> list[Site]:
    """Every conv site of a transformed model: name, geometry, calls, shapes, eligible or why not."""
    state = state_of(model)
    return passes.analysis.analyse(state.traced, model, state.mode)


def blocks(model: nn.Module) -> dict[str, RepConv2d]:
    """Every re-parameterization block in ``model`` by qualified name (nested ones included)."""
    return find_blocks(model)


def grow(model: nn.Module, names: Iterable[str] | None = None, kinds: Iterable[str] | None = None) -> PassReport:
    """Grow branches at ``names`` (default: every eligible site) of ``kinds`` (default: all that apply).

    The model's function is kept (exactly in online mode; in eval mode in dbb mode). All or nothing.
    """
    state = state_of(model)
    report = passes.rep.run(state.traced, model, names=names, kinds=kinds, mode=state.mode,
                            init_scale=state.init_scale)
    for name in report.changed:
        log.info("grow %s: %s", name, report.describe(name))
    return report


def cut(model: nn.Module, name: str, kinds: Iterable[str]) -> PassReport:
    """Remove ``kinds`` branches of the block at ``name``, absorbing them exactly into its main kernel."""
    state = state_of(model)
    report = passes.dep.run(state.traced, model, cuts={name: list(kinds)})
    for site in report.changed:
        log.info("cut %s: %s", site, report.describe(site))
    return report


def fold(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model with every block folded into one conv: the original architecture and state_dict keys.

    Its ``state_dict()`` loads with ``strict=True`` into a fresh instance of the user's model class,
    which then computes what the grown model computes in eval mode. ``inplace=False`` (default)
    leaves ``model`` as it is and returns a folded deep copy.
    """
    state = state_of(model)
    target = model if inplace else copy.deepcopy(model)
    report = passes.fold.run(state.traced, target)
    target.__dict__.pop(STATE_ATTR, None)
    log.info("fold %s: %d blocks folded", type(model).__name__, len(report.changed))
    return target


def structure(model: nn.Module) -> dict[str, Any]:
    """A JSON-serialisable description of every block of ``model`` (what :func:`restore` rebuilds)."""
    state = state_of(model)
    spec_sites: dict[str, Any] = {}
    for name, block in find_blocks(model, outermost=True).items():  # nested ones: in their outer block
        entry = block.structure()
        entry["bias"] = block.bias is not None
        spec_sites[name] = entry
    return {"format": STRUCTURE_FORMAT, "mode": state.mode, "init_scale": state.init_scale, "sites": spec_sites}


def restore_block(model: nn.Module, name: str, spec: dict[str, Any], mode: str, init_scale: float) -> None:
    """Grow the block described by ``spec`` (kinds, bias, nested blocks) at ``name``, without the
    eligibility check (e.g. on a frozen EMA copy); branch values are fresh until a state_dict loads."""
    module = get_module(model, name)
    if not isinstance(module, RepConv2d):
        if not isinstance(module, nn.Conv2d):
            raise PassError(f"structure names {name!r}, which is a {type(module).__name__}, not a Conv2d")
        module = RepConv2d(module, mode=mode, init_scale=init_scale)
        passes.base.set_module(model, name, module)
    if spec.get("kinds"):
        module.grow([k for k in spec["kinds"] if k not in module.branches])
    if spec.get("bias") and module.bias is None:
        module.ensure_bias()
    for rel, inner in spec.get("nested", {}).items():
        restore_block(module, rel, inner, mode, init_scale)


def check_restorable(model: nn.Module, name: str, entry: dict[str, Any]) -> None:
    """The site exists, is a 2-D conv, and every kind (nested ones too) applies to its geometry.

    Eligibility is not re-checked: it was when the structure grew (a fresh model may not trace as
    fully without example inputs, e.g. an FPN neck, yet its convs take the structure all the same).
    """
    try:
        module = get_module(model, name)
    except PassError as exc:
        raise PassError(f"structure names site {name!r}, which this model does not have") from exc
    if not isinstance(module, (nn.Conv2d, RepConv2d)):
        raise PassError(f"structure names {name!r}, which is a {type(module).__name__}, not a Conv2d")
    why = None if isinstance(module, RepConv2d) else RepConv2d.why_not_wrap(module)
    if why is not None:
        raise PassError(f"structure grows {name!r}, which cannot take a block: {why}")
    geometry = module.geometry if isinstance(module, RepConv2d) else ConvGeometry.from_conv(module)
    bad = [k for k in entry.get("kinds", []) if k not in geometry.kinds()]
    if bad:
        raise PassError(f"structure grows {bad} at {name!r}, which does not take them "
                        f"(it takes {geometry.kinds()})")
    for rel, inner in entry.get("nested", {}).items():
        if rel != "branches.1x1_kxk.conv2" or "1x1_kxk" not in entry.get("kinds", []):
            raise PassError(f"structure nests {rel!r} under {name!r}, which has no such inner conv")
        inner_geometry = ConvGeometry.from_conv(nn.Conv2d(
            geometry.in_channels, geometry.out_channels, geometry.kernel_size, geometry.stride, 0,
            geometry.dilation, geometry.groups, bias=False, device="meta"))
        bad = [k for k in inner.get("kinds", []) if k not in inner_geometry.kinds()]
        if bad:
            raise PassError(f"structure grows {bad} at {name}.{rel}, which does not take them")


def restore(model: nn.Module, spec: dict[str, Any], example_inputs: Sequence[Any] | None = None) -> nn.Module:
    """Rebuild the structure ``spec`` (from :func:`structure`) on a freshly built model, in place.

    Afterwards the grown model's ``state_dict`` loads into it. Transforms the model first if needed.
    The spec is checked against the model before anything changes.
    """
    if spec.get("format") != STRUCTURE_FORMAT:
        raise PassError(f"not a dyrep_fx structure (format {spec.get('format')!r}, expected {STRUCTURE_FORMAT!r})")
    if STATE_ATTR not in model.__dict__:
        try:
            transform(model, example_inputs, mode=spec["mode"], init_scale=spec.get("init_scale", INIT_SCALE))
        except TraceFailure as exc:
            # Restoring only needs the convs at the named paths; growth eligibility was checked when the
            # structure grew. Keep an empty trace (nothing else grows without example inputs).
            log.warning("restore: %s; restoring the structure without a trace", exc)
            model.__dict__[STATE_ATTR] = DyRepState(
                traced=TracedModel(convs={}, untraceable={"": str(exc)}, root_traced=False,
                                   graph_differs_in_eval=False),
                mode=spec["mode"], init_scale=spec.get("init_scale", INIT_SCALE))
    state = state_of(model)
    if state.mode != spec["mode"]:
        raise PassError(f"structure is for {spec['mode']!r} mode but the model is in {state.mode!r} mode")
    for name, entry in spec["sites"].items():
        check_restorable(model, name, entry)
    txn = passes.base.Transaction(model)
    try:
        apply_structure(model, spec, txn)
    except Exception:
        txn.rollback()
        raise
    return model


def apply_structure(model: nn.Module, spec: dict[str, Any], txn: passes.base.Transaction, prefix: str = "") -> None:
    """Grow the checked ``spec`` on the transformed ``model``, recording every change in ``txn``.

    ``txn`` may belong to a larger model of which ``model`` is the submodule ``prefix``, so that one
    rollback undoes several targets.
    """
    state = state_of(model)
    # Branch values are about to be overwritten by a state_dict: don't consume the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        for name, entry in spec["sites"].items():
            original = get_module(model, name)
            txn.save(original)
            restore_block(model, name, entry, state.mode, state.init_scale)
            if get_module(model, name) is not original:
                txn.record_replacement(f"{prefix}.{name}" if prefix else name, original)
