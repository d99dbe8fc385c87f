"""OpenMMLab integration: ``custom_imports=dict(imports=['dyrep_fx.mm'])`` registers :class:`DyRepHook`."""

from .checkpoint import mmengine_checkpoint_loading
from .hook import DyRepHook

__all__ = ["DyRepHook", "mmengine_checkpoint_loading"]
