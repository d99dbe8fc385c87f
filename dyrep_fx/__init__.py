"""dyrep_fx: dynamic structural re-parameterization (DyRep, OREPA) for any traceable PyTorch model.

Pipeline: trace (:mod:`dyrep_fx.tracing`) -> analyse (``passes.analysis``) -> grow / cut
(``passes.rep`` / ``passes.dep``) -> fold (``passes.fold``). The numerical core is
:mod:`dyrep_fx.kernels` (pure kernel algebra) and :class:`dyrep_fx.block.RepConv2d`.

    import dyrep_fx
    dyrep_fx.transform(model)          # in place
    dyrep_fx.grow(model)               # every eligible conv, every branch kind that applies
    deploy = dyrep_fx.fold(model)      # the original architecture again
    dyrep_fx.fuse_bn(deploy)           # inference only: conv + BatchNorm -> one conv

Each function goes through the model's :class:`~dyrep_fx.handle.Handle` (its trace, mode and initial
scale); the training controller :class:`DyRep` holds one handle per target. Each DyRep step decides a
:class:`StepPlan` with its policies (:mod:`dyrep_fx.policies`: the scorer, a :class:`CandidateRule` and a
:class:`CutCriterion`), then applies it.
"""

import logging

try:
    from . import passes
except ImportError as exc:  # an uninstalled checkout: passes/ becomes dyrep_fx.passes only when installed
    if "passes" not in str(exc):
        raise
    raise ImportError("dyrep_fx.passes is not importable: the graph passes live in the repository's passes/ "
                      "folder and install as dyrep_fx.passes; install the project with `pip install -e .` "
                      "(or `make env`) instead of running it from the checkout") from exc
from . import policies
from .api import blocks, cut, fold, fuse_bn, grow, restore, sites, structure, transform
from .block import MODES, RepConv2d
from .calibration import calibrate, calibrated
from .controller import DyRep, StepResult
from .handle import Handle
from .kinds import BRANCH_KINDS, DBB_KINDS, DYREP_KINDS, OREPA_KINDS
from .passes.dep import CutCriterion, DepCriterion
from .policies import CandidateRule, DyRepCandidates
from .step_plan import StepPlan

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "transform", "sites", "grow", "cut", "fold", "structure", "restore", "blocks", "fuse_bn", "calibrate", "calibrated",
    "Handle",
    "DyRep", "StepResult", "StepPlan", "policies", "CandidateRule", "DyRepCandidates", "CutCriterion",
    "DepCriterion", "RepConv2d", "MODES", "BRANCH_KINDS", "DBB_KINDS", "DYREP_KINDS", "OREPA_KINDS", "passes", "__version__",
]
