"""DyRep settings the step-mechanics tests are written against."""

from __future__ import annotations

from typing import Any

#: The paper's schedule with ``snip``, the library's defaults before issue 31: the first step after one
#: interval, one site per step, scores by ``sum(|grad * weight|)``. Tests of what a step does (intervals,
#: cuts, EMA, optimizer, checkpoints) count on a first step after ``interval`` units and on ``snip`` values
#: written out by hand; the defaults themselves (half the sites at the first call, ``snip_per_weight``)
#: are tested in test_growth_schedule.py and test_saliency.py.
PAPER_SCHEDULE: dict[str, Any] = {"grow_at_start": 0.0, "metric": "snip"}
