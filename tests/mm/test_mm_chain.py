"""The downstream chain, each step one config and one command, run by the real Runners on CPU (tiny runs):

(a) ``resnet18_fashion_cls_dyrep.py``: an mmpretrain ResNet-18 classifier trained with DyRep on Fashion-MNIST;
(b) ``dyrep-fx fold`` of its last checkpoint: the plain ResNet-18 classifier, which loads strictly into
    ``resnet18_fashion_cls.py`` and computes what the grown classifier computes;
(c) ``retinanet_r18_fpn_deepforest_cls_finetune.py`` (mmdet) and ``fcn_r18_fashion_seg_cls_finetune.py``
    (mmseg) start their backbones from it (``init_cfg=Pretrained``, ``prefix='backbone.'``).

Each hand-over is checked by values: the file the command writes is the hook's deploy file bit for bit, and
the detector's and segmentor's backbones hold exactly the folded classifier's backbone weights when their
training starts (the same names, none missing or unexpected).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.mm_data import (
    CONFIG_DIR,
    DEEPFOREST_ENV,
    FASHION_SEG_ENV,
    load_config,
    load_deploy,
    make_recorder,
    set_image_scale,
    small_run,
    tensor_outputs,
)

from dyrep_fx import api, cli
from dyrep_fx.mm.fold_checkpoint import build_model_from_config

pytest.importorskip("mmpretrain")
pytestmark = pytest.mark.slow

CLS_ITERS, CLS_INTERVAL = 4, 2
CLS_CONFIG = str(CONFIG_DIR / "cpu/resnet18_fashion_cls_dyrep.py")
CLS_ENV = "DYREP_FASHION_CLS"
CKPT_ENV = "DYREP_CLS_CKPT"


def backbone_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``backbone.`` entries of a state dict, without the prefix (what ``prefix='backbone.'`` loads)."""
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}


@pytest.fixture(scope="module")
def classifier(fashion_cls_root, tmp_path_factory) -> Path:
    """Step (a): ``dyrep-fx train resnet18_fashion_cls_dyrep.py`` in a fresh process (tiny: 4 iterations of 8
    images, a DyRep step every 2); returns its work dir."""
    import subprocess
    import sys

    from helpers.launch import ROOT, clean_env

    work_dir = tmp_path_factory.mktemp("chain_cls")
    options = ["train_dataloader.batch_size=8", f"train_cfg.max_iters={CLS_ITERS}",
               f"train_cfg.val_interval={CLS_ITERS}", f"default_hooks.checkpoint.interval={CLS_ITERS}",
               f"custom_hooks.0.dyrep.interval={CLS_INTERVAL}", "custom_hooks.0.dyrep.until=None", "log_level=WARNING"]
    proc = subprocess.run([sys.executable, "-m", "dyrep_fx.cli", "train", CLS_CONFIG, "--work-dir", str(work_dir),
                           "--cfg-options", *options], cwd=ROOT, env={**clean_env(), CLS_ENV: str(fashion_cls_root)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"finished at iteration {CLS_ITERS}" in proc.stdout
    return work_dir


@pytest.fixture(scope="module")
def folded(classifier, tmp_path_factory) -> Path:
    """Step (b): ``dyrep-fx fold resnet18_fashion_cls_dyrep.py iter_4.pth -o cls_deploy.pth``."""
    out = tmp_path_factory.mktemp("chain_fold") / "cls_deploy.pth"
    assert cli.main(["fold", CLS_CONFIG, str(classifier / f"iter_{CLS_ITERS}.pth"), "-o", str(out)]) == 0
    return out


def val_batch(cfg, count: int = 16) -> dict:
    """``count`` validation items through the config's own test pipeline (mmpretrain's CustomDataset)."""
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import DATASETS

    init_default_scope("mmpretrain")
    dataset = DATASETS.build(cfg.val_dataloader.dataset)
    return pseudo_collate([dataset[i] for i in range(count)])


def test_b_fold_gives_the_plain_classifier(classifier, folded, fashion_cls_root):
    """The command's file is the hook's deploy file bit for bit; it loads strictly into the config without the
    hook and computes what the grown classifier of the checkpoint computes (its structure restored)."""
    deploy = load_deploy(folded)
    hook_deploy = load_deploy(classifier / "dyrep_deploy.pth")
    assert list(deploy) == list(hook_deploy)
    for key, value in hook_deploy.items():
        torch.testing.assert_close(deploy[key], value, rtol=0, atol=0, msg=key)
    env = {CLS_ENV: str(fashion_cls_root)}
    plain = build_model_from_config(load_config("cpu/resnet18_fashion_cls.py", **env))
    plain.load_state_dict(deploy, strict=True)
    cfg = load_config("cpu/resnet18_fashion_cls_dyrep.py", **env)
    ckpt = torch.load(classifier / f"iter_{CLS_ITERS}.pth", map_location="cpu", weights_only=False)
    assert ckpt["dyrep_fx"]["structures"]["backbone"]["sites"], "nothing grew in step (a)"
    grown = build_model_from_config(cfg)
    api.restore(grown.backbone, ckpt["dyrep_fx"]["structures"]["backbone"])
    grown.load_state_dict(ckpt["state_dict"], strict=True)
    batch = val_batch(cfg)
    (ref,), (got,) = tensor_outputs(grown, batch), tensor_outputs(plain, batch)
    assert ref.shape == (16, 10)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def train_downstream(rel: str, work_dir: Path, folded: Path, scale: tuple[int, int] | None = None, **env: str):
    """Step (c): the fine-tuning config on the folded classifier, 2 iterations; the recorder keeps the model's
    state at ``before_train`` (after the Runner initialised the weights, i.e. loaded the backbone)."""
    from mmengine.runner import Runner

    cfg = small_run(load_config(rel, **{CKPT_ENV: str(folded), **env}), work_dir, 2, batch_size=1, validate=False)
    if scale is not None:
        set_image_scale(cfg, scale)
    assert cfg.model.backbone.init_cfg == dict(type="Pretrained", checkpoint=str(folded), prefix="backbone.")
    runner = Runner.from_cfg(cfg)
    recorder = make_recorder()
    runner.register_hook(recorder, "LOWEST")
    runner.train()
    return runner, recorder


def assert_backbone_starts_from(recorder, runner, folded: Path) -> None:
    """The backbone's state when training starts is the folded classifier's backbone: the same keys (none
    missing, none unexpected) and the same values, bit for bit."""
    expected = backbone_weights(load_deploy(folded))
    started = backbone_weights(recorder.before_train_state)
    assert sorted(started) == sorted(expected)
    assert sorted(runner.model.backbone.state_dict()) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(started[key], value, rtol=0, atol=0, msg=key)


def test_c_detector_backbone_starts_from_the_folded_classifier(folded, deepforest_root, tmp_path):
    runner, recorder = train_downstream("cpu/retinanet_r18_fpn_deepforest_cls_finetune.py", tmp_path, folded,
                                        scale=(160, 160), **{DEEPFOREST_ENV: str(deepforest_root)})
    assert type(runner.model).__name__ == "RetinaNet"
    assert_backbone_starts_from(recorder, runner, folded)
    # frozen_stages=1: the stem and stage 1 are still the classifier's after training
    expected = backbone_weights(load_deploy(folded))
    for key, value in runner.model.backbone.state_dict().items():
        if key.startswith(("conv1.", "bn1.", "layer1.")) and not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    assert all(torch.isfinite(torch.tensor(it["loss"])) for it in recorder.iters)


def test_c_segmentor_backbone_starts_from_the_folded_classifier(folded, fashion_seg_root, tmp_path):
    runner, recorder = train_downstream("cpu/fcn_r18_fashion_seg_cls_finetune.py", tmp_path, folded,
                                        **{FASHION_SEG_ENV: str(fashion_seg_root)})
    assert type(runner.model).__name__ == "EncoderDecoder" and type(runner.model.backbone).__name__ == "ResNet"
    assert_backbone_starts_from(recorder, runner, folded)
    assert all(torch.isfinite(torch.tensor(it["loss"])) for it in recorder.iters)


def test_resnet50_chain_names_line_up():
    """The GPU chain: the backbone of mmpretrain's ResNet-50 classifier (what resnet50_8xb32_in1k_dyrep.py
    folds to) loads strictly into the backbone of mmdet's shipped RetinaNet R-50 config."""
    from mmengine.config import Config

    from dyrep_fx.mm.train import resolve_config_path

    def build(config: str) -> torch.nn.Module:
        return build_model_from_config(Config.fromfile(str(resolve_config_path(config))))

    classifier = build(str(CONFIG_DIR / "mmpretrain/resnet50_8xb32_in1k_dyrep.py"))
    detector = build("mmdet::retinanet/retinanet_r50_fpn_1x_coco.py")
    weights = backbone_weights(classifier.state_dict())
    detector.backbone.load_state_dict(weights, strict=True)
    for key, value in detector.backbone.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0, msg=key)
