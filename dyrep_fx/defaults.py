"""The library's default settings in one place, each with where it comes from.

Kind sets live with the geometry that decides where they apply (:mod:`dyrep_fx.geometry`).
"""

from __future__ import annotations

__all__ = ["GROW_AT_START", "INIT_SCALE", "STD_GATE", "THRESHOLD"]

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
