"""OpenMMLab integration: ``custom_imports=dict(imports=['dyrep_fx.mm'])`` registers :class:`DyRepHook`;
:data:`POLICIES` is the registry a config names its own DyRep policies from (:mod:`~dyrep_fx.mm.dyrep_options`)."""

from .checkpoint import mmengine_checkpoint_loading
from .dyrep_options import POLICIES
from .hook import DyRepHook

__all__ = ["DyRepHook", "POLICIES", "mmengine_checkpoint_loading"]
