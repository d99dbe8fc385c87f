"""The library's default settings in one place, each with where it comes from.

Kind sets live with the geometry that decides where they apply (:mod:`dyrep_fx.geometry`). ``DyRep``'s
other defaults and what they rest on (the depth sweep at 20 shortcut-free convs, 6 epochs, 5 paired seeds,
``benchmarks/README.md``):

* ``mode="online"``: as accurate as ``"dbb"`` for DyRep on the paper's schedule (-0.21 +- 0.25 points) at
  1.17x plain's step time against 2.68x.
* ``metric``: :data:`dyrep_fx.saliency.DEFAULT_METRIC` (see there); ``grow_at_start``:
  :data:`GROW_AT_START` (below).
* ``budget=None``: a cost cap filled from the start (``budget=1.1``) ended under ``orepa_all``
  (-0.70 +- 0.32) and did not separate from its random control (+0.57 +- 0.65).
* ``topk=1``, ``interval=5``: the paper's. Three sites per step on the paper's schedule (``topk=3``) did
  not beat one (+0.66 +- 0.35 over plain against +0.78 +- 0.32; +0.05 +- 0.26 over random sites); the
  interval was not varied.
* ``kinds=DYREP_KINDS``: the paper's set. Grown statically everywhere, OREPA's kinds and DyRep's tie
  (+2.00 +- 0.61 and +1.56 +- 0.34 over plain, online).

With 3x the training (18 epochs, 3 seeds) every gain over plain closed (issue 31), so these rest on
short schedules, where re-parameterization speeds up convergence.
"""

from __future__ import annotations

__all__ = ["GROW_AT_START", "INIT_SCALE", "PAPER_SCHEDULE", "STD_GATE", "THRESHOLD"]

#: Initial share of a new branch (its ``scale``, or its last BatchNorm's gamma): DyRep's 0.01.
INIT_SCALE: float = 0.01
#: Dep criterion: a block's branches are judged only when their importances' unbiased std exceeds
#: this (the reference's 0.02) ...
STD_GATE: float = 0.02
#: ... and then a branch below both their mean and this goes (the reference's lambda, 0.1).
THRESHOLD: float = 0.1
#: Fraction of the candidate sites DyRep grows at its first step, scored at initialisation (issue 31). The
#: depth sweep at 20 shortcut-free convs (5 paired seeds, ``benchmarks/README.md``): with ``0.5`` and
#: ``snip_per_weight`` DyRep is level with growing every conv from step 0 (``orepa_all``, -0.04 +- 0.13
#: points) at a lower step time (1.12x plain's over training against 1.28x) and beats random sites by
#: +1.11 +- 0.27; the paper's schedule (``0``: first growth after one interval) gains a third as much.
GROW_AT_START: float = 0.5
#: The paper's schedule with ``snip`` (``DyRep(**PAPER_SCHEDULE)``): the first step after one interval,
#: scores by ``sum(|grad * weight|)``; the defaults until issue 31. ``DyRepHook`` keeps it by default
#: (pretrained backbones, where growth at initialisation was not measured), and the committed studies and
#: the step-mechanics tests that ran or were written with it pin it.
PAPER_SCHEDULE: dict[str, float | str] = {"grow_at_start": 0.0, "metric": "snip"}
