"""Loading mmengine checkpoints under torch >= 2.6, in one place.

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine 0.10.7 checkpoints hold
``HistoryBuffer`` objects and numpy arrays in ``message_hub``, which that mode refuses (upstream
open-mmlab/mmengine#1655). mmengine calls ``torch.load`` itself, so the switch has to be the one torch
reads at each call: ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``. It turns off safe loading, so it is set only
inside :func:`mmengine_checkpoint_loading` and only for checkpoints the user trusts. dyrep_fx's own data
(structures, controller state) is plain data and loads with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["mmengine_checkpoint_loading", "load_mmengine_checkpoint"]

_FLAG = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def mmengine_checkpoint_loading() -> Iterator[None]:
    """Within the block, ``torch.load`` calls without ``weights_only`` unpickle mmengine checkpoints."""
    old = os.environ.get(_FLAG)
    os.environ[_FLAG] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_FLAG, None)
        else:
            os.environ[_FLAG] = old


def load_mmengine_checkpoint(path: str, map_location: str = "cpu") -> dict[str, Any]:
    """Load a (trusted) mmengine checkpoint file."""
    with mmengine_checkpoint_loading():
        return torch.load(path, map_location=map_location)
