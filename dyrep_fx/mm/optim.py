"""The runner's optimizer and parameter schedulers after DyRep adds Parameters mid-run.

The controller puts each new Parameter in the optimizer (:mod:`dyrep_fx.optim_sync`); what is mmengine's
is here: the group a new Parameter gets under the config's ``paramwise_cfg`` (:class:`ParamwiseChooser`),
and the schedulers' view of groups added after they were built (:func:`follow_schedules`,
:func:`cover_new_groups`).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

__all__ = ["ParamwiseChooser", "cover_new_groups", "follow_schedules", "paramwise_chooser"]


class ParamwiseChooser:
    """Put each new Parameter in its own group built by the config's optimizer constructor.

    mmengine builds one group per Parameter when ``paramwise_cfg`` is set (``norm_decay_mult``,
    ``bias_decay_mult``, ``custom_keys``...); new Parameters get the same treatment. Branch scales
    stand in for the BatchNorm gammas of DBB, so they take ``norm_decay_mult`` like norm weights.
    The new group then joins the schedules where the group of the conv it grew from has got to.
    """

    def __init__(self, optim_wrapper_cfg: dict) -> None:
        cfg = copy.deepcopy(dict(optim_wrapper_cfg))
        self.paramwise_cfg = cfg.pop("paramwise_cfg", None) or {}
        ctor_type = cfg.pop("constructor", "DefaultOptimWrapperConstructor")
        self.constructor = OPTIM_WRAPPER_CONSTRUCTORS.build(
            dict(type=ctor_type, optim_wrapper_cfg=cfg, paramwise_cfg=self.paramwise_cfg))

    def __call__(self, optimizer, model, name, param, source_weight) -> int:
        owner_name = name.rpartition(".")[0]
        owner = model.get_submodule(owner_name) if owner_name else model
        groups: list[dict] = []
        self._add_params(groups, model, owner, owner_name)
        group = next(g for g in groups if g["params"][0] is param)
        norm_mult = self.paramwise_cfg.get("norm_decay_mult")
        if name.rpartition(".")[2] in ("scale", "main_scale") and norm_mult is not None \
                and self.constructor.base_wd is not None:
            group["weight_decay"] = self.constructor.base_wd * norm_mult
        group["params"] = []
        optimizer.add_param_group(group)  # fills in the optimizer's defaults (the base lr...)
        ref = next((g for g in optimizer.param_groups if any(p is source_weight for p in g["params"])),
                   optimizer.param_groups[0])
        follow_schedules(optimizer.param_groups[-1], ref)
        return len(optimizer.param_groups) - 1

    def _add_params(self, groups: list[dict], model, owner, owner_name: str) -> None:
        """The constructor's groups for ``owner``'s own Parameters, named as in the whole model.

        mmpretrain's ``LearningRateDecayOptimWrapperConstructor`` names Parameters ``prefix + name`` (its
        prefixes end with a dot) and asks the model, not the module it is given, for each one's layer depth:
        a new branch then gets the learning-rate scale of the layer of the conv it grew from.
        """
        if "get_layer_depth" in inspect.signature(self.constructor.add_params).parameters:
            self.constructor.add_params(groups, owner, prefix=f"{owner_name}." if owner_name else "",
                                        get_layer_depth=getattr(model, "get_layer_depth", None))
        else:
            self.constructor.add_params(groups, owner, prefix=owner_name)


def paramwise_chooser(optim_wrapper_cfg: dict | None) -> ParamwiseChooser | None:
    """A :class:`ParamwiseChooser` for a config's ``optim_wrapper`` that sets ``paramwise_cfg``; else None
    (the controller's default: a new Parameter joins the group of the weight it grew from)."""
    cfg = optim_wrapper_cfg or {}
    return ParamwiseChooser(cfg) if cfg.get("paramwise_cfg") else None


def follow_schedules(group: dict, ref: dict) -> None:
    """Give a group added mid-run the values mmengine's parameter schedulers would have given it by now.

    A scheduler keeps each group's starting value as ``initial_<name>`` and updates the current value
    relative to itself (warm-up factors, decay steps), so a group built from the config's base values
    would otherwise run at the base lr (say 10x the decayed one) or warm up all over again. The group's
    values are scaled by ``ref``'s progress (current / initial) and its base values become its initial ones.
    """
    for key in [k for k in ref if k.startswith("initial_")]:
        name = key[len("initial_"):]
        if name in group and key not in group:
            group[key] = group[name]
            if ref[key]:
                group[name] = group[name] * ref[name] / ref[key]


def _schedulers(runner: Any) -> list:
    schedulers = runner.param_schedulers or []
    if isinstance(schedulers, dict):
        schedulers = [s for group in schedulers.values() for s in group]
    return schedulers


def cover_new_groups(runner: Any) -> None:
    """Schedulers that keep one base value per group (cosine annealing) must know the groups added since.

    They pair ``base_values`` with the groups of what they schedule by position, and mmengine's
    ``OptimWrapper`` lists its ``base_param_settings`` after the optimizer's own groups, so the values
    are rebuilt in that order from each group's ``initial_<name>`` (what they were first built from).
    """
    wrapper = runner.optim_wrapper
    for scheduler in _schedulers(runner):
        target = getattr(scheduler, "optimizer", None)
        if target not in (wrapper, wrapper.optimizer) or not hasattr(scheduler, "base_values"):
            continue
        groups = target.param_groups
        if len(scheduler.base_values) != len(groups):
            key = f"initial_{scheduler.param_name}"
            scheduler.base_values = [g.get(key, g[scheduler.param_name]) for g in groups]
