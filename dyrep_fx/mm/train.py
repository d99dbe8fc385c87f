"""``dyrep-fx train CONFIG``: what mmdet's and mmseg's ``tools/train.py`` do, for any OpenMMLab config.

A pip-installed mmdet or mmseg ships no ``tools/train.py``; this module is its equivalent, used by the
``dyrep-fx train`` command (:func:`train_from_config` does it all):

* the config is a file, or ``package::path/in/its/configs.py`` (e.g. ``mmdet::retinanet/...``), found in
  the installed package's ``.mim/configs`` folder (mmengine takes ``package::`` only in ``_base_``);
* ``cfg_options`` (``key=value`` strings, parsed by mmengine's ``DictAction``) are merged into it;
* the work dir is the one given, else the config's ``work_dir``, else ``work_dirs/<config stem>``;
* ``resume``: ``"auto"`` resumes the latest checkpoint in the work dir, a path resumes that checkpoint;
* ``amp``: ``OptimWrapper`` becomes ``AmpOptimWrapper`` with a dynamic loss scale (CUDA only);
* ``launcher="pytorch"`` under torchrun. mmengine 0.10.7 cannot start that process group without a GPU
  (it calls ``torch.cuda.set_device`` first), so on a CPU machine a gloo group is started here from
  torchrun's environment before the Runner is built (the Runner then uses it), and the model wrapper
  is ``MMDistributedDataParallel`` with ``device_ids=None``.

The registries resolve in the config's ``default_scope`` (the Runner sets it). Problems with the
command's inputs raise :class:`TrainConfigError`, whose message says what is wrong.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import check_checkpoint_file

__all__ = [
    "TrainConfigError",
    "resolve_config_path",
    "load_config",
    "prepare_train_config",
    "start_cpu_process_group",
    "train_from_config",
]

log = logging.getLogger(__name__)

#: What torchrun puts in each rank's environment, and what ``launcher="pytorch"`` needs.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: The config entries a training run needs besides ``model``.
TRAIN_KEYS = ("train_dataloader", "train_cfg", "optim_wrapper")


class TrainConfigError(ValueError):
    """A config or command-line setting that cannot be trained; the message says what is wrong."""


def resolve_config_path(config: str | os.PathLike[str]) -> Path:
    """The config file: a path, or ``package::relative/path.py`` in ``<package>/.mim/configs``.

    Raises:
        TrainConfigError: the file does not exist, or the package is not installed.
    """
    text = str(config)
    if "::" not in text:
        path = Path(text)
        if not path.is_file():
            raise TrainConfigError(f"config file not found: {text}")
        return path
    package, _, rel = text.partition("::")
    if not package.isidentifier() or not rel or "::" in rel:
        raise TrainConfigError(f"{text!r}: a package config is written 'package::path/in/configs.py', "
                               "e.g. 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TrainConfigError(f"{text}: the package {package!r} is not installed")
    root = Path(next(iter(spec.submodule_search_locations))) / ".mim" / "configs"
    path = root / rel
    if not path.is_file():
        raise TrainConfigError(f"config {text} not found: {path} does not exist (the shipped configs of "
                               f"{package} are in {root})")
    return path


def parse_cfg_options(options: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` as mmengine's ``DictAction`` parses them (lists, tuples, numbers, None...)."""
    if not options:
        return {}
    from mmengine.config import DictAction

    bad = [o for o in options if "=" not in o]
    if bad:
        raise TrainConfigError(f"--cfg-options takes key=value pairs, got {bad}")
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--cfg-options", nargs="+", action=DictAction)
    return dict(parser.parse_args(["--cfg-options", *options]).cfg_options)


def load_config(config: str | os.PathLike[str], cfg_options: list[str] | dict[str, Any] | None = None) -> Any:
    """``mmengine.Config`` of ``config`` (see :func:`resolve_config_path`) with ``cfg_options`` merged in.

    Raises:
        TrainConfigError: the file is missing or does not parse, or it defines no ``model``.
    """
    from mmengine.config import Config

    path = resolve_config_path(config)
    try:
        cfg = Config.fromfile(str(path))
    except Exception as exc:  # syntax errors, missing _base_ files, failed custom_imports...
        raise TrainConfigError(f"cannot read config {path}: {type(exc).__name__}: {exc}") from exc
    options = cfg_options if isinstance(cfg_options, dict) else parse_cfg_options(cfg_options)
    if options:
        cfg.merge_from_dict(options)
    if not isinstance(cfg.get("model"), dict):
        raise TrainConfigError(f"{path} defines no 'model': not an OpenMMLab model config")
    return cfg


def prepare_train_config(
    cfg: Any,
    config: str | os.PathLike[str],
    *,
    work_dir: str | None = None,
    resume: str | None = None,
    launcher: str = "none",
    amp: bool = False,
    auto_scale_lr: bool = False,
) -> Any:
    """Apply the ``tools/train.py`` settings to ``cfg`` (in place; returned for convenience).

    Args:
        cfg: the loaded config (:func:`load_config`).
        config: its path as given (its stem names the default work dir).
        work_dir: overrides the config's ``work_dir``; without either, ``work_dirs/<config stem>``.
        resume: ``None`` (the config's own ``resume`` / ``load_from``), ``"auto"`` (the latest checkpoint
            in the work dir, if any) or a checkpoint path.
        launcher: ``"none"`` or ``"pytorch"`` (under torchrun).
        amp: switch ``OptimWrapper`` to ``AmpOptimWrapper`` (dynamic loss scale); needs a CUDA GPU.
        auto_scale_lr: enable the config's ``auto_scale_lr`` (it must give ``base_batch_size``).

    Raises:
        TrainConfigError: what cannot be honoured, with the reason.
        CheckpointError: the checkpoint to resume is empty, truncated, text, or not written by torch.save.
    """
    missing = [key for key in TRAIN_KEYS if not cfg.get(key)]
    if missing:
        raise TrainConfigError(f"{config} has no {', '.join(missing)}: nothing to train")
    if launcher not in ("none", "pytorch"):
        raise TrainConfigError(f"launcher must be 'none' or 'pytorch', got {launcher!r}")
    if not cfg.get("default_scope"):
        log.warning("%s sets no default_scope: its registries resolve in mmengine's own", config)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = str(work_dir)
    elif cfg.get("work_dir") is None:
        stem = Path(str(config).rpartition("::")[2]).stem
        cfg.work_dir = os.path.join("work_dirs", stem)
    if amp:
        _enable_amp(cfg)
    if auto_scale_lr:
        scale = cfg.get("auto_scale_lr")
        if not scale or "base_batch_size" not in scale:
            raise TrainConfigError(f"--auto-scale-lr: {config} has no auto_scale_lr with a base_batch_size")
        cfg.auto_scale_lr.enable = True
    if resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif resume is not None:
        if "://" not in resume and not Path(resume).is_file():
            raise TrainConfigError(f"checkpoint to resume not found: {resume}")
        if "://" not in resume:
            # a missing, truncated or non-checkpoint file: CheckpointError before the run starts (nothing is
            # unpickled here: the config's DyRepHook may not trust the file)
            check_checkpoint_file(resume)
        cfg.resume, cfg.load_from = True, resume
    if launcher == "pytorch" and not torch.cuda.is_available():
        wrapper = dict(cfg.get("model_wrapper_cfg") or {"type": "MMDistributedDataParallel"})
        if wrapper.get("type", "MMDistributedDataParallel") == "MMDistributedDataParallel":
            wrapper["device_ids"] = None  # DDP takes no device ids for a CPU module
        cfg.model_wrapper_cfg = wrapper
    return cfg


def _enable_amp(cfg: Any) -> None:
    if not torch.cuda.is_available():
        raise TrainConfigError("--amp needs a CUDA GPU (mmengine's AmpOptimWrapper runs CUDA autocast with a "
                               "loss scaler) and none is available: train without --amp")
    kind = cfg.optim_wrapper.get("type", "OptimWrapper")
    if kind == "AmpOptimWrapper":
        log.warning("AMP training is already enabled in the config (AmpOptimWrapper)")
        return
    if kind != "OptimWrapper":
        raise TrainConfigError(f"--amp turns OptimWrapper into AmpOptimWrapper; this config's optim_wrapper "
                               f"is a {kind}")
    cfg.optim_wrapper.type = "AmpOptimWrapper"
    cfg.optim_wrapper.loss_scale = "dynamic"


def start_cpu_process_group() -> bool:
    """Start a gloo process group from torchrun's environment, unless one is running; whether it started one.

    Raises:
        TrainConfigError: the process was not started by torchrun (its environment variables are missing).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    _check_torchrun_env()
    dist.init_process_group("gloo")
    return True


def _check_torchrun_env() -> None:
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise TrainConfigError(f"--launcher pytorch runs under torchrun, which sets {', '.join(missing)}; "
                               "start it as: torchrun --nproc_per_node N -m dyrep_fx.cli train CONFIG "
                               "--launcher pytorch")


def train_from_config(
    config: str | os.PathLike[str],
    *,
    work_dir: str | None = None,
    resume: str | None = None,
    cfg_options: list[str] | dict[str, Any] | None = None,
    launcher: str = "none",
    amp: bool = False,
    auto_scale_lr: bool = False,
) -> Any:
    """Load ``config``, apply the settings (:func:`prepare_train_config`), build mmengine's Runner (or the
    config's ``runner_type``) and train; returns the runner.

    With ``launcher="pytorch"`` and no GPU, the gloo group started here is destroyed after training.

    Raises:
        TrainConfigError: before training, for a config or setting that cannot be trained.
        CheckpointError: before training, for a checkpoint to resume that cannot be one (its bytes alone).
    """
    cfg = load_config(config, cfg_options)
    prepare_train_config(cfg, config, work_dir=work_dir, resume=resume, launcher=launcher, amp=amp,
                         auto_scale_lr=auto_scale_lr)
    started = False
    if launcher == "pytorch":
        if torch.cuda.is_available():
            _check_torchrun_env()  # mmengine starts the NCCL group itself
        else:
            started = start_cpu_process_group()
    try:
        from mmengine.registry import RUNNERS
        from mmengine.runner import Runner

        runner = RUNNERS.build(cfg) if "runner_type" in cfg else Runner.from_cfg(cfg)
        runner.train()
        return runner
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
