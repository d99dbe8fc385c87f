"""The public entry points: thin wrappers that run one pass each on the user's own model object.

``transform`` traces and analyses the model and keeps the facts on it (plain data, see
:class:`~dyrep_fx.handle.Handle`); every other function goes through the model's handle.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from . import passes, structure_spec
from .block import RepConv2d, find_blocks
from .defaults import INIT_SCALE
from .handle import STATE_ATTR, DyRepState, Handle
from .passes.analysis import Site
from .passes.base import PassReport
from .tracing import TraceFailure, trace_model

__all__ = ["transform", "sites", "grow", "cut", "fold", "structure", "restore", "blocks", "fuse_bn",
           "DyRepState", "STRUCTURE_FORMAT", "STATE_ATTR", "state_of", "is_transformed"]

log = logging.getLogger(__name__)

STRUCTURE_FORMAT = structure_spec.FORMAT


def is_transformed(model: nn.Module) -> bool:
    """Whether :func:`transform` has prepared ``model`` (its state is kept on it)."""
    return Handle.is_transformed(model)


def state_of(model: nn.Module) -> DyRepState:
    """What :func:`transform` kept on ``model``; a clear error if it was not transformed."""
    return Handle.of(model).state


def transform(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    mode: str = "online",
    *,
    init_scale: float = INIT_SCALE,
    leaf_modules: Iterable[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    recompute: bool = False,
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
        recompute: dbb mode: blocks run their branches' 1x1 stages again in backward instead of keeping
            their output maps (ResNet-18: ~30 % less activation memory for up to ~7 % more step time).

    Returns the same model. Nothing is replaced until :func:`grow`; on error the model is unchanged.
    """
    handle = Handle.transform(model, example_inputs, mode, init_scale=init_scale, leaf_modules=leaf_modules,
                              concrete_args=concrete_args, recompute=recompute)
    found = handle.sites()
    log.info("transform %s: %d conv sites, %d eligible, %d untraceable submodules", type(model).__name__,
             len(found), sum(s.eligible for s in found), len(handle.traced.untraceable))
    return model


def sites(model: nn.Module) -> list[Site]:
    """Every conv site of a transformed model: name, geometry, calls, shapes, eligible or why not."""
    return Handle.of(model).sites()


def blocks(model: nn.Module) -> dict[str, RepConv2d]:
    """Every re-parameterization block in ``model`` by qualified name (nested ones included)."""
    return find_blocks(model)


def grow(model: nn.Module, names: Iterable[str] | None = None, kinds: Iterable[str] | None = None) -> PassReport:
    """Grow branches at ``names`` (default: every eligible site) of ``kinds`` (default: all that apply).

    The model's function is kept (exactly in online mode; in eval mode in dbb mode). All or nothing.
    """
    return Handle.of(model).grow(names, kinds)


def cut(model: nn.Module, name: str, kinds: Iterable[str]) -> PassReport:
    """Remove ``kinds`` branches of the block at ``name``, absorbing them exactly into its main kernel."""
    return Handle.of(model).cut({name: list(kinds)})


def fold(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model with every block folded into one conv: the original architecture and state_dict keys.

    Its ``state_dict()`` loads with ``strict=True`` into a fresh instance of the user's model class,
    which then computes what the grown model computes in eval mode. ``inplace=False`` (default)
    leaves ``model`` as it is and returns a folded deep copy.
    """
    return Handle.of(model).fold(inplace)


def structure(model: nn.Module) -> dict[str, Any]:
    """A JSON-serialisable description of every block of ``model`` (what :func:`restore` rebuilds)."""
    return Handle.of(model).structure()


def restore(model: nn.Module, spec: dict[str, Any], example_inputs: Sequence[Any] | None = None) -> nn.Module:
    """Rebuild the structure ``spec`` (from :func:`structure`) on a freshly built model, in place.

    Afterwards the grown model's ``state_dict`` loads into it. Transforms the model first if needed.
    The spec is checked against the model before anything changes.
    """
    structure_spec.check_format(spec)
    if not is_transformed(model):
        try:
            transform(model, example_inputs, mode=spec["mode"], init_scale=spec.get("init_scale", INIT_SCALE))
        except TraceFailure as exc:
            # Restoring only needs the convs at the named paths; growth eligibility was checked when the
            # structure grew. Keep an empty trace (nothing else grows without example inputs).
            log.warning("restore: %s; restoring the structure without a trace", exc)
            Handle.without_trace(model, spec["mode"], spec.get("init_scale", INIT_SCALE), str(exc))
    target = Handle.of(model)
    target.check_structure(spec)
    target.restore(spec)  # all or nothing
    return model


def fuse_bn(model: nn.Module) -> PassReport:
    """Fuse every conv followed only by a BatchNorm into one conv with bias, in place (inference only).

    Runs on a folded model (``fold(model)``; a model with blocks is refused), traced afresh (a
    transformed model that never grew: with its stored trace). The result's state_dict no longer matches the original
    architecture (BatchNorms become ``Identity``).
    """
    if is_transformed(model):
        return Handle.of(model).fuse_bn()
    return passes.fuse_bn.run(trace_model(model), model)
