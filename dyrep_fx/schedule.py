"""When a DyRep controller changes the structure, and how many sites each step grows.

The caller counts *units* (epochs or N iterations) by calling ``DyRep.step()`` once per unit. A step is due
every ``interval`` units up to ``until``; with ``grow_at_start`` the very first call is a step too, which
grows that fraction of the candidate sites, scored on the first iteration's gradients (at initialisation).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Schedule"]


@dataclass
class Schedule:
    """DyRep's step schedule (see the module docstring); refuses settings that cannot work.

    Args:
        interval: a step every ``interval`` units (>= 1).
        until: no step after this unit; ``None``: never stop.
        topk: sites grown per step (>= 0).
        grow_at_start: the fraction of the candidate sites grown at the first call, in ``[0, 1]``.
    """

    interval: int
    until: int | None
    topk: int
    grow_at_start: float

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError("interval must be >= 1")
        if self.topk < 0:
            raise ValueError(f"topk must be >= 0 (sites grown per step), got {self.topk}")
        if not 0.0 <= self.grow_at_start <= 1.0:
            raise ValueError(f"grow_at_start is a fraction of the candidate sites in [0, 1], got {self.grow_at_start}")

    def is_start(self, units: int, steps_done: int) -> bool:
        """Whether the next call is the ``grow_at_start`` step: the first unit, before any other step."""
        return self.grow_at_start > 0 and units == 0 and steps_done == 0

    def is_due(self, units: int, steps_done: int) -> bool:
        """Whether the next call (unit ``units + 1``) is a step."""
        unit = units + 1
        if self.is_start(units, steps_done):
            return True
        return unit % self.interval == 0 and (self.until is None or unit <= self.until)

    def growth_count(self, growable: int, units: int, steps_done: int) -> int:
        """How many of ``growable`` candidate sites the next step grows: ``topk``, or at the start step
        ``grow_at_start`` of them (rounded, at least one)."""
        if self.is_start(units, steps_done):
            return min(growable, max(1, round(self.grow_at_start * growable)))
        return min(growable, self.topk)
