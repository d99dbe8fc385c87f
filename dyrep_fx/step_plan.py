"""``StepPlan``: one DyRep step's decision as frozen data, apart from carrying it out.

:meth:`dyrep_fx.DyRep.decide` makes a plan from the interval's scores, the candidate rule and the cut
criterion; :meth:`dyrep_fx.DyRep.apply` carries it out. In between it is plain data: the ranks compare
its decision (:meth:`StepPlan.decision`), ``DyRep.history`` records it with what changed, and
:meth:`StepPlan.to_dict` / :meth:`StepPlan.from_dict` write and read it as JSON-ready data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["StepPlan", "step_seed"]


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s branch initialisation in a run seeded ``seed`` (same on every rank)."""
    digest = hashlib.sha256(f"{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _frozen_kinds(plan: Mapping[str, Sequence[str]]) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({name: tuple(kinds) for name, kinds in plan.items()})


def _frozen_verdict(verdict: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType({**verdict, "importance": MappingProxyType(dict(verdict.get("importance", {}))),
                             "cut": tuple(verdict.get("cut", ()))})


@dataclass(frozen=True)
class StepPlan:
    """What one DyRep step grows and cuts, and the numbers it was decided from.

    Attributes:
        unit: the unit (the caller's epoch or iteration count) the plan was decided for.
        step: the controller's step count when it was decided; :meth:`DyRep.apply` takes only a plan of
            its current step.
        seed: seeds the new branches' initial values, so every rank and a resumed run draw the same.
        grow: ``{site: kinds}`` to grow, best score first.
        cut: ``{block: kinds}`` to cut (decided before this step's growth).
        scores: each watched candidate's mean saliency over the interval.
        verdicts: each block's ``{"importance": {kind: value}, "cut": kinds, "std": x, "reason": text}``
            from the cut criterion.

    The mappings are read-only views; :meth:`to_dict` gives plain, JSON-ready copies.
    """

    unit: int
    step: int
    seed: int
    grow: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    cut: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    scores: Mapping[str, float] = field(default_factory=dict)
    verdicts: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Frozen all the way down: a plan that ranks compared and history recorded cannot drift.
        object.__setattr__(self, "grow", _frozen_kinds(self.grow))
        object.__setattr__(self, "cut", _frozen_kinds(self.cut))
        object.__setattr__(self, "scores", MappingProxyType({n: float(v) for n, v in self.scores.items()}))
        object.__setattr__(self, "verdicts", MappingProxyType(
            {name: _frozen_verdict(v) for name, v in self.verdicts.items()}))

    @property
    def changes_nothing(self) -> bool:
        """True when the plan neither grows nor cuts."""
        return not self.grow and not self.cut

    def decision(self) -> dict[str, Any]:
        """What must be the same on every rank before anything changes: the sites to grow (in order) with
        their kinds, and the cuts, as plain data."""
        return {"grow": [[name, list(kinds)] for name, kinds in self.grow.items()],
                "cut": {name: list(kinds) for name, kinds in self.cut.items()}}

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain, JSON-ready data (:meth:`from_dict` reads it back)."""
        return {
            "unit": self.unit, "step": self.step, "seed": self.seed,
            "grow": {name: list(kinds) for name, kinds in self.grow.items()},
            "cut": {name: list(kinds) for name, kinds in self.cut.items()},
            "scores": dict(self.scores),
            "verdicts": {name: {**v, "importance": dict(v["importance"]), "cut": list(v["cut"])}
                         for name, v in self.verdicts.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepPlan:
        """The plan :meth:`to_dict` wrote."""
        return cls(unit=data["unit"], step=data["step"], seed=data["seed"], grow=data.get("grow", {}),
                   cut=data.get("cut", {}), scores=data.get("scores", {}), verdicts=data.get("verdicts", {}))

    def __reduce__(self):
        # Read-only views do not pickle or deep-copy; the plain data does.
        return (StepPlan.from_dict, (self.to_dict(),))
