"""The runner's model wrapper around a model whose structure changed: unwrap it, rebuild a DDP wrapper,
and keep what mmengine's ``compile`` did to the old wrapper."""

from __future__ import annotations

from typing import Any

import torch
from mmengine.model import is_model_wrapper
from torch import nn

from ..distributed import rewrap_ddp

__all__ = ["COMPILED_STEPS", "compile_options", "rewrap_runner_model", "recompile_steps", "unwrap"]

#: The methods mmengine 0.10.7's Runner compiles when the config sets ``compile``: ``Runner.train``
#: replaces ``runner.model.train_step`` on the instance by ``torch.compile(runner.model.train_step,
#: **options)`` (``Runner._maybe_compile``), once, after wrapping the model and loading checkpoints.
COMPILED_STEPS: tuple[str, ...] = ("train_step",)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside an mmengine / torch model wrapper (DDP...), or ``model`` itself."""
    return model.module if is_model_wrapper(model) else model


def compile_options(compile_cfg: Any) -> dict | None:
    """The ``torch.compile`` keyword arguments of a config's ``compile`` entry as mmengine reads it:
    None (or False) -> None, no compiling; True -> ``{}``; a dict -> its items."""
    if compile_cfg is None or compile_cfg is False:
        return None
    return {} if compile_cfg is True else dict(compile_cfg)


def recompile_steps(old: nn.Module, new: nn.Module, compile_cfg: Any) -> list[str]:
    """Compile on ``new`` the steps (:data:`COMPILED_STEPS`) that mmengine compiled on ``old``; their names.

    A compiled step is ``torch.compile`` of the method bound to ``old``: it would keep training the old
    wrapper, so ``new`` gets its own, with the config's options. A step is taken as compiled when it sits
    on ``old``'s instance (the class defines it) and the config sets ``compile``: mmengine puts it there
    only then. The run's first wrapper is compiled after checkpoint loading, so a wrapper rebuilt while
    loading one has nothing to carry over.

    Each new wrapper and each new structure makes dynamo recompile the frames it reaches; past
    ``torch._dynamo.config.recompile_limit`` recompiles (8 in torch 2.x) it runs a frame eagerly, so a
    run with many changes should raise that limit to stay compiled.
    """
    options = compile_options(compile_cfg)
    if options is None:
        return []
    names = [name for name in COMPILED_STEPS if name in vars(old)]
    for name in names:
        setattr(new, name, torch.compile(getattr(new, name), **options))
    return names


def rewrap_runner_model(runner: Any) -> list[str] | None:
    """After a structural change, give ``runner`` a new DDP wrapper around its model; None if it has none.

    DDP registers parameters at construction, so it must be rebuilt: the one way to do it is
    :func:`dyrep_fx.distributed.rewrap_ddp` (the wrapper's class and settings as the runner built it from
    ``model_wrapper_cfg``, ``MMDistributedDataParallel``'s ``detect_anomalous_params`` too); it
    broadcasts rank 0's parameters and buffers, which the controller has already made identical. The
    steps mmengine compiled on the old wrapper are compiled on the new one; their names are returned
    (:func:`recompile_steps`).
    """
    old = runner.model
    if not isinstance(old, nn.parallel.DistributedDataParallel):
        return None
    extra = {"detect_anomalous_params": old.detect_anomalous_params} if hasattr(old, "detect_anomalous_params") else {}
    new = rewrap_ddp(old, **extra)
    compiled = recompile_steps(old, new, runner.cfg.get("compile"))
    runner.model = new
    return compiled
