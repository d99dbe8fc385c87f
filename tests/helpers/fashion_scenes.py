"""Detection / segmentation scenes made of real Fashion-MNIST items, and mm models from shipped configs.

Each scene is a ``size x size`` RGB canvas cut into a ``grid x grid`` layout; every cell holds one
Fashion-MNIST image, upscaled to the cell. Ground truth comes from the item's own pixels: its box is the
bounding box of the pixels above ``threshold``, and its semantic mask labels those pixels with its class.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dyrep_fx_examples.data import load_fashion_mnist

#: Semantic label of the pixels around the items (Fashion-MNIST classes are 0..9).
BACKGROUND = 10


@dataclass
class Scene:
    """One canvas and its ground truth."""

    image: torch.Tensor  # uint8, 3 x H x W
    boxes: torch.Tensor  # float32, K x 4, (x1, y1, x2, y2) in pixels
    labels: torch.Tensor  # int64, K
    semantic: torch.Tensor  # int64, H x W: class id on item pixels, BACKGROUND elsewhere


def fashion_scenes(num: int = 2, size: int = 128, grid: int = 2, threshold: int = 20) -> list[Scene]:
    """``num`` scenes made of the test images of a class-balanced subset (deterministic)."""
    per_scene = grid * grid
    needed = num * per_scene
    # A class-balanced subset (in file order), so that each scene holds several classes.
    images, labels = load_fashion_mnist("test", limit=-(-needed // 10) * 10)
    images, labels = images[:needed], labels[:needed]
    cell = size // grid
    tiles = F.interpolate(images[:, None].float(), size=(cell, cell), mode="bilinear", align_corners=False)
    tiles = tiles.round().clamp_(0, 255).to(torch.uint8)[:, 0]
    scenes = []
    for s in range(num):
        canvas = torch.zeros(size, size, dtype=torch.uint8)
        semantic = torch.full((size, size), BACKGROUND, dtype=torch.int64)
        boxes, cls = [], []
        for k in range(per_scene):
            i = s * per_scene + k
            y0, x0 = (k // grid) * cell, (k % grid) * cell
            tile = tiles[i]
            canvas[y0 : y0 + cell, x0 : x0 + cell] = tile
            fg = tile > threshold
            ys, xs = torch.nonzero(fg, as_tuple=True)
            semantic[y0 : y0 + cell, x0 : x0 + cell][fg] = labels[i]
            boxes.append(
                [
                    x0 + xs.min().item(),
                    y0 + ys.min().item(),
                    x0 + xs.max().item() + 1,
                    y0 + ys.max().item() + 1,
                ]
            )
            cls.append(labels[i].item())
        scenes.append(
            Scene(
                image=canvas.expand(3, size, size).contiguous(),
                boxes=torch.tensor(boxes, dtype=torch.float32),
                labels=torch.tensor(cls, dtype=torch.int64),
                semantic=semantic,
            )
        )
    return scenes


def _meta(scene: Scene) -> dict[str, Any]:
    h, w = scene.image.shape[-2:]
    return {"img_shape": (h, w), "ori_shape": (h, w), "pad_shape": (h, w), "scale_factor": (1.0, 1.0)}


def det_batch(scenes: list[Scene]) -> dict[str, list]:
    """An mmdet batch (``inputs`` + ``DetDataSample`` with ``gt_instances``), as a dataloader gives it."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    samples = []
    for scene in scenes:
        sample = DetDataSample(metainfo=_meta(scene))
        sample.gt_instances = InstanceData(bboxes=scene.boxes.clone(), labels=scene.labels.clone())
        samples.append(sample)
    return {"inputs": [s.image.clone() for s in scenes], "data_samples": samples}


def seg_batch(scenes: list[Scene]) -> dict[str, list]:
    """An mmseg batch (``inputs`` + ``SegDataSample`` with ``gt_sem_seg``)."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    samples = []
    for scene in scenes:
        sample = SegDataSample(metainfo=_meta(scene))
        sample.gt_sem_seg = PixelData(data=scene.semantic[None].clone())
        samples.append(sample)
    return {"inputs": [s.image.clone() for s in scenes], "data_samples": samples}


def shipped_config(package: str, rel: str) -> Any:
    """Load ``rel`` from the configs shipped in ``<package>/.mim/configs`` ("mmdet" or "mmseg")."""
    import importlib

    from mmengine.config import Config

    pkg = importlib.import_module(package)
    path = os.path.join(os.path.dirname(pkg.__file__), ".mim", "configs", rel)
    return Config.fromfile(path)


@contextlib.contextmanager
def quiet_mmengine() -> Iterator[None]:
    """Silence mmengine's INFO log (``init_weights`` logs one record per parameter)."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _sync_bn_to_bn(node: Any) -> None:
    """Replace every ``type='SyncBN'`` in a nested config by ``'BN'`` (in place)."""
    if isinstance(node, dict):
        if node.get("type") == "SyncBN":
            node["type"] = "BN"
        for value in node.values():
            _sync_bn_to_bn(value)
    elif isinstance(node, list | tuple):
        for value in node:
            _sync_bn_to_bn(value)


def build_mmdet(rel: str) -> torch.nn.Module:
    """Build a detector from an mmdet shipped config, without pretrained weights (no network)."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    cfg = shipped_config("mmdet", rel)
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    with quiet_mmengine():
        model.init_weights()
    return model


def build_mmseg(rel: str, size: int) -> torch.nn.Module:
    """Build a segmentor from an mmseg shipped config: no pretrained weights, BN, ``size``-square inputs."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    init_default_scope("mmseg")
    cfg = shipped_config("mmseg", rel)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.pretrained = None
    model_cfg.data_preprocessor.size = (size, size)
    _sync_bn_to_bn(model_cfg)
    model = MODELS.build(model_cfg)
    with quiet_mmengine():
        model.init_weights()
    return model
