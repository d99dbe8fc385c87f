"""Keep an optimizer consistent with a model whose structure changed, in place.

Surviving Parameters keep their state (momentum, Adam moments) because blocks reuse Parameter
objects; removed Parameters leave their group and the optimizer state; new Parameters join the
group of the conv they grew from, or -- for 1-D (norm-like) Parameters -- the group holding the
model's normalisation weights, since no-weight-decay groups for norms and biases are common.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GroupChooser", "default_group", "sync_optimizer", "sync_after_change", "layout", "apply_layout",
           "optimizer_rollback"]

#: ``chooser(optimizer, model, param_name, param, source_weight) -> group index``.
GroupChooser = Callable[[torch.optim.Optimizer, nn.Module, str, nn.Parameter, nn.Parameter | None], int]

_NORMS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _group_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    return {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}


def default_group(
    optimizer: torch.optim.Optimizer, model: nn.Module, name: str, param: nn.Parameter,
    source_weight: nn.Parameter | None,
) -> int:
    """1-D parameters go where the model's norm weights are; kernels go with the conv they grew from."""
    where = _group_index(optimizer)
    if param.dim() <= 1:
        for m in model.modules():
            if isinstance(m, _NORMS) and getattr(m, "weight", None) is not None and id(m.weight) in where:
                return where[id(m.weight)]
    if source_weight is not None and id(source_weight) in where:
        return where[id(source_weight)]
    return 0


def sync_optimizer(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    new_params: Iterable[tuple[str, nn.Parameter, nn.Parameter | None]],
    chooser: GroupChooser = default_group,
) -> dict[str, list[str]]:
    """Drop Parameters the model no longer has; add ``new_params`` ``(name, param, source weight)``.

    Returns ``{"added": [...], "removed": [count as str]}`` for logging.
    """
    alive = {id(p) for p in model.parameters()}
    removed = 0
    for group in optimizer.param_groups:
        keep = []
        for p in group["params"]:
            if id(p) in alive:
                keep.append(p)
            else:
                optimizer.state.pop(p, None)
                removed += 1
        group["params"] = keep
    where = _group_index(optimizer)
    added = []
    for name, param, source in new_params:
        if id(param) in where or not param.requires_grad:
            continue
        index = chooser(optimizer, model, name, param, source)
        optimizer.param_groups[index]["params"].append(param)
        where[id(param)] = index
        added.append(name)
    return {"added": added, "removed": [str(removed)]}


def sync_after_change(optimizer: torch.optim.Optimizer, model: nn.Module, before: set[int],
                      sources: dict[str, nn.Parameter], chooser: GroupChooser = default_group) -> None:
    """After a structure change: drop the optimizer's dead Parameters and add the new ones (not in
    ``before``, the ids of the model's Parameters before the change) of the blocks at ``sources``
    (``{site: the conv weight it grew from}``, which picks each new Parameter's group), in the model's
    order, as a fresh optimizer would hold them."""
    order = {id(p): i for i, p in enumerate(model.parameters())}
    new: dict[int, tuple[str, nn.Parameter, nn.Parameter]] = {}
    for site, weight in sources.items():
        try:
            block = model.get_submodule(site)
        except AttributeError:  # inside a branch cut in the same step: its Parameters are gone
            continue
        for name, p in block.named_parameters(prefix=site):
            if id(p) in order and id(p) not in before:
                new.setdefault(id(p), (name, p, weight))
    sync_optimizer(optimizer, model, sorted(new.values(), key=lambda t: order[id(t[1])]), chooser)


def _plain(value):
    return value if isinstance(value, (int, float, str, bool, type(None), tuple, list)) else repr(value)


def layout(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, list]:
    """Each group's Parameter names in order, and its options (what a checkpoint needs to map state back)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        "params": [[names[id(p)] for p in g["params"] if id(p) in names] for g in optimizer.param_groups],
        "options": [{k: _plain(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
    }


def apply_layout(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict[str, list]) -> None:
    """Make each group hold exactly the named Parameters, in the saved order, so state loads by position.

    Groups the run added after the optimizer was built (e.g. one per new Parameter under mmengine's
    ``paramwise_cfg``) are added again with their saved options.
    """
    groups = saved["params"]
    if len(groups) < len(optimizer.param_groups):
        raise ValueError(f"checkpoint has {len(groups)} optimizer groups, the optimizer has "
                         f"{len(optimizer.param_groups)}")
    params = dict(model.named_parameters())
    missing = [n for group in groups for n in group if n not in params]
    if missing:
        raise ValueError(f"checkpoint's optimizer holds parameters the model lacks: {missing[:5]}")
    for group, names in zip(optimizer.param_groups, groups):
        group["params"] = [params[n] for n in names]
    for names, options in list(zip(groups, saved["options"]))[len(optimizer.param_groups):]:
        optimizer.add_param_group({**options, "params": [params[n] for n in names]})


def optimizer_rollback(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """A rollback snapshot: a function that puts ``optimizer`` back as it is now: how many groups, each
    group's Parameters, and which Parameters have state (what :func:`sync_optimizer` and
    :func:`apply_layout` change).

    For a :class:`~dyrep_fx.passes.base.Transaction`'s ``on_rollback``: the state values themselves are
    not copied, since these functions only drop or keep them.
    """
    groups = [(group, list(group["params"])) for group in optimizer.param_groups]
    state = dict(optimizer.state)

    def put_back() -> None:
        del optimizer.param_groups[len(groups):]
        for group, params in groups:
            group["params"] = params
        optimizer.state.clear()
        optimizer.state.update(state)

    return put_back
