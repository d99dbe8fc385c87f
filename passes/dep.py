"""Dep pass: cut branches and absorb them into the main kernel (DyRep's Dep step).

Cuts are given by name, or chosen by DyRep's criterion on each block's branch importances
(mean |scale| or last-BN |gamma|, relative to the main branch): when the importances of a block's
branches are spread out (std > ``std_gate``), a branch below both their mean and ``threshold`` goes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..block import find_blocks
from ..tracing import TracedModel
from .base import PassError, PassReport, Transaction, get_module

__all__ = ["select_cuts", "plan", "run"]


def select_cuts(importance: Mapping[str, float], std_gate: float = 0.02, threshold: float = 0.1) -> list[str]:
    """DyRep's criterion on one block: kinds whose importance is below the mean and ``threshold``.

    Nothing is cut while the importances are not spread out (unbiased std <= ``std_gate``), which
    protects freshly grown blocks whose branches all start at the same scale.
    """
    if len(importance) < 2:
        return []
    values = torch.tensor(list(importance.values()), dtype=torch.float64)
    if float(values.std()) <= std_gate:
        return []
    mean = float(values.mean())
    return [kind for kind, v in importance.items() if v < mean and v < threshold]


def plan(model: nn.Module, cuts: Mapping[str, Sequence[str]] | None = None, std_gate: float = 0.02,
         threshold: float = 0.1, protect: Sequence[str] = ()) -> dict[str, list[str]]:
    """Which kinds to cut where: ``cuts`` checked against the model, or the criterion's choice.

    The criterion skips the blocks named in ``protect`` (e.g. those grown a moment ago).
    """
    blocks = find_blocks(model)
    if cuts is None:
        chosen = {name: select_cuts(b.importance(), std_gate, threshold) for name, b in blocks.items()
                  if name not in protect}
        return {name: kinds for name, kinds in chosen.items() if kinds}
    checked: dict[str, list[str]] = {}
    for name, kinds in cuts.items():
        if name not in blocks:
            raise PassError(f"{name!r} is not a grown site; grown sites: {sorted(blocks)}")
        missing = [k for k in kinds if k not in blocks[name].branches]
        if missing:
            raise PassError(f"site {name!r} has no {missing} branch (it has {blocks[name].kinds})")
        checked[name] = list(kinds)
    return checked


def run(
    traced: TracedModel,
    model: nn.Module,
    *,
    cuts: Mapping[str, Sequence[str]] | None = None,
    std_gate: float = 0.02,
    threshold: float = 0.1,
    protect: Sequence[str] = (),
) -> PassReport:
    """Cut ``cuts`` (``{site: kinds}``), or what the criterion selects; exact in eval mode, all or nothing.

    Inner blocks are cut before the blocks that contain them, so a cut never discards learned
    nested structure that the criterion keeps.
    """
    todo = plan(model, cuts, std_gate, threshold, protect)
    report = PassReport("dep")
    report.details["importance"] = {name: b.importance() for name, b in find_blocks(model).items()}
    txn = Transaction(model)
    try:
        for name in sorted(todo, key=lambda n: -n.count(".")):
            block = get_module(model, name)
            txn.save(block)
            block.cut(todo[name])
            report.changed[name] = "cut " + ", ".join(todo[name])
    except Exception:
        txn.rollback()
        raise
    return report
