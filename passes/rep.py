"""Rep pass: grow re-parameterization branches at chosen conv sites (DyRep's Rep step).

A plain conv at a site is replaced in place, at its qualified name, by a
:class:`~dyrep_fx.block.RepConv2d` that reuses its Parameters; an existing block grows more branches.
The model's function is unchanged (exactly in online mode; in eval mode in dbb mode).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

from torch import nn

from ..block import RepConv2d
from ..defaults import INIT_SCALE
from ..kinds.registry import kind_names
from ..target_names import join_name
from ..tracing import TracedModel
from . import analysis
from .analysis import Site
from .base import PassError, PassReport, Transaction, get_module, set_module, transaction_for

__all__ = ["checked_request", "run", "grow_site", "check_kind_names"]


def check_kind_names(kinds: Iterable[str]) -> list[str]:
    """``kinds`` as a list, refusing any name that is no branch kind at all with the closest kind
    suggested (a typo such as ``"idenity"`` would otherwise read as a kind that does not apply to the
    first site)."""
    if isinstance(kinds, str):  # list("1x1") would name three kinds
        raise PassError(f"kinds must be a list of branch kinds, not the string {kinds!r}: write [{kinds!r}]")
    kinds = list(kinds)
    known = kind_names()  # (every registered kind, a user's too)
    for kind in kinds:
        if kind in known:
            continue
        close = difflib.get_close_matches(str(kind), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise PassError(f"{kind!r} is not a branch kind; {hint}the kinds are {list(known)}")
    return kinds


def checked_request(
    sites: Sequence[Site], names: Iterable[str] | None, kinds: Iterable[str] | None
) -> dict[str, list[str]]:
    """Which kinds to grow at which site; raises :class:`PassError` naming any site or kind refused.

    ``names=None`` means every eligible site; ``kinds=None`` every kind that applies and is absent.
    Explicit kinds must apply to every named site.
    """
    wanted = None if kinds is None else check_kind_names(kinds)
    by_name = {s.name: s for s in sites}
    if names is None:
        chosen = [s for s in sites if s.eligible and s.depth == 0]
    else:
        chosen = []
        for name in names:
            if name not in by_name:
                raise PassError(f"no conv site named {name!r}; see dyrep_fx.sites(model) for the names")
            site = by_name[name]
            if not site.eligible:
                raise PassError(f"site {name!r} cannot grow: {site.reason}")
            chosen.append(site)
    result: dict[str, list[str]] = {}
    for site in chosen:
        if wanted is None:
            result[site.name] = list(site.kinds)
            continue
        for kind in wanted:
            if kind in site.grown:
                raise PassError(f"site {site.name!r} already has a {kind!r} branch")
            if kind not in site.kinds:
                raise PassError(f"branch {kind!r} does not apply to site {site.name!r} "
                                f"({site.module_type} {site.kernel_size}, stride {site.stride}, "
                                f"groups {site.groups}); it takes {site.kinds}")
        result[site.name] = wanted
    return result


def grow_site(model: nn.Module, name: str, kinds: Sequence[str], *, mode: str, init_scale: float = INIT_SCALE,
              recompute: bool = False, txn: Transaction | None = None, prefix: str = "") -> list[nn.Module]:
    """Grow ``kinds`` at ``name``: the one way a conv becomes a block (the rep pass, structure restores and
    EMA copies all grow here). A conv is replaced, at the same qualified name, by a
    :class:`~dyrep_fx.block.RepConv2d` that reuses its Parameters; a block grows more branches. The
    function is kept; nothing is checked (:func:`checked_request` checks the rep pass's sites; restores check their
    spec). With ``txn``, over ``model`` or over a parent model of which ``model`` is the submodule
    ``prefix``, the site's tree and its replacement are recorded there. Returns the new branches.
    """
    module = get_module(model, name)
    if txn is not None:
        txn.save(module)
    if not isinstance(module, RepConv2d):
        if not isinstance(module, nn.Conv2d):
            raise PassError(f"{name!r} is a {type(module).__name__}, not a Conv2d: it cannot grow branches")
        block = RepConv2d(module, mode=mode, init_scale=init_scale, recompute=recompute)
        set_module(model, name, block)
        if txn is not None:  # recorded once the block took the conv's place
            txn.record_replacement(join_name(prefix, name), module)
        module = block
    return module.grow(kinds)


def run(
    traced: TracedModel,
    model: nn.Module,
    *,
    names: Iterable[str] | None = None,
    kinds: Iterable[str] | None = None,
    mode: str = "online",
    init_scale: float = INIT_SCALE,
    recompute: bool = False,
    txn: Transaction | None = None,
    prefix: str = "",
    sites: Sequence[Site] | None = None,
) -> PassReport:
    """Grow ``kinds`` at ``names`` (see :func:`checked_request`); all or nothing: in the caller's ``txn`` (over
    ``model``, or over a parent model of which ``model`` is the submodule ``prefix``), else in its own.
    ``sites``: the caller's analysis of ``model`` as it is now, checked against instead of analysing again."""
    todo = checked_request(analysis.analyse(traced, model, mode) if sites is None else sites, names, kinds)
    report = PassReport("rep")
    new_modules: dict[str, list[nn.Module]] = {}
    with transaction_for(model, txn) as active:  # any failure puts everything back
        for name, site_kinds in todo.items():
            if not site_kinds:
                report.skipped[name] = "every applicable branch is already present"
                continue
            new_modules[name] = grow_site(model, name, site_kinds, mode=mode, init_scale=init_scale,
                                          recompute=recompute, txn=active, prefix=prefix)
            report.changed[name] = list(site_kinds)
    report.details["new_modules"] = new_modules
    return report
