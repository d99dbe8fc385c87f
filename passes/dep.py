"""Dep pass: cut branches and absorb them into the main kernel (DyRep's Dep step).

Cuts are given by name, or chosen by DyRep's criterion on each block's branch importances (see
:meth:`dyrep_fx.block.RepConv2d.importance`: the branch's share of the block's kernel in online mode, its
last BatchNorm's |gamma| relative to the main branch's in dbb mode): when the importances of a block's
branches are spread out (std > ``std_gate``), a branch below both their mean and ``threshold`` goes
(:class:`DepCriterion`). Any object with the same ``judge`` method (:class:`CutCriterion`) can take its place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..block import find_blocks
from ..defaults import STD_GATE, THRESHOLD
from ..tracing import TracedModel
from .base import PassError, PassReport, Transaction, get_module, transaction_for

__all__ = ["Verdict", "CutCriterion", "DepCriterion", "judge_blocks", "checked_request", "run"]


@dataclass(frozen=True)
class Verdict:
    """The Dep criterion's judgement of one block: what to cut, the spread it saw, and why."""

    cut: list[str]
    std: float
    reason: str

    def as_dict(self) -> dict[str, object]:
        """Plain data for histories and logs."""
        return {"cut": list(self.cut), "std": self.std, "reason": self.reason}


@runtime_checkable
class CutCriterion(Protocol):
    """What a cut criterion is: one method from a block's ``{kind: importance}`` to its :class:`Verdict`.

    :class:`DepCriterion` is DyRep's; ``DyRep(criterion=...)`` and :func:`run` take any object with this
    method. The verdict's ``cut`` must name branches of the block; ``std`` and ``reason`` are what the
    history and the log show (a criterion without a spread may report ``0.0``).
    """

    def judge(self, importance: Mapping[str, float]) -> Verdict:
        """The verdict on one block's ``{kind: importance}``."""
        ...


@dataclass(frozen=True)
class DepCriterion:
    """DyRep's cut criterion on one block's branch importances (the reference's settings by default).

    Nothing is cut while the importances are not spread out (unbiased std <= ``std_gate``), which
    protects freshly grown blocks whose branches all start at the same share; then a branch whose
    importance is below both their mean and ``threshold`` goes.
    """

    std_gate: float = STD_GATE
    threshold: float = THRESHOLD

    def judge(self, importance: Mapping[str, float]) -> Verdict:
        """The verdict on one block's ``{kind: importance}``."""
        if len(importance) < 2:
            return Verdict([], 0.0, "fewer than two branches")
        values = torch.tensor(list(importance.values()), dtype=torch.float64)
        std = float(values.std())
        if std <= self.std_gate:
            return Verdict([], std, f"std {std:.3g} <= gate {self.std_gate:g}")
        mean = float(values.mean())
        cut = [kind for kind, v in importance.items() if v < mean and v < self.threshold]
        below = f"below both the mean {mean:.3g} and the threshold {self.threshold:g}"
        return Verdict(cut, std, below if cut else f"no branch {below}")


def judge_blocks(model: nn.Module, criterion: CutCriterion = DepCriterion(),
                 protect: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """The one place blocks are judged: every block of ``model`` (but those in ``protect``) with its
    importances and the criterion's verdict on them, as plain data for plans, histories and logs:
    ``{block: {"importance": {kind: value}, "cut": [kinds], "std": x, "reason": text}}``."""
    judged = {}
    for name, block in find_blocks(model).items():
        if name in protect:
            continue
        importance = block.importance()
        verdict = criterion.judge(importance)  # a user criterion's verdict may be any object with these three
        judged[name] = {"importance": importance, "cut": list(verdict.cut), "std": float(verdict.std),
                        "reason": str(verdict.reason)}
    return judged


def checked_request(model: nn.Module, cuts: Mapping[str, Sequence[str]] | None = None,
                    criterion: CutCriterion = DepCriterion(), protect: Sequence[str] = ()) -> dict[str, list[str]]:
    """Which kinds to cut where: ``cuts`` checked against the model, or the criterion's choice.

    The criterion skips the blocks named in ``protect`` (e.g. those grown a moment ago).
    """
    blocks = find_blocks(model)
    if cuts is None:
        verdicts = judge_blocks(model, criterion, protect)
        return {name: v["cut"] for name, v in verdicts.items() if v["cut"]}
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
    criterion: CutCriterion = DepCriterion(),
    protect: Sequence[str] = (),
    txn: Transaction | None = None,
) -> PassReport:
    """Cut ``cuts`` (``{site: kinds}``), or what the criterion selects; exact in eval mode, all or nothing:
    in the caller's ``txn`` (over ``model`` or a parent model), else in its own.

    Inner blocks are cut before the blocks that contain them, so a cut never discards learned
    nested structure that the criterion keeps.
    """
    todo = checked_request(model, cuts, criterion, protect)
    report = PassReport("dep")
    report.details["importance"] = {name: b.importance() for name, b in find_blocks(model).items()}
    with transaction_for(model, txn) as active:  # any failure puts everything back
        for name in sorted(todo, key=lambda n: -n.count(".")):
            block = get_module(model, name)
            active.save(block)
            block.cut(todo[name])
            report.changed[name] = list(todo[name])
    return report
