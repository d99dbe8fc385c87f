"""Shared pieces of the OpenMMLab tests in ``tests/mm``: the configs in ``mm_configs/``, small-run settings,
and a hook that records what the model looked like while the real Runner trained it."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .hook_entry import set_hook_options

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "mm_configs"

#: Environment variables the configs read their data folders and checkpoint path from.
DEEPFOREST_ENV = "DYREP_DEEPFOREST"
FASHION_SEG_ENV = "DYREP_FASHION_SEG"
BACKBONE_CKPT_ENV = "DYREP_BACKBONE_CKPT"


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set environment variables inside the block only."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_config(rel: str, **env: str) -> Any:
    """``Config.fromfile(mm_configs/<rel>)`` with the given environment variables set while it parses."""
    from mmengine.config import Config

    with environ(**env):
        return Config.fromfile(str(CONFIG_DIR / rel))


def small_run(cfg: Any, work_dir: Path, max_iters: int, interval: int | None = None, *,
              batch_size: int | None = None, validate: bool = True, **hook_options: Any) -> Any:
    """A copy of ``cfg`` that trains ``max_iters`` iterations in ``work_dir`` quietly and saves a checkpoint
    at the end (and validates then, unless ``validate`` is False); its DyRepHook (if any) steps every
    ``interval`` iterations, never stopping, with ``hook_options`` on top."""
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f"{work_dir.name}_{uuid.uuid4().hex[:8]}"  # a fresh MessageHub / logger per run
    cfg.log_level = "WARNING"
    cfg.launcher = "none"
    cfg.train_cfg.max_iters = max_iters
    cfg.train_cfg.val_interval = max_iters
    if not validate:
        cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    if batch_size is not None:
        cfg.train_dataloader.batch_size = batch_size
    cfg.default_hooks.checkpoint.interval = max_iters
    cfg.default_hooks.logger.interval = 1
    for hook in cfg.get("custom_hooks", []):
        if hook["type"] == "DyRepHook":
            if interval is not None:
                set_hook_options(hook, interval=interval, until=None)
            set_hook_options(hook, **hook_options)
    return cfg


def set_image_scale(cfg: Any, scale: tuple[int, int]) -> None:
    """Set the ``Resize`` scale of the train and val pipelines of a detection config (in place)."""
    for loader in (cfg.train_dataloader, cfg.get("val_dataloader")):
        for step in (loader or {}).get("dataset", {}).get("pipeline", []):
            if step["type"] == "Resize":
                step["scale"] = scale


def without_dyrep(cfg: Any) -> Any:
    """The same config without its DyRepHook: the unmodified model the deploy checkpoint must load into."""
    cfg = copy.deepcopy(cfg)
    cfg.custom_hooks = [h for h in cfg.get("custom_hooks", []) if h["type"] != "DyRepHook"]
    return cfg


def build_model(cfg: Any) -> nn.Module:
    """Build ``cfg.model`` in the config's default scope (no weights initialised, no download)."""
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.utils import import_modules_from_strings

    if cfg.get("custom_imports"):
        import_modules_from_strings(**cfg.custom_imports)
    init_default_scope(cfg.get("default_scope", "mmdet"))
    return MODELS.build(copy.deepcopy(cfg.model))


def find_hook(runner: Any, name: str) -> Any:
    """The runner's hook of class ``name``."""
    return next(h for h in runner.hooks if type(h).__name__ == name)


def bn_modes(module: nn.Module) -> dict[str, bool]:
    """``training`` flag of every BatchNorm in ``module``."""
    return {name: m.training for name, m in module.named_modules() if isinstance(m, _BatchNorm)}


def flat_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a nested model output (``mode='tensor'``), in order."""
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flat_tensors(v)]
    return []


@torch.no_grad()
def tensor_outputs(model: nn.Module, batch: Any) -> list[torch.Tensor]:
    """The model's raw outputs (``mode='tensor'``) on one dataloader batch, in eval mode."""
    was = model.training
    model.eval()
    try:
        data = model.data_preprocessor(batch, False)
        return flat_tensors(model(**data, mode="tensor"))
    finally:
        model.train(was)


def make_recorder(backbone: str = "backbone") -> Any:
    """A hook (register it with ``runner.register_hook(rec, 'LOWEST')``) recording, per training iteration,
    the model's mode and its backbone's BatchNorm modes as the forward sees them, and the loss; the state
    the training starts from and a copy of the model then (``initial_model``); and the metrics of each
    validation."""
    from mmengine.hooks import Hook

    class TrainRecorder(Hook):
        def __init__(self) -> None:
            self.iters: list[dict[str, Any]] = []
            self.before_train_state: dict[str, torch.Tensor] | None = None
            self.val_metrics: list[dict[str, Any]] = []

        def before_train(self, runner) -> None:
            self.before_train_state = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
            # the model as training starts (targets traced, nothing grown: the initial function)
            self.initial_model = copy.deepcopy(runner.model)

        def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
            model = runner.model
            self.iters.append({"iter": runner.iter, "training": model.training,
                               "bn": bn_modes(model.get_submodule(backbone))})

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            self.iters[-1]["loss"] = float(outputs["loss"]) if outputs and "loss" in outputs else math.nan

        def after_val_epoch(self, runner, metrics=None) -> None:
            self.val_metrics.append(dict(metrics or {}))

    return TrainRecorder()


@torch.no_grad()
def evaluate(runner: Any, model: nn.Module) -> dict[str, Any]:
    """The config's validation metrics of ``model`` on the runner's validation data: what mmengine's
    ``ValLoop`` computes (``val_step`` per batch, the evaluator over all), without calling any hook."""
    was = model.training
    model.eval()
    try:
        evaluator = runner.val_loop.evaluator
        for batch in runner.val_dataloader:
            evaluator.process(data_samples=model.val_step(batch), data_batch=batch)
        return evaluator.evaluate(len(runner.val_dataloader.dataset))
    finally:
        model.train(was)


def optimizer_params(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    """``id(param) -> its param group`` over every group of ``optimizer``."""
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def load_deploy(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a folded deploy file written by DyRepHook or ``dyrep-fx fold``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["meta"]["dyrep_fx"] == "folded"
    return ckpt["state_dict"]


def assert_fold_command_equals_deploy(config: str, work_dir: Path, iters: int, out: Path, ema: bool = False) -> None:
    """``dyrep-fx fold`` (``--ema``) on the run's last checkpoint, in a fresh process without any
    unsafe-loading switch in its environment (the command scopes its own), gives exactly the hook's
    deploy file (its EMA deploy file)."""
    import subprocess
    import sys

    from helpers.launch import ROOT, clean_env

    ckpt = work_dir / f"iter_{iters}.pth"
    proc = subprocess.run([sys.executable, "-m", "dyrep_fx.cli", "fold", str(CONFIG_DIR / config), str(ckpt),
                           "-o", str(out), *(["--ema"] if ema else [])], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folded = load_deploy(out)
    deploy = load_deploy(work_dir / ("ema_dyrep_deploy.pth" if ema else "dyrep_deploy.pth"))
    assert list(folded) == list(deploy)
    for key in deploy:
        torch.testing.assert_close(folded[key], deploy[key], rtol=0, atol=0, msg=key)
