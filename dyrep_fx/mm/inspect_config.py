"""``dyrep-fx inspect CONFIG``: the conv sites DyRepHook would see in an OpenMMLab config's model.

The model is built from the config (no weights loaded or downloaded: ``init_weights`` is not called),
the targets and mode are those of the config's ``DyRepHook`` entry in ``custom_hooks`` (without one:
``["backbone"]``, the hook's default), each target's inputs are captured on one forward of a dummy image
through the model's data preprocessor and ``mode='tensor'`` (as the hook captures them on a real batch),
and each target is transformed with those example inputs, so shapes and call counts (5 for a head conv
shared by five pyramid levels) are known.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .. import api
from .inputs import capture_target_inputs
from .train import load_config

__all__ = ["ConfigInspection", "TargetSites", "config_image_size", "dyrep_hook_entry", "inspect_config"]

log = logging.getLogger(__name__)

#: The dummy image's size when neither the caller nor the config gives one.
DEFAULT_SIZE = (256, 256)
#: The targets of a ``DyRepHook`` entry that names none (the hook's default).
DEFAULT_TARGETS = ("backbone",)
_RESIZES = ("Resize", "RandomResize", "RandomChoiceResize", "FixScaleResize")
#: mmpretrain's crops give one side (an int) for a square image.
_SQUARE_CROPS = {"CenterCrop": "crop_size", "RandomResizedCrop": "scale", "RandomCrop": "crop_size"}
_DATA_SAMPLES = {"mmdet": ("mmdet.structures", "DetDataSample"), "mmseg": ("mmseg.structures", "SegDataSample"),
                 "mmpretrain": ("mmpretrain.structures", "DataSample")}


@dataclass
class TargetSites:
    """The sites of one target; ``input_shapes`` is None when the dummy forward did not reach it."""

    target: str
    sites: list[Any] = field(default_factory=list)
    input_shapes: list[Any] | None = None
    note: str | None = None


@dataclass
class ConfigInspection:
    """What :func:`inspect_config` found."""

    config: str
    model_type: str
    mode: str
    targets: list[str]
    hook_found: bool
    image_size: tuple[int, int]
    per_target: list[TargetSites]
    forward_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (sites as :meth:`Site.as_dict`)."""
        out = asdict(self)
        out["per_target"] = [{**asdict(t), "sites": [s.as_dict() for s in t.sites]} for t in self.per_target]
        return out


def dyrep_hook_entry(cfg: Any) -> dict[str, Any] | None:
    """The config's ``DyRepHook`` entry of ``custom_hooks`` (the first one), or None."""
    for hook in cfg.get("custom_hooks") or []:
        kind = hook.get("type")
        name = kind if isinstance(kind, str) else getattr(kind, "__name__", "")
        if name.rpartition(".")[2] == "DyRepHook":
            return dict(hook)
    return None


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


def config_image_size(cfg: Any) -> tuple[int, int] | None:
    """``(height, width)`` of the config's images, or None.

    mmseg's crop size (``model.data_preprocessor.size``, height first) if set, else the scale of the first
    resize step of the test / val / train pipeline (mmcv's ``scale`` is ``(width, height)``), or the last
    square crop of that pipeline (mmpretrain's ``CenterCrop`` / ``RandomResizedCrop``, one int).
    """
    size = _pair((cfg.model.get("data_preprocessor") or {}).get("size"))
    if size is not None:
        return size
    for key in ("test_dataloader", "val_dataloader", "train_dataloader"):
        dataset = (cfg.get(key) or {}).get("dataset") or {}
        pipeline = dataset.get("pipeline") or (dataset.get("dataset") or {}).get("pipeline") or []
        crop = None
        for step in pipeline:
            if step.get("type") in _RESIZES:
                scale = _pair(step.get("scale"))
                if scale is not None:
                    return scale[1], scale[0]
            side = step.get(_SQUARE_CROPS.get(step.get("type"), ""))
            if isinstance(side, int):
                crop = (side, side)
        if crop is not None:
            return crop
    return None


def _data_sample(scope: str | None, height: int, width: int) -> Any:
    cls = None
    if scope in _DATA_SAMPLES:
        module, name = _DATA_SAMPLES[scope]
        try:
            cls = getattr(importlib.import_module(module), name)
        except ImportError:
            cls = None
    if cls is None:
        from mmengine.structures import BaseDataElement as cls
    shape = (height, width)
    return cls(metainfo=dict(img_shape=shape, ori_shape=shape, pad_shape=shape, scale_factor=(1.0, 1.0),
                             img_id=0, img_path=""))


def dummy_batch(scope: str | None, height: int, width: int, seed: int = 0) -> dict[str, list]:
    """One random 8-bit image and its data sample, as a dataloader of the config's scope yields them."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
    return {"inputs": [image], "data_samples": [_data_sample(scope, height, width)]}


def _tensor_forward(model: nn.Module, batch: Any) -> Any:
    """The data preprocessor in test mode (no training-only steps), then ``mode='tensor'``."""
    data = model.data_preprocessor(batch, False)
    return model(**data, mode="tensor")


def _shapes(value: Any) -> Any:
    if torch.is_tensor(value):
        return list(value.shape)
    if isinstance(value, (list, tuple)):
        return [_shapes(v) for v in value]
    return type(value).__name__


def inspect_config(config: str | os.PathLike[str], size: tuple[int, int] | None = None,
                   mode: str | None = None, targets: list[str] | None = None,
                   cfg_options: list[str] | dict[str, Any] | None = None) -> ConfigInspection:
    """Build ``config``'s model and report the conv sites of each DyRep target (see the module docstring).

    Args:
        config: a config file, or ``package::path`` in the package's shipped configs.
        size: ``(height, width)`` of the dummy image (default: the config's, else 256 x 256).
        mode: ``"online"`` or ``"dbb"`` (default: the hook's mode, else online).
        targets: the submodules to inspect (default: the hook's targets, else ``["backbone"]``).
        cfg_options: overrides merged into the config (``key=value`` strings as for ``dyrep-fx train``).

    Raises:
        TrainConfigError: the config cannot be read or defines no model.
    """
    from .fold_checkpoint import build_model_from_config

    cfg = load_config(config, cfg_options)
    hook = dyrep_hook_entry(cfg)
    targets = list(targets or (hook or {}).get("targets", DEFAULT_TARGETS))
    mode = mode or (hook or {}).get("dyrep", {}).get("mode") or (hook or {}).get("mode", "online")
    height, width = size or config_image_size(cfg) or DEFAULT_SIZE
    model = build_model_from_config(cfg)
    model.train()  # as the Runner trains it: frozen stages, norm_eval
    present = [t for t in targets if _has_submodule(model, t)]
    captured: dict[str, tuple] = {}
    error = None
    try:
        captured = capture_target_inputs(model, dummy_batch(cfg.get("default_scope"), height, width), present,
                                         forward_fn=_tensor_forward)
    except Exception as exc:  # a model whose tensor mode needs more than a dummy image
        error = f"{type(exc).__name__}: {exc}"
        log.warning("the dummy forward of %s failed (%s): the targets are traced without example inputs",
                    config, error)
    report = []
    for target in targets:
        if target not in present:
            report.append(TargetSites(target, note=f"not a submodule of {type(model).__name__}"))
            continue
        report.append(_target_sites(model, target, captured.get(target), mode))
    return ConfigInspection(config=str(config), model_type=type(model).__name__, mode=mode, targets=targets,
                            hook_found=hook is not None, image_size=(height, width), per_target=report,
                            forward_error=error)


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _target_sites(model: nn.Module, target: str, inputs: tuple | None, mode: str) -> TargetSites:
    entry = TargetSites(target, input_shapes=None if inputs is None else _shapes(list(inputs)))
    if inputs is None:
        entry.note = "the model's tensor-mode forward does not run it: traced without example inputs"
    module = model.get_submodule(target)
    try:
        api.transform(module, inputs, mode=mode)
    except Exception as exc:
        entry.note = f"transform failed: {type(exc).__name__}: {exc}"
        return entry
    for site in api.sites(module):
        site.name = f"{target}.{site.name}"
        entry.sites.append(site)
    return entry
