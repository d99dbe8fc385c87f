"""Every config in ``mm_configs/`` parses and builds its model; the full-size ones run a forward pass.

No COCO or Cityscapes data is needed: the models are built without their pretrained weights and run on real
Fashion-MNIST scenes of 128 x 128 through their own data preprocessor.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from helpers.mm_data import CONFIG_DIR, bn_modes, build_model, flat_tensors, load_config

from dyrep_fx_examples.datasets import fashion_mnist_segmentation

CONFIGS = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.py"))
FULL_SIZE = {
    "mmdet/retinanet_r50_fpn_1x_coco_dyrep.py": ("mmdet::retinanet/retinanet_r50_fpn_1x_coco.py", 80),
    "mmdet/faster-rcnn_r50_fpn_1x_coco_dyrep.py": ("mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", 80),
    "mmseg/pspnet_r50-d8_4xb2-80k_cityscapes-512x1024_dyrep.py":
        ("mmseg::pspnet/pspnet_r50-d8_4xb2-80k_cityscapes-512x1024.py", 19),
    "mmseg/deeplabv3_r50-d8_4xb2-80k_cityscapes-512x1024_dyrep.py":
        ("mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-80k_cityscapes-512x1024.py", 19),
}
CPU_DYREP = ["cpu/retinanet_r18_fpn_deepforest_dyrep.py", "cpu/fcn_r18_fashion_seg_dyrep.py",
             "cpu/resnet18_fashion_cls_dyrep.py"]


def test_every_config_is_listed():
    assert set(FULL_SIZE) | set(CPU_DYREP) <= set(CONFIGS)
    assert {"cpu/retinanet_r18_fpn_deepforest.py", "cpu/fcn_r18_fashion_seg.py",
            "cpu/retinanet_r18_fpn_deepforest_finetune.py"} <= set(CONFIGS)


@pytest.mark.parametrize("rel", CONFIGS)
def test_config_parses_and_builds(rel):
    cfg = load_config(rel)
    hooks = [h for h in cfg.get("custom_hooks", []) if h["type"] == "DyRepHook"]
    if rel.endswith("_dyrep.py"):
        assert len(hooks) == 1 and cfg.custom_imports.imports == ["dyrep_fx.mm"]
        assert not cfg.custom_imports.allow_failed_imports
        hook, dyrep = hooks[0], hooks[0]["dyrep"]
        # Growth stops at 80% of training (iterations), as DyRep stops at epoch 100 of 120 (epochs).
        if hook.get("by_epoch"):
            assert (dyrep["until"], cfg.train_cfg.max_epochs) == (100, 120)
        else:
            assert dyrep["until"] == pytest.approx(0.8 * cfg.train_cfg.get("max_iters", 87960), rel=0.01)
        assert dyrep["until"] // dyrep["interval"] >= 9
        assert not set(hook) - {"type", "targets", "by_epoch", "dyrep"}  # DyRep's options all in the block
    else:
        assert not hooks
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
    if rel.startswith("cpu/"):
        # The CPU configs train from scratch: nothing to download, no SyncBN in a single process.
        assert "SyncBatchNorm" not in {type(m).__name__ for m in model.modules()}
        init = cfg.model.backbone.get("init_cfg") or {}
        assert init.get("type") == "Pretrained" if rel.endswith("_finetune.py") else not init
        assert not cfg.model.get("pretrained")


def test_full_size_configs_only_add_the_hook():
    """The full-size configs are mmdet's / mmseg's shipped ones plus custom_imports and custom_hooks."""
    from mmengine.config import Config

    for rel, (base, _) in FULL_SIZE.items():
        ours = load_config(rel).to_dict()
        package, _, path = base.partition("::")
        root = Path(importlib.import_module(package).__file__).parent
        shipped = Config.fromfile(str(root / ".mim" / "configs" / path)).to_dict()
        assert set(ours) - set(shipped) == {"custom_imports", "custom_hooks"}, rel
        for key in shipped:
            if key != "custom_hooks":
                assert _unscoped(ours[key]) == _unscoped(shipped[key]), (rel, key)


def _unscoped(node):
    """A config value without mmengine's ``_scope_`` keys (added to package-scoped bases)."""
    if isinstance(node, dict):
        return {k: _unscoped(v) for k, v in node.items() if k != "_scope_"}
    if isinstance(node, (list, tuple)):
        return type(node)(_unscoped(v) for v in node)
    return node


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Two real 128 x 128 Fashion-MNIST scenes, as uint8 CHW tensors."""
    import numpy as np
    from PIL import Image

    root = fashion_mnist_segmentation(tmp_path_factory.mktemp("scenes"), 2, 128, n_val=0)
    return [torch.from_numpy(np.asarray(Image.open(p)).copy()).permute(2, 0, 1).contiguous()
            for p in sorted((root / "img_dir" / "train").glob("*.png"))]


@pytest.mark.parametrize("rel", sorted(FULL_SIZE))
def test_full_size_model_forward(rel, scenes):
    cfg = load_config(rel)
    if rel.startswith("mmseg/"):
        cfg.model.data_preprocessor.size = (128, 128)  # the Cityscapes crop size would pad to 512 x 1024
    model = build_model(cfg)  # init_weights is not called: no pretrained download
    model.eval()
    assert not any(bn_modes(model).values())
    from mmengine.structures import BaseDataElement

    samples = []
    for img in scenes:
        h, w = img.shape[-2:]
        samples.append(BaseDataElement(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                                                     scale_factor=(1.0, 1.0))))
    with torch.no_grad():
        data = model.data_preprocessor({"inputs": scenes, "data_samples": samples}, False)
        assert data["inputs"].shape == (2, 3, 128, 128)
        out = flat_tensors(model(**data, mode="tensor"))
    assert out and all(torch.isfinite(t).all() for t in out)
    num_classes = FULL_SIZE[rel][1]
    if rel.startswith("mmseg/"):
        assert out[0].shape == (2, num_classes, 16, 16)  # output stride 8
    elif "retinanet" in rel:
        assert out[0].shape == (2, 9 * num_classes, 16, 16)  # P3 class scores: 9 anchors x 80 classes
    else:
        assert any(t.shape[-1] == num_classes + 1 for t in out)  # the RoI head's class scores
