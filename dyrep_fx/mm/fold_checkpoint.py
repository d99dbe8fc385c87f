"""``dyrep-fx fold CONFIG CHECKPOINT -o OUT``: a DyRepHook training checkpoint -> a plain deploy checkpoint.

The model is built from the config as it is (the DyRepHook entry only matters for training), the
saved structure is rebuilt on it, the weights (or the EMA weights) are loaded, the targets are
folded, and ``{'meta', 'state_dict'}`` is saved: it loads with ``strict=True`` into the model of the
unmodified config.

A checkpoint that cannot be folded (missing, truncated, not an mmengine checkpoint, without DyRep's
structure, or of another model) raises :class:`~dyrep_fx.mm.checkpoint.CheckpointError` before anything
is written, with one line naming the file and the problem (``dyrep-fx fold`` prints it).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from mmengine.utils import import_modules_from_strings
from torch import nn

from .. import api
from .checkpoint import STATE_KEY, CheckpointError, one_line, read_checkpoint
from .train import load_config
from .wrappers import unwrap

__all__ = ["build_model_from_config", "fold_checkpoint", "fold_targets", "weights_mismatch", "weights_of"]

log = logging.getLogger(__name__)


def build_model_from_config(config: str | Config) -> nn.Module:
    """Build the config's model (no pretrained download: ``init_weights`` is not called)."""
    cfg = config if isinstance(config, Config) else Config.fromfile(config)
    if cfg.get("custom_imports"):
        import_modules_from_strings(**cfg["custom_imports"])
    init_default_scope(cfg.get("default_scope", "mmdet"))
    model = copy.deepcopy(cfg.model)
    if isinstance(model, dict) and cfg.get("data_preprocessor") is not None:
        # As mmengine's Runner does: mmpretrain configs give the preprocessor (mean, std) at the top level.
        model.setdefault("data_preprocessor", copy.deepcopy(cfg.data_preprocessor))
    return MODELS.build(model)


def fold_targets(model: nn.Module, targets: Sequence[str]) -> nn.Module:
    """A deep copy of ``model`` with every transformed target folded back to its original architecture."""
    deploy = copy.deepcopy(unwrap(model))
    for name in targets:
        target = deploy.get_submodule(name)
        if api.is_transformed(target):
            api.fold(target, inplace=True)
    return deploy


def weights_of(checkpoint: dict, use_ema: bool) -> dict[str, torch.Tensor]:
    """The live model's weights of an mmengine checkpoint, or with ``use_ema`` its EMA weights.

    mmengine's ``EMAHook`` swaps them when it saves: the checkpoint's ``state_dict`` holds the EMA
    weights (ready for evaluation) and ``ema_state_dict`` holds the live model's, under ``module.``
    next to a ``steps`` counter.
    """
    ema = checkpoint.get("ema_state_dict")
    if ema is None:
        if use_ema:
            raise ValueError("the checkpoint holds no EMA weights (no 'ema_state_dict'; was EMAHook in the config?)")
        return checkpoint["state_dict"]
    if use_ema:
        return checkpoint["state_dict"]
    return {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}


def weights_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps ``given`` from loading with ``strict=True`` into a model whose ``state_dict`` is
    ``expected`` (missing, unexpected and differently shaped entries, one example of each), or ``None``."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shaped = [k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's weights missing (e.g. {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} weights the model lacks (e.g. {unexpected[0]!r})")
    if shaped:
        k = shaped[0]
        parts.append(f"{len(shaped)} weights of another shape (e.g. {k!r}: {tuple(given[k].shape)} in the "
                     f"checkpoint, {tuple(expected[k].shape)} in the model)")
    return "; ".join(parts) or None


def fold_checkpoint(config: str, checkpoint: str, out: str, use_ema: bool = False) -> Path:
    """Fold ``checkpoint`` (trained with DyRepHook on ``config``) and write the plain checkpoint to ``out``.

    ``config`` is a file or ``package::path`` (as for ``dyrep-fx train``).

    Raises:
        CheckpointError: the checkpoint is missing or unreadable, is not an mmengine checkpoint, holds no
            DyRep structure (or no EMA weights with ``use_ema``), or does not fit the config's model (a
            checkpoint of another model); the one-line message names the file. Nothing is written.
        TrainConfigError: the config is missing or does not parse.
    """
    ckpt = read_checkpoint(checkpoint)
    state = ckpt.get(STATE_KEY)
    if not isinstance(state, Mapping) or not isinstance(state.get("structures"), Mapping):
        raise CheckpointError(f"checkpoint {checkpoint}: holds no DyRep structure (no {STATE_KEY!r} entry with "
                              "'structures'); was it saved by a run with DyRepHook? (a checkpoint of a plain "
                              "model needs no folding)")
    model = build_model_from_config(load_config(config))
    unfit = f"checkpoint {checkpoint} does not fit the model of {config} ({type(model).__name__}; a checkpoint " \
            "of another model?)"
    structures = state["structures"]
    for target, spec in structures.items():
        try:
            root = model.get_submodule(target) if target else model
        except AttributeError:
            raise CheckpointError(f"{unfit}: its DyRep target {target!r} is not a submodule of the model") from None
        try:
            api.restore(root, spec)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{unfit}: the structure of target {target!r}: {one_line(exc)}") from exc
    try:
        weights = weights_of(ckpt, use_ema)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {checkpoint}: {exc}") from exc
    mismatch = weights_mismatch(model.state_dict(), weights)
    if mismatch:
        raise CheckpointError(f"{unfit}: {mismatch}")
    model.load_state_dict(weights, strict=True)
    model.eval()
    deploy = fold_targets(model, list(structures))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {"dyrep_fx": "folded", "source": str(checkpoint), "ema": use_ema},
                "state_dict": deploy.state_dict()}, path)
    log.info("folded %s -> %s", checkpoint, path)
    return path
