"""The foundation the library stands on: the package imports, the OpenMMLab stack works on the CPU, and
torch.fx traces the backbones the library rewrites."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.fashion_scenes import BACKGROUND, build_mmdet, build_mmseg, det_batch, fashion_scenes, seg_batch

SIZE = 128  # input side; small so that one training step of each model stays around a second on 2 cores


def test_import_dyrep_fx() -> None:
    import dyrep_fx

    # A real package with an __init__.py, not an implicit namespace package.
    assert dyrep_fx.__file__ is not None


def test_import_mm_stack() -> None:
    import mmcv
    import mmcv.ops
    import mmdet
    import mmdet.models
    import mmengine
    import mmseg
    import mmseg.models

    assert mmcv.__version__ == "2.1.0"
    assert mmengine.__version__ == "0.10.7"
    assert mmdet.__version__ == "3.3.0"
    assert mmseg.__version__ == "1.2.2"
    assert mmdet.models.RetinaNet is not None and mmseg.models.EncoderDecoder is not None


def test_mmcv_nms_cpu() -> None:
    """The compiled mmcv extension is present and its CPU kernel runs (not a pure-Python fallback)."""
    from mmcv.ops import nms

    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 9.0]]
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    # Box 3 (score 0.95) suppresses boxes 0 and 1 (IoU 0.9 and ~0.6); box 2 does not overlap.
    assert keep.tolist() == [3, 2]
    torch.testing.assert_close(dets[:, 4], torch.tensor([0.95, 0.7]))
    torch.testing.assert_close(dets[:, :4], boxes[[3, 2]])


def test_fashion_scenes_ground_truth() -> None:
    scenes = fashion_scenes(num=2, size=SIZE)
    for scene in scenes:
        assert scene.image.shape == (3, SIZE, SIZE) and scene.image.dtype == torch.uint8
        assert len(scene.boxes) == 4 and len(set(scene.labels.tolist())) > 1
        for box, label in zip(scene.boxes, scene.labels, strict=True):
            x1, y1, x2, y2 = box.int().tolist()
            assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE
            assert (scene.semantic[y1:y2, x1:x2] == label).any()
        assert (scene.semantic == BACKGROUND).any()


def _train_step(model: torch.nn.Module, batch: dict) -> dict[str, float]:
    """One forward + backward through the model's own data preprocessor and loss parsing.

    Checks that the loss is finite and positive, that all gradients are finite, and that every top-level part
    of the model (backbone, neck, heads) received a non-zero gradient.
    """
    model.train()
    data = model.data_preprocessor(batch, True)
    losses = model(**data, mode="loss")
    loss, log_vars = model.parse_losses(losses)
    log_vars = {k: float(torch.as_tensor(v).detach()) for k, v in log_vars.items()}
    assert torch.isfinite(loss) and loss.item() > 0
    assert all(math.isfinite(v) for v in log_vars.values()), log_vars
    loss.backward()
    nonzero: dict[str, bool] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:  # e.g. the stages frozen by the config
            continue
        part = name.split(".")[0]
        assert p.grad is None or torch.isfinite(p.grad).all(), name
        nonzero[part] = nonzero.get(part, False) or (p.grad is not None and bool(p.grad.abs().sum() > 0))
    assert len(nonzero) >= 3 and all(nonzero.values()), nonzero
    return log_vars


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("retinanet/retinanet_r50_fpn_1x_coco.py", {"loss_cls", "loss_bbox"}),
        (
            "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
            {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"},
        ),
    ],
)
def test_mmdet_train_step(rel: str, expected: set[str]) -> None:
    torch.manual_seed(0)
    model = build_mmdet(rel)
    log_vars = _train_step(model, det_batch(fashion_scenes(num=2, size=SIZE)))
    assert expected <= set(log_vars)


@pytest.mark.slow
def test_mmseg_train_step() -> None:
    torch.manual_seed(0)
    model = build_mmseg("fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024.py", SIZE)
    assert not any(type(m).__name__ == "SyncBatchNorm" for m in model.modules())
    log_vars = _train_step(model, seg_batch(fashion_scenes(num=2, size=SIZE)))
    assert {"decode.loss_ce", "aux.loss_ce"} <= set(log_vars)


def _trace_and_compare(module: torch.nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    traced = torch.fx.symbolic_trace(module)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), module(x))
    return traced


def test_fx_trace_torchvision_resnet18() -> None:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None)
    model.eval()
    traced = _trace_and_compare(model, torch.randn(2, 3, 64, 64))
    assert sum(n.op == "call_module" and "conv" in n.target for n in traced.graph.nodes) == 17


def test_fx_trace_mmdet_resnet50() -> None:
    from mmdet.models.backbones import ResNet

    torch.manual_seed(0)
    model = ResNet(depth=50)
    model.eval()  # mmdet's ResNet.train() returns None: do not chain .eval()
    # Randomise the BN statistics so that eval-mode BN is not an identity.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 64, 64)
    traced = _trace_and_compare(model, x)
    with torch.no_grad():
        out = traced(x)
    assert isinstance(out, tuple) and [o.shape[1] for o in out] == [256, 512, 1024, 2048]
