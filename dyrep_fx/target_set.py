"""The targets a DyRep controller works on, seen as one: ``{prefix: Handle}`` with model-relative sites,
blocks and verdicts, and one site analysis per structure.

A controller trains one or several submodules of a model (its *targets*; :mod:`dyrep_fx.target_names`).
The site analysis (:func:`dyrep_fx.passes.analysis.analyse`) is the step's most expensive read of the
model; a step needs it twice (to decide, and afterwards for the next interval's watch list), so the
analysis made after a step is kept and handed to the next decision unless the model changed in between.
"Changed" is judged by a fingerprint of what the analysis reads: every module's name and class, and
every parameter's name, identity and ``requires_grad`` (growth, cuts, nesting, freezing, a parametrization
or a swapped module all change it).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

from torch import nn

from .block import RepConv2d
from .handle import Handle
from .passes.analysis import Site
from .passes.dep import CutCriterion
from .target_names import join_name

__all__ = ["TargetSet", "structure_fingerprint"]


def structure_fingerprint(module: nn.Module) -> tuple:
    """What the site analysis of ``module`` depends on, as a comparable value (see the module docstring)."""
    modules = tuple((name, type(m)) for name, m in module.named_modules())
    params = tuple((name, id(p), p.requires_grad) for name, p in module.named_parameters())
    return modules, params


class TargetSet(Mapping[str, Handle]):
    """The controller's targets by prefix (a read-only mapping of handles), answering for all of them.

    Args:
        handles: one :class:`~dyrep_fx.handle.Handle` per target, by its qualified name in the model
            (``""``: the whole model), all in one mode.
    """

    def __init__(self, handles: dict[str, Handle]) -> None:
        modes = {handle.mode for handle in handles.values()}
        if len(modes) != 1:
            raise ValueError(f"targets were transformed in different modes: {sorted(modes)}")
        self._handles = dict(handles)
        #: The last analysis, by prefix, with the fingerprints it was made at.
        self._kept: tuple[dict[str, tuple], dict[str, list[Site]]] | None = None

    def __getitem__(self, prefix: str) -> Handle:
        return self._handles[prefix]

    def __iter__(self) -> Iterator[str]:
        return iter(self._handles)

    def __len__(self) -> int:
        return len(self._handles)

    @property
    def mode(self) -> str:
        """The targets' mode, ``"online"`` or ``"dbb"``."""
        return next(iter(self._handles.values())).mode

    def analyse(self) -> dict[str, list[Site]]:
        """Every target's sites (named inside the target), by prefix: the kept analysis when no target
        changed since it was made, else a new one (then kept)."""
        prints = {prefix: structure_fingerprint(handle.module) for prefix, handle in self._handles.items()}
        if self._kept is not None and self._kept[0] == prints:
            return self._kept[1]
        analysis = {prefix: handle.sites() for prefix, handle in self._handles.items()}
        self._kept = (prints, analysis)
        return analysis

    def sites(self) -> list[Site]:
        """The sites of :meth:`analyse`, named relative to the model (copies; the kept analysis keeps its names)."""
        return [replace(site, name=join_name(prefix, site.name))
                for prefix, sites in self.analyse().items() for site in sites]

    def blocks(self) -> dict[str, RepConv2d]:
        """Every grown block of every target, by its name relative to the model."""
        return {join_name(prefix, local): block for prefix, handle in self._handles.items()
                for local, block in handle.blocks().items()}

    def judge(self, criterion: CutCriterion) -> dict[str, dict[str, Any]]:
        """Every block's importances and ``criterion``'s verdict on them, as plain data, model-relative."""
        return {join_name(prefix, local): verdict for prefix, handle in self._handles.items()
                for local, verdict in handle.judge(criterion).items()}
