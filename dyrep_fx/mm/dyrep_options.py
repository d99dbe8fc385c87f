"""DyRep's options as one config block, its policies built from config.

``DyRepHook(dyrep=dict(...))`` takes every keyword argument of :class:`dyrep_fx.DyRep` that a config can
give (read from its signature, so an option added to ``DyRep`` is accepted here without listing it), and
builds the three policies from config entries the way mmengine builds everything else::

    custom_imports = dict(imports=['dyrep_fx.mm', 'my_policies'], allow_failed_imports=False)
    custom_hooks = [dict(type='DyRepHook', targets=['backbone'], dyrep=dict(
        interval=1000, until=20000,
        candidates=dict(type='OnlyLayer3'),                    # a CandidateRule
        criterion=dict(type='CutTheWeakest', margin=0.01),     # anything with judge(importance) -> Verdict
        metric=dict(type='GradTimesWeight'),                   # a callable (weight, grad) -> tensor
        growth=dict(type='TopScores')))]                       # a GrowthSelection

where ``my_policies`` registers its classes in :data:`POLICIES`
(``@dyrep_fx.mm.POLICIES.register_module()``). A policy entry is

* ``dict(type=..., **kwargs)``: built by ``POLICIES.build``; ``type`` a registered name, a dotted import
  path (``'my_package.rules.OnlyLayer3'``, no registration needed) or the class itself;
* a string: a registered name or dotted import path of a class (built without arguments), a function or an
  instance (used as it is); for ``metric`` also one of :data:`dyrep_fx.saliency.METRICS` (``'snip'``);
* an object: used as it is.

Every entry is built and checked when the hook is constructed (when mmengine's Runner is built), so a
policy that does not build stops the run before training, naming the entry and why.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from mmengine.registry import Registry

from ..controller import DyRep
from ..defaults import PAPER_SCHEDULE
from ..passes.dep import DepCriterion
from ..policies import DyRepCandidates, GrowthSelection, TopScores, as_candidate_rule, check_cut_criterion
from ..saliency import METRICS

__all__ = ["POLICIES", "DYREP_OPTIONS", "SET_BY_THE_HOOK", "HOOK_DEFAULTS", "build_dyrep_options",
           "build_policy"]

#: Candidate rules, cut criteria and scorers a config can name (``dict(type=...)``).
POLICIES = Registry("dyrep_fx policy", scope="dyrep_fx")
POLICIES.register_module(module=DyRepCandidates)
POLICIES.register_module(module=DepCriterion)
POLICIES.register_module(module=TopScores)

#: ``DyRep`` arguments the hook supplies from the Runner (model, optimizer, data, targets): not config options.
SET_BY_THE_HOOK = ("model", "optimizer", "targets", "example_inputs", "calib_loader", "forward_fn",
                   "group_chooser")
#: Every option of the ``dyrep`` block: ``DyRep``'s keyword arguments, less those the hook supplies.
DYREP_OPTIONS: tuple[str, ...] = tuple(name for name, p in inspect.signature(DyRep).parameters.items()
                                       if name not in SET_BY_THE_HOOK and p.kind is not p.VAR_KEYWORD)
#: Where the hook's default differs from ``DyRep``'s: a step every 1000 iterations (not every 5 calls), and
#: the paper's schedule with ``snip`` (no growth at the first call). OpenMMLab runs start from pretrained
#: backbones, where neither growth at initialisation nor ``snip_per_weight`` (DyRep's defaults since issue
#: 31, measured training from scratch) was measured; ``dyrep=dict(grow_at_start=0.5,
#: metric='snip_per_weight')`` asks for them.
HOOK_DEFAULTS: dict[str, Any] = {"interval": 1000, **PAPER_SCHEDULE}

_HOW_TO_REGISTER = ("register it with @dyrep_fx.mm.POLICIES.register_module() in a module listed in "
                    "custom_imports, or give its dotted import path (type='my_package.my_module.MyClass')")


def default_of(option: str) -> Any:
    """The value ``option`` takes when the block leaves it out: the hook's default, else ``DyRep``'s."""
    if option in HOOK_DEFAULTS:
        return HOOK_DEFAULTS[option]
    return inspect.signature(DyRep).parameters[option].default


def build_dyrep_options(block: Mapping[str, Any]) -> dict[str, Any]:
    """``DyRep`` keyword arguments from a config block: names checked, policies built and checked.

    Raises ``ValueError`` naming an option ``DyRep`` does not take, one the hook supplies itself, or a
    policy that does not build (with what to do about it).
    """
    options = {**HOOK_DEFAULTS, **dict(block)}
    supplied = sorted(set(options) & set(SET_BY_THE_HOOK))
    if supplied:
        raise ValueError(f"DyRepHook: dyrep={{...}} sets {supplied}, which the hook supplies from the Runner; "
                         f"name the targets with DyRepHook(targets=[...]) and leave the rest out")
    unknown = sorted(set(options) - set(DYREP_OPTIONS))
    if unknown:
        raise ValueError(f"DyRepHook: dyrep={{...}} has options DyRep does not take: {unknown}; "
                         f"the options are {list(DYREP_OPTIONS)}")
    if options.get("kinds") is not None:
        options["kinds"] = list(options["kinds"])
    for option, check in _POLICY_CHECKS.items():
        if options.get(option) is not None:
            options[option] = build_policy(option, options[option], check)
    return options


def build_policy(option: str, spec: Any, check: Callable[[Any], Any] = lambda policy: policy) -> Any:
    """The policy ``spec`` names for ``option`` (see the module docstring), passed through ``check``.

    Raises ``ValueError`` naming ``option`` and ``spec`` when it does not build or fails the check.
    """
    try:
        return check(_build(option, spec))
    except Exception as exc:
        raise ValueError(f"DyRepHook: dyrep.{option}={_describe(spec)} does not build: {exc}. A policy is a "
                         f"dict(type=...) or a name; {_HOW_TO_REGISTER}") from exc


def _build(option: str, spec: Any) -> Any:
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if "type" not in spec:
            raise KeyError("the entry has no 'type'")
        return POLICIES.build(spec)
    if not isinstance(spec, str) or (option == "metric" and spec in METRICS):
        return spec
    found = POLICIES.get(spec)
    if found is None:
        raise KeyError(f"{spec!r} is neither registered in {POLICIES.name!r} nor an importable dotted path")
    return found() if inspect.isclass(found) else found


def _describe(spec: Any) -> str:
    return repr(dict(spec)) if isinstance(spec, Mapping) else repr(spec)


def _check_metric(scorer: Any) -> Any:
    if isinstance(scorer, str) or callable(scorer):
        return scorer
    raise TypeError(f"a scorer is a callable (weight, grad) -> tensor or one of {list(METRICS)}, "
                    f"got {type(scorer).__name__}")


def _check_growth(selection: Any) -> GrowthSelection:
    if isinstance(selection, GrowthSelection):
        return selection
    raise TypeError(f"a growth selection is a dyrep_fx.policies.GrowthSelection, got {type(selection).__name__}")


#: The options that are policies, each with the check its built object must pass.
_POLICY_CHECKS: dict[str, Callable[[Any], Any]] = {
    "candidates": as_candidate_rule, "criterion": check_cut_criterion, "metric": _check_metric,
    "growth": _check_growth}
