"""One-stage detection heads from mmdet's shipped configs: their shared convs grow, exactly.

RetinaNet, FCOS and ATSS heads run ``multi_apply`` over the pyramid levels (torch.fx cannot trace
it) and call every conv once per level. With DyRep on backbone, neck and bbox_head, the head's convs
are sites (calls counted at run time on the example inputs), grow in online mode (and in dbb mode
where the conv has a bias to carry the branches' BatchNorm shifts: RetinaNet's tower, every head's
prediction convs), keep the detector's function at growth (online: train and eval; dbb: eval), and,
once every BatchNorm's statistics and every branch scale are moved off their growth-time values, the
folded detector loads strictly into a model built from the unmodified config and computes the same.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers.numerics import randomise_bns, randomise_scales

import dyrep_fx
from dyrep_fx.controller import DYREP_KINDS

fold_targets = pytest.importorskip("dyrep_fx.mm.fold_checkpoint").fold_targets

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "retinanet": "retinanet/retinanet_r18_fpn_1x_coco.py",
    "fcos": "fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py",
    "atss": "atss/atss_r50_fpn_1x_coco.py",
}
TARGETS = ("backbone", "neck", "bbox_head")
#: float32 detector outputs: |got - ref| <= 1e-5 * max|ref| + 1e-4 * |ref|
ATOL_FRACTION, RTOL = 1e-5, 1e-4


def small_detector(key: str):
    """The config's detector with an R-18 backbone, 32-channel neck and head (no weights loaded)."""
    mmdet = pytest.importorskip("mmdet")
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    cfg = Config.fromfile(os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", CONFIGS[key]))
    model_cfg = cfg.model
    model_cfg.data_preprocessor = dict(type="DetDataPreprocessor")
    model_cfg.backbone.update(depth=18, init_cfg=None, style="pytorch", frozen_stages=-1, norm_eval=False)
    model_cfg.neck.update(in_channels=[64, 128, 256, 512], out_channels=32)
    model_cfg.bbox_head.update(in_channels=32, feat_channels=32, stacked_convs=2, num_classes=3)
    init_default_scope("mmdet")

    def build():
        torch.manual_seed(0)
        return MODELS.build(copy.deepcopy(model_cfg))

    return build


def target_inputs(model, images: torch.Tensor) -> dict[str, tuple]:
    with torch.no_grad():
        feats = model.backbone(images)
        levels = model.neck(feats)
    return {"backbone": (images,), "neck": (feats,), "bbox_head": (levels,)}


def outputs(model, images: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t for level in model(images, mode="tensor") for t in level]


def close(got: list[torch.Tensor], ref: list[torch.Tensor]) -> bool:
    scale = max(float(r.abs().max()) for r in ref)
    return all(torch.allclose(g, r, rtol=RTOL, atol=ATOL_FRACTION * scale) for g, r in zip(got, ref))


def perturb_head(model) -> None:
    """Give the head non-trivial biases and scales (fresh mmdet heads start near zero outputs)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.bbox_head.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def move_off_growth_values(model) -> None:
    """Random running statistics and affine values in every BatchNorm (the branches' included) and random
    branch scales of online blocks, as a few training steps would leave them."""
    randomise_bns(model, seed=4)
    randomise_scales(model, seed=5, branch_bound=0.2)


@pytest.mark.parametrize("mode", ["online", "dbb"])
@pytest.mark.parametrize("key", list(CONFIGS))
def test_head_convs_grow_and_fold_exactly(key, mode):
    build = small_detector(key)
    model = build()
    perturb_head(model)
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.eval()
    ctl = dyrep_fx.DyRep(model, opt, targets=TARGETS, example_inputs=target_inputs(model, images), mode=mode)
    head_sites = [s for s in ctl.sites() if s.name.startswith("bbox_head.")]
    grow = [s.name for s in head_sites if s.eligible]
    # every head conv is called once per pyramid level
    assert head_sites and all(s.calls == 5 for s in head_sites), [(s.name, s.calls) for s in head_sites]
    if mode == "online" or key == "retinanet":
        assert len(grow) == len(head_sites), {s.name: s.reason for s in head_sites if not s.eligible}
    else:  # GroupNorm towers: a bias-free conv before a GroupNorm cannot carry dbb branches
        towers = [s for s in head_sites if not s.eligible]
        assert towers and all("does not feed only a BatchNorm" in s.reason for s in towers)
        assert grow and all(not s.name.split(".")[1].endswith("_convs") for s in head_sites if s.name in grow)
    model.train()
    before_train = outputs(model, images)  # (train-mode BatchNorms update their statistics: first)
    model.eval()
    before_eval = outputs(model, images)
    head = model.bbox_head
    for site in head_sites:
        if site.eligible:
            local = site.name.removeprefix("bbox_head.")
            assert local in dyrep_fx.grow(head, [local], [k for k in DYREP_KINDS if k in site.kinds]).changed
    assert all(isinstance(model.get_submodule(n), dyrep_fx.RepConv2d) for n in grow)
    assert close(outputs(model, images), before_eval)
    if mode == "online":  # online blocks keep the function in train mode too
        model.train()
        assert close(outputs(model, images), before_train)
        model.eval()
    # Fold what training would have made of the blocks, not the growth-time state (fresh branch
    # BatchNorms at mean 0 / var 1, equal branch scales), which a fold ignoring either would match.
    move_off_growth_values(model)
    grown_eval = outputs(model, images)
    assert not close(grown_eval, before_eval)  # the function did move
    deploy = fold_targets(model, TARGETS)
    assert close(outputs(deploy.eval(), images), grown_eval)
    fresh = build()
    fresh.load_state_dict(deploy.state_dict(), strict=True)
    assert close(outputs(fresh.eval(), images), grown_eval)
