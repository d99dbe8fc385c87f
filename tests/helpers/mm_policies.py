"""User policies for DyRepHook tests, as a user's ``my_policies`` module would write them: a candidate rule,
a cut criterion and a scorer, each registered in :data:`dyrep_fx.mm.POLICIES` (:func:`register_policies`) or
named by their dotted path (``helpers.mm_policies.OnlySite``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from dyrep_fx.passes.analysis import Site
from dyrep_fx.policies import CandidateRule, Verdict


class OnlySite(CandidateRule):
    """Offers one site, by name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def offers(self, site: Site, model: nn.Module) -> bool:
        return site.name == self.name


class CutKind:
    """Cuts ``kind`` from every block that has it, whatever the importances."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def judge(self, importance: Mapping[str, float]) -> Verdict:
        cut = [self.kind] if self.kind in importance and len(importance) > 1 else []
        return Verdict(cut, 0.0, f"CutKind({self.kind!r})")


class OutChannels:
    """A scorer whose score is ``offset`` plus the conv's output channels (no gradient needed)."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def __call__(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.offset + weight.shape[0], dtype=torch.float64)


def register_policies() -> None:
    """Put the three in ``dyrep_fx.mm.POLICIES`` (idempotent), as ``custom_imports`` of their module would."""
    from dyrep_fx.mm import POLICIES

    for cls in (OnlySite, CutKind, OutChannels):
        POLICIES.register_module(module=cls, force=True)
