"""The policies a DyRep step decides with: public objects, each replaceable on its own.

A step's decision (:meth:`dyrep_fx.DyRep.decide`) asks four policies, kept apart from the analysis
they read (the :class:`~dyrep_fx.passes.analysis.Site` list) and from the code that carries a decision out
(:meth:`dyrep_fx.DyRep.apply`):

* the **scorer** ranks the candidates by saliency over the interval: ``DyRep(metric=...)``, a name or a
  callable ``(weight, grad) -> tensor`` (:mod:`dyrep_fx.saliency`);
* the **candidate rule** says which growable sites are offered for growth (and so scored):
  ``DyRep(candidates=...)``, a :class:`CandidateRule` or a callable ``(site, model) -> bool``;
  :class:`DyRepCandidates` is the default (kernel size and the nesting gate, with the gate's records);
* the **cut criterion** judges each block's branch importances: ``DyRep(criterion=...)``, any object
  with ``judge(importance) -> Verdict`` (:class:`CutCriterion`); :class:`DepCriterion` is the default;
* the **growth selection** picks which scored candidates grow, with which kinds: ``DyRep(growth=...)``, a
  :class:`GrowthSelection`; :class:`TopScores` is the default, :class:`WithinBudget` with ``budget``.

A user-written candidate rule and cut criterion::

    class OnlyLayer3(dyrep_fx.policies.CandidateRule):
        def offers(self, site, model):
            return site.name.startswith("layer3.")

    class CutTheWeakest:
        def judge(self, importance):
            if len(importance) < 2:
                return Verdict([], 0.0, "fewer than two branches")
            weakest = min(importance, key=importance.get)
            return Verdict([weakest], 0.0, f"{weakest} is the weakest")

    ctl = dyrep_fx.DyRep(model, optimizer, candidates=OnlyLayer3(), criterion=CutTheWeakest())

A site is only offered when it is structurally growable (eligible, not grown yet, and taking one of
the controller's branch kinds): a rule narrows that set, it cannot widen it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from .block import RepConv2d
from .cost_model import Budget
from .passes.analysis import Site
from .passes.dep import CutCriterion, DepCriterion, Verdict

__all__ = ["CandidateRule", "DyRepCandidates", "FunctionCandidates", "as_candidate_rule", "growable_kinds", "check_cut_criterion",
           "NESTED_POLICIES", "GrowthSelection", "TopScores", "WithinBudget",
           "CutCriterion", "DepCriterion", "Verdict"]

#: How :class:`DyRepCandidates` offers the inner kxk convs of grown branches.
NESTED_POLICIES: tuple[str, ...] = ("gated", "open", "off")


class CandidateRule:
    """Which growable sites a DyRep step offers for growth; subclass it and write :meth:`offers`.

    The controller tells the rule what changed (:meth:`on_grown`, :meth:`on_cut`) so that a rule may keep
    records (the default keeps each block's importances at growth), and saves and loads those records
    with its own state (:meth:`state_dict`, :meth:`load_state_dict`); :meth:`reset` forgets them when a
    run starts over from a grown checkpoint. A rule without records needs only :meth:`offers`.
    """

    def offers(self, site: Site, model: nn.Module) -> bool:
        """Whether growable ``site`` (its name relative to ``model``) is a candidate now."""
        raise NotImplementedError(f"{type(self).__name__} must define offers(site, model)")

    def on_grown(self, name: str, block: RepConv2d, step: int) -> None:
        """``block`` grew at ``name`` in DyRep step ``step`` (its new BatchNorms already calibrated)."""

    def on_cut(self, name: str, block: RepConv2d) -> None:
        """Branches of ``block`` at ``name`` were cut (it may have none left)."""

    def state_dict(self) -> dict[str, Any]:
        """The rule's records as plain data (saved in DyRep's ``state_dict``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the records of :meth:`state_dict` back."""

    def reset(self) -> None:
        """Forget every record (the blocks now present count as grown outside the controller)."""


class FunctionCandidates(CandidateRule):
    """A candidate rule from a plain function ``offers(site, model) -> bool`` (no records)."""

    def __init__(self, offers: Callable[[Site, nn.Module], bool]) -> None:
        self._offers = offers

    def offers(self, site: Site, model: nn.Module) -> bool:
        """What the function says."""
        return bool(self._offers(site, model))

    def __repr__(self) -> str:
        return f"FunctionCandidates({getattr(self._offers, '__qualname__', self._offers)!r})"


class DyRepCandidates(CandidateRule):
    """DyRep's candidate rule, with this library's nesting gate (see the package README).

    Args:
        pointwise: whether 1x1 convs are candidates (the reference: no; only kernels larger than 1x1).
        nested: when the inner kxk conv of a grown ``1x1_kxk`` branch is a candidate: ``"gated"``
            (default) once its branch trained a whole interval and its importance rose above its value at
            growth; ``"open"`` at once (the reference); ``"off"`` never.

    The gate's records (:attr:`births`) are ``{block: {"step": n, "importance": {kind: value}}}`` at
    growth; blocks without a record (grown outside the controller) are not gated.
    """

    def __init__(self, pointwise: bool = False, nested: str = "gated") -> None:
        if nested not in NESTED_POLICIES:
            raise ValueError(f"nested must be one of {NESTED_POLICIES}, got {nested!r}")
        self.pointwise, self.nested = pointwise, nested
        #: ``{block: {"step": n, "importance": {kind: value}}}`` at growth, for the nesting gate.
        self.births: dict[str, dict[str, Any]] = {}

    def offers(self, site: Site, model: nn.Module) -> bool:
        """Kernel size first, then the nesting gate for inner convs."""
        if not self.pointwise and all(k == 1 for k in site.kernel_size):
            return False
        if site.depth == 0 or self.nested == "open":
            return True
        return self.nested == "gated" and self._parent_branch_grew(site.name, model)

    def _parent_branch_grew(self, name: str, model: nn.Module) -> bool:
        """Whether the branch holding inner conv ``name`` gained importance since its block grew."""
        parent, kind = RepConv2d.split_inner_path(name)
        birth = self.births.get(parent)
        if birth is None or kind not in birth["importance"]:
            return True
        now = model.get_submodule(parent).importance().get(kind, 0.0)
        return now > birth["importance"][kind]

    def on_grown(self, name: str, block: RepConv2d, step: int) -> None:
        """Record the block's importances at growth: the gate compares later values with them."""
        self.births[name] = {"step": step, "importance": block.importance()}

    def on_cut(self, name: str, block: RepConv2d) -> None:
        """A block cut down to no branches is a plain conv again: its record goes."""
        if not block.grown:
            self.births.pop(name, None)

    def state_dict(self) -> dict[str, Any]:
        """``{"births": ...}``."""
        return {"births": self.births}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take saved birth records back."""
        self.births = dict(state.get("births", {}))

    def reset(self) -> None:
        """No birth records: every present block is ungated."""
        self.births = {}

    def __repr__(self) -> str:
        return f"DyRepCandidates(pointwise={self.pointwise}, nested={self.nested!r})"


def growable_kinds(sites: Iterable[Site], wanted: Sequence[str] | None) -> dict[str, list[str]]:
    """Each site structurally able to grow one of the ``wanted`` kinds (``None``: any kind it takes), with
    those kinds in ``wanted``'s order: eligible, not grown yet. No policy: the candidate rule narrows this."""
    return {s.name: [k for k in (s.kinds if wanted is None else wanted) if k in s.kinds]
            for s in sites if s.eligible and s.kinds and not s.grown
            and (wanted is None or any(k in s.kinds for k in wanted))}


def as_candidate_rule(rule: CandidateRule | Callable[[Site, nn.Module], bool]) -> CandidateRule:
    """``rule`` as a :class:`CandidateRule` (a plain function is wrapped); anything else is refused."""
    if isinstance(rule, CandidateRule):
        return rule
    if callable(rule):
        return FunctionCandidates(rule)
    raise TypeError(f"candidates must be a CandidateRule or a function (site, model) -> bool, "
                    f"got {type(rule).__name__}")


def check_cut_criterion(criterion: Any) -> CutCriterion:
    """``criterion`` if it has a ``judge`` method (:class:`CutCriterion`), else a ``TypeError``."""
    if not isinstance(criterion, CutCriterion):
        raise TypeError(f"criterion must have a judge(importance) -> Verdict method (like DepCriterion), "
                        f"got {type(criterion).__name__}")
    return criterion


class GrowthSelection:
    """Which of the scored candidates a DyRep step grows: the fourth policy, beside the scorer, the
    candidate rule and the cut criterion; subclass it and write :meth:`choose`.

    :class:`TopScores` is DyRep's; ``DyRep(budget=...)`` selects with :class:`WithinBudget`.
    """

    def choose(self, scores: Mapping[str, float], kinds: Mapping[str, list[str]], count: int,
               cut: Mapping[str, Sequence[str]], blocks: Mapping[str, RepConv2d]) -> dict[str, list[str]]:
        """``{site: kinds}`` to grow, best first: at most ``count`` of the sites in both ``scores`` (the
        interval's saliency) and ``kinds`` (each growable site with the kinds it would take), given the cuts
        the same step makes and the grown ``blocks`` now (names relative to the model)."""
        raise NotImplementedError(f"{type(self).__name__} must define choose(scores, kinds, count, cut, blocks)")


class TopScores(GrowthSelection):
    """DyRep's selection: the ``count`` highest scores among the growable sites (ties: by name)."""

    def choose(self, scores: Mapping[str, float], kinds: Mapping[str, list[str]], count: int,
               cut: Mapping[str, Sequence[str]], blocks: Mapping[str, RepConv2d]) -> dict[str, list[str]]:
        """The best-scored growable sites."""
        ranked = sorted(((v, n) for n, v in scores.items() if n in kinds), key=lambda t: (-t[0], t[1]))
        return {name: kinds[name] for _, name in ranked[:count]}

    def __repr__(self) -> str:
        return "TopScores()"


class WithinBudget(GrowthSelection):
    """Growth under a cap on the structure's predicted step time (:class:`~dyrep_fx.cost_model.Budget`):
    sites ranked by score per unit of predicted added cost, taken while the structure fits; the cuts of
    the same step make room first."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget

    def choose(self, scores: Mapping[str, float], kinds: Mapping[str, list[str]], count: int,
               cut: Mapping[str, Sequence[str]], blocks: Mapping[str, RepConv2d]) -> dict[str, list[str]]:
        """Up to ``count`` sites by score per unit of added cost, while the structure fits the budget."""
        budget = self.budget
        spent = budget.added(dict(blocks)) - sum(budget.saving(n, blocks[n], k) for n, k in cut.items() if n in blocks)
        costs = {name: budget.growth(name, kinds[name]) for name in kinds if name in scores}
        ranked = sorted(((scores[n] / c, n) for n, c in costs.items() if c is not None and c > 0),
                        key=lambda t: (-t[0], t[1]))
        chosen: dict[str, list[str]] = {}
        for _, name in ranked:
            if len(chosen) == count:
                break
            if budget.ratio(spent + costs[name]) <= budget.limit:
                chosen[name] = kinds[name]
                spent += costs[name]
        return chosen

    def __repr__(self) -> str:
        return f"WithinBudget(limit={self.budget.limit:g})"
