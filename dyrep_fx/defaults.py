"""The library's default settings in one place, each with where it comes from.

Kind sets live with the geometry that decides where they apply (:mod:`dyrep_fx.geometry`).
"""

from __future__ import annotations

__all__ = ["INIT_SCALE", "STD_GATE", "THRESHOLD"]

#: Initial share of a new branch (its ``scale``, or its last BatchNorm's gamma): DyRep's 0.01.
INIT_SCALE: float = 0.01
#: Dep criterion: a block's branches are judged only when their importances' unbiased std exceeds
#: this (the reference's 0.02) ...
STD_GATE: float = 0.02
#: ... and then a branch below both their mean and this goes (the reference's lambda, 0.1).
THRESHOLD: float = 0.1
