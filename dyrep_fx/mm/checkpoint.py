"""DyRep's entry in mmengine checkpoints, and loading mmengine checkpoints under torch >= 2.6.

Every checkpoint saved by a run with DyRepHook holds the structure and the controller's state under
:data:`STATE_KEY`.

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

__all__ = ["STATE_KEY", "is_resuming", "load_mmengine_checkpoint", "mmengine_checkpoint_loading",
           "scope_checkpoint_loading"]

#: The checkpoint entry holding DyRep's structure and controller state.
STATE_KEY = "dyrep_fx"

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


def scope_checkpoint_loading(runner) -> None:
    """Run the runner's next ``load_or_resume`` (where mmengine loads ``resume`` / ``load_from``) inside
    :func:`mmengine_checkpoint_loading`; that call only, then the runner's own method is back.

    ``Runner.train`` / ``val`` / ``test`` call ``before_run`` and then ``load_or_resume``, and no hook
    event lies between them, so this is the narrowest scope a hook can give the switch.
    """
    previous = runner.__dict__.get("load_or_resume")
    original = runner.load_or_resume

    def load_or_resume():
        try:
            with mmengine_checkpoint_loading():
                return original()
        finally:
            if previous is None:
                runner.__dict__.pop("load_or_resume", None)
            else:
                runner.load_or_resume = previous

    runner.load_or_resume = load_or_resume


def is_resuming(runner) -> bool:
    """Whether the runner's checkpoint load is a resume (``resume=True``) rather than a ``load_from``.

    mmengine 0.10.7's ``Runner.load_or_resume`` resumes exactly when the runner's ``resume`` argument
    (``cfg.resume``, kept as ``runner._resume``) is true, and loads ``load_from`` as weights otherwise; both
    go through ``Runner.load_checkpoint``, which fires ``after_load_checkpoint``.
    """
    flag = getattr(runner, "_resume", None)
    if flag is None:
        cfg = getattr(runner, "cfg", None)
        flag = cfg.get("resume", False) if cfg is not None else False
    return bool(flag)
