"""dyrep_fx: dynamic structural re-parameterization (DyRep, OREPA) for any traceable PyTorch model.

Pipeline: trace (:mod:`dyrep_fx.tracing`) -> analyse (``passes.analysis``) -> plan -> rewrite
(``passes.rep`` / ``passes.dep``) -> fold (``passes.fold``). The numerical core is
:mod:`dyrep_fx.kernels` (pure kernel algebra) and :class:`dyrep_fx.block.RepConv2d`.
"""

import logging

from .block import MODES, RepConv2d
from .geometry import BRANCH_KINDS

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = ["RepConv2d", "MODES", "BRANCH_KINDS", "__version__"]
