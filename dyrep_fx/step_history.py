"""DyRep's history: one plain-data entry per applied step (what grew and was cut, the top scores, every
block's verdict and branch count) and its lines in the log."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from .block import find_blocks
from .step_plan import StepPlan

__all__ = ["TOP_SCORES", "history_entry", "log_step"]

#: Candidate scores kept per step in ``history`` (the best first).
TOP_SCORES = 5

def history_entry(plan: StepPlan, grown: Mapping[str, list[str]], cut: Mapping[str, list[str]],
                  scores: Mapping[str, float], verdicts: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """The history entry of ``plan`` applied to ``model``: what it ``grown`` and ``cut``, its best scores,
    its verdicts and each block's branch count after it."""
    ranked = sorted(scores.items(), key=lambda t: (-t[1], t[0]))[:TOP_SCORES]
    return {"unit": plan.unit, "step": plan.step + 1,  # the steps taken, this one included
            "grown": dict(grown), "cut": dict(cut),
            "branches": {name: len(b.kinds) for name, b in find_blocks(model).items()},
            "scores": [[name, value] for name, value in ranked], "candidates": len(scores),
            "verdicts": dict(verdicts)}


def log_step(log: logging.Logger, entry: Mapping[str, Any], metric: str) -> None:
    """Log a history entry on ``log`` (the controller's): what changed, the best scores, every block's verdict."""
    log.info("DyRep step %d (unit %d): %s; %s; top %s scores: %s", entry["step"], entry["unit"],
             _describe(entry["grown"], "grew") or "grew nothing", _describe(entry["cut"], "cut") or "cut nothing",
             metric, ", ".join(f"{n} {v:.4g}" for n, v in entry["scores"]) or "no candidates")
    for name, verdict in entry["verdicts"].items():
        importance = ", ".join(f"{k} {v:.3g}" for k, v in verdict["importance"].items())
        log.info("DyRep step %d: block %s importance {%s}, std %.3g: %s%s", entry["step"], name,
                 importance, verdict["std"], "cut " if verdict["cut"] else "kept: ", verdict["reason"])


def _describe(changes: Mapping[str, list[str]], verb: str) -> str:
    return "; ".join(f"{verb} {name} {kinds}" for name, kinds in changes.items())
