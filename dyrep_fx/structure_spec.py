"""Structure specs: the grown structure of a model as plain JSON data, checked and rebuilt on a fresh one.

A spec is ``{"format", "mode", "init_scale", "sites": {name: entry}}``, one entry per outermost block:
``{"kinds": [...], "bias": bool, "nested": {inner path: entry}}``. :func:`describe` writes it,
:func:`check` refuses anything a model cannot take (before any change), :func:`restore` rebuilds it
with fresh branch values, ready for the grown model's ``state_dict`` (:func:`restore_block` rebuilds one
entry). Nothing here needs a trace: the spec
names the convs, and eligibility was checked when the structure grew.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .block import RepConv2d, find_blocks
from .geometry import ConvGeometry
from .kinds import applicable_kinds, registry
from .passes.base import PassError, Transaction, get_module
from .passes.rep import grow_site

__all__ = ["FORMAT", "describe", "check", "check_format", "check_entry", "restore", "restore_block"]

FORMAT = "dyrep_fx.structure/1"


def describe(model: nn.Module, mode: str, init_scale: float) -> dict[str, Any]:
    """The spec of every block of ``model`` (nested blocks inside their outer block's entry)."""
    sites: dict[str, Any] = {}
    for name, block in find_blocks(model, outermost=True).items():
        entry = block.structure()
        entry["bias"] = block.main_bias is not None
        sites[name] = entry
    return {"format": FORMAT, "mode": mode, "init_scale": init_scale, "sites": sites}


def check(model: nn.Module, spec: dict[str, Any], mode: str) -> None:
    """Raise :class:`PassError` naming what ``model`` (in ``mode``) cannot take from ``spec``."""
    check_format(spec)
    if spec.get("mode") != mode:
        raise PassError(f"structure is for {spec.get('mode')!r} mode but the model is in {mode!r} mode")
    for name, entry in spec["sites"].items():
        check_entry(model, name, entry)


def check_format(spec: dict[str, Any]) -> None:
    """Raise :class:`PassError` unless ``spec`` is a structure spec of this library's format."""
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise PassError(f"not a dyrep_fx structure (format {found!r}, expected {FORMAT!r})")


def check_entry(model: nn.Module, name: str, entry: dict[str, Any]) -> None:
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
    _check_kinds(entry, geometry, name)
    nestable = _inner_geometries(entry, geometry)
    for rel, inner in entry.get("nested", {}).items():
        if rel not in nestable:
            raise PassError(f"structure nests {rel!r} under {name!r}, which has no such inner conv")
        _check_kinds(inner, nestable[rel], f"{name}.{rel}")


def _check_kinds(entry: dict[str, Any], geometry: ConvGeometry, where: str) -> None:
    bad = [k for k in entry.get("kinds", []) if k not in applicable_kinds(geometry)]
    if bad:
        raise PassError(f"structure grows {bad} at {where!r}, which does not take them "
                        f"(it takes {applicable_kinds(geometry)})")


def _inner_geometries(entry: dict[str, Any], outer: ConvGeometry) -> dict[str, ConvGeometry]:
    """The inner convs the entry's kinds hold in a block of ``outer``, by path relative to the block."""
    known = [k for k in entry.get("kinds", []) if k in registry.kind_names()]
    return {f"branches.{kind}.{rel}": geometry for kind in known
            for rel, geometry in registry.get_kind(kind).nested(outer).items()}


def restore_block(model: nn.Module, name: str, entry: dict[str, Any], mode: str, init_scale: float,
                  recompute: bool = False) -> None:
    """Rebuild the block ``entry`` describes at ``name``, nested blocks included; no eligibility check
    (e.g. on a frozen EMA copy). Branch values are fresh until a state_dict loads. Grows through
    :func:`dyrep_fx.passes.rep.grow_site`, as the rep pass does."""
    present = get_module(model, name)
    missing = [k for k in entry.get("kinds", []) if not (isinstance(present, RepConv2d) and k in present.branches)]
    grow_site(model, name, missing, mode=mode, init_scale=init_scale, recompute=recompute)
    module = get_module(model, name)
    if entry.get("bias") and module.main_bias is None:
        module.ensure_bias()
    for rel, inner in entry.get("nested", {}).items():
        restore_block(module, rel, inner, mode, init_scale, recompute)


def restore(model: nn.Module, spec: dict[str, Any], txn: Transaction, init_scale: float, prefix: str = "",
            recompute: bool = False) -> None:
    """Rebuild the checked ``spec`` on ``model`` (new branches start at ``init_scale``), recording every
    change in ``txn``.

    ``txn`` may belong to a larger model of which ``model`` is the submodule ``prefix``, so that one
    rollback undoes several targets.
    """
    # Branch values are about to be overwritten by a state_dict: don't consume the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        for name, entry in spec["sites"].items():
            original = get_module(model, name)
            txn.save(original)
            # Recorded before the rebuild: one failing midway (after the block took the conv's place) is
            # undone too; putting back a conv that is still in place changes nothing.
            txn.record_replacement(f"{prefix}.{name}" if prefix else name, original)
            restore_block(model, name, entry, spec["mode"], init_scale, recompute)

