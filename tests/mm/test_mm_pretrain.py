"""DyRep in mmpretrain: ``ImageClassifier`` models from mmpretrain's shipped configs, trained by mmengine's
Runner through ``dyrep-fx train``'s code path on real Fashion-MNIST items read by mmpretrain's
``CustomDataset``.

One short run of ``mm_configs/cpu/resnet18_fashion_cls_dyrep.py`` with mmengine's ``EMAHook`` (a DyRep step
every 2 iterations) is shared by most tests: its deploy files load strictly into the unmodified config with
the same outputs, ``dyrep-fx fold`` gives the same file, ``resume`` and ``load_from`` (with mmpretrain's own
LARS optimizer) start from its checkpoints. mmpretrain's layer-wise lr decay places new branches in their
conv's layer; targets without convolutions are refused before training; ``dyrep-fx inspect`` reads
mmpretrain configs. Grown ResNet-50, RepVGG-A0 and MobileOne-s0 models of mmpretrain's shipped configs
fold into those configs unmodified, and RepVGG's and MobileOne's own re-parameterization composes with
DyRep's.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import pytest
import torch
from helpers.mm_data import (
    CONFIG_DIR,
    assert_fold_command_equals_deploy,
    evaluate,
    find_hook,
    flat_tensors,
    load_config,
    load_deploy,
    optimizer_params,
    tensor_outputs,
)

from dyrep_fx import api, cli
from dyrep_fx.mm.fold_checkpoint import build_model_from_config, fold_targets
from dyrep_fx.mm.train import train_from_config

pytest.importorskip("mmpretrain")
pytestmark = pytest.mark.slow

CONFIG = "cpu/resnet18_fashion_cls_dyrep.py"
PLAIN = "cpu/resnet18_fashion_cls.py"
ITERS, INTERVAL, BATCH = 6, 2, 8
#: Deploy vs grown model, float32: |got - ref| <= RTOL * |ref| + ATOL_FRACTION * max|ref| per output tensor.
RTOL, ATOL_FRACTION = 1e-4, 1e-5
EMA = dict(type="EMAHook", momentum=0.1, priority="ABOVE_NORMAL")  # as mmpretrain's configs list it


def tiny_options(root: Path, work_dir: Path, iters: int = ITERS, interval: int = INTERVAL, *,
                 hooks: list | None = None, **more) -> dict:
    """``cfg_options`` that make the CPU config a short quiet run on ``root``, a checkpoint every 3 iterations
    (the last one kept too), validated at the end, its DyRepHook stepping every ``interval`` iterations."""
    dyrep = dict(type="DyRepHook", targets=["backbone"], dyrep=dict(interval=interval, until=None, topk=1, mode="online"))
    return {
        "data_root": str(root), "train_dataloader.dataset.data_root": str(root),
        "val_dataloader.dataset.data_root": str(root), "test_dataloader.dataset.data_root": str(root),
        "train_dataloader.batch_size": BATCH, "val_dataloader.batch_size": 16,
        "train_cfg.max_iters": iters, "train_cfg.val_interval": iters,
        "default_hooks.checkpoint.interval": 3, "default_hooks.checkpoint.max_keep_ckpts": 4,
        "default_hooks.logger.interval": 1, "log_level": "WARNING",
        "experiment_name": f"{work_dir.name}_{uuid.uuid4().hex[:8]}",  # a fresh MessageHub per run
        "custom_hooks": [dyrep, *(hooks or [])], **more}


def train(root: Path, work_dir: Path, config: str = CONFIG, resume: str | None = None, **options):
    """``dyrep-fx train CONFIG --work-dir WORK_DIR [--resume CKPT] --cfg-options ...`` in this process;
    returns the runner."""
    return train_from_config(str(CONFIG_DIR / config), work_dir=str(work_dir),
                             cfg_options=tiny_options(root, work_dir, **options), resume=resume)


def plain_model(root: Path) -> torch.nn.Module:
    """The unmodified config's classifier (no hook), built as ``dyrep-fx fold`` builds it."""
    return build_model_from_config(load_config(PLAIN, DYREP_FASHION_CLS=str(root)))


def assert_same_outputs(model, reference, batch) -> None:
    ref, got = tensor_outputs(reference, batch), tensor_outputs(model, batch)
    assert len(ref) == len(got) == 1 and ref[0].shape == (16, 10)
    torch.testing.assert_close(got[0], ref[0], rtol=RTOL, atol=ATOL_FRACTION * ref[0].abs().max().item())


def test_fashion_classification_folder_reads_in_mmpretrain_custom_dataset(fashion_cls_root):
    """The folder written by dyrep_fx_examples.datasets gives the same samples through its annotation list and through
    its class folders alone (mmpretrain's CustomDataset, both ways); every class is in both splits."""
    from mmpretrain.datasets import CustomDataset

    from dyrep_fx_examples.datasets import FASHION_CLS_FOLDERS

    listed = CustomDataset(data_root=str(fashion_cls_root), ann_file="meta/train.txt", data_prefix="train")
    folders = CustomDataset(data_root=str(fashion_cls_root), data_prefix="train")
    assert folders.metainfo["classes"] == FASHION_CLS_FOLDERS
    pairs = sorted((d["img_path"], d["gt_label"]) for d in listed.load_data_list())
    assert pairs == sorted((d["img_path"], d["gt_label"]) for d in folders.load_data_list())
    assert len(pairs) == 96 and {label for _, label in pairs} == set(range(10))
    val = CustomDataset(data_root=str(fashion_cls_root), ann_file="meta/val.txt", data_prefix="val")
    assert len(val) == 30 and {val.get_data_info(i)["gt_label"] for i in range(30)} == set(range(10))


@pytest.fixture(scope="module")
def run(fashion_cls_root, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("cls_dyrep")
    return train(fashion_cls_root, work_dir, hooks=[EMA]), work_dir


def test_classifier_grows_its_backbone_with_ema(run):
    runner, _ = run
    ctl = find_hook(runner, "DyRepHook").controller
    assert [e["unit"] for e in ctl.history] == list(range(INTERVAL, ITERS + 1, INTERVAL))
    assert any(e["grown"] for e in ctl.history), ctl.history
    blocks = api.blocks(runner.model)
    assert blocks and all(name.startswith("backbone.") for name in blocks)
    # 20 sites in mmpretrain's ResNet-18 (stem, 16 block convs, 3 downsample convs), none frozen; grown
    # blocks add their branches' convs as nested sites.
    top = [s for s in ctl.sites() if ".branches." not in s.name]
    assert len(top) == 20 and all(s.eligible for s in top)
    # The EMA model follows the structure; every trainable parameter is in the optimizer.
    ema = find_hook(runner, "EMAHook").ema_model.module
    assert set(api.blocks(ema)) == set(blocks)
    groups = optimizer_params(runner.optim_wrapper.optimizer)
    assert {id(p) for p in runner.model.parameters() if p.requires_grad} <= set(groups)
    losses = runner.message_hub.get_scalar("train/loss").data[0].tolist()
    assert len(losses) == ITERS and all(math.isfinite(v) for v in losses), losses
    # mmpretrain's Accuracy on the held-out items, through the config's val loop (end of training)
    assert 0.0 <= evaluate(runner, runner.model)["accuracy/top1"] <= 100.0


@pytest.mark.parametrize("ema", [False, True], ids=["live", "ema"])
def test_deploy_loads_strictly_into_the_unmodified_config(run, fashion_cls_root, ema):
    runner, work_dir = run
    deploy = load_deploy(work_dir / ("ema_dyrep_deploy.pth" if ema else "dyrep_deploy.pth"))
    assert not [k for k in deploy if ".branches." in k or k.endswith("scale")]
    plain = plain_model(fashion_cls_root)
    plain.load_state_dict(deploy, strict=True)
    grown = find_hook(runner, "EMAHook").ema_model.module if ema else runner.model
    batch = next(iter(runner.val_dataloader))
    assert_same_outputs(plain, grown, batch)


def test_fold_command_gives_the_deploy_file(run, tmp_path):
    _, work_dir = run
    assert_fold_command_equals_deploy(CONFIG, work_dir, ITERS, tmp_path / "folded.pth")


def test_resume_goes_on_with_the_grown_structure(run, fashion_cls_root, tmp_path):
    """``dyrep-fx train --resume iter_3.pth``: the structure and DyRep's counters of iteration 3 come back
    before the weights load, and the run continues to the end with the steps due after it."""
    runner, work_dir = run
    ckpt = torch.load(work_dir / "iter_3.pth", map_location="cpu", weights_only=False)
    resumed = train(fashion_cls_root, tmp_path, hooks=[EMA], resume=str(work_dir / "iter_3.pth"))
    ctl = find_hook(resumed, "DyRepHook").controller
    first = find_hook(runner, "DyRepHook").controller
    assert ctl.history[:1] == first.history[:1]  # the step of iteration 2, restored, not taken again
    assert [e["unit"] for e in ctl.history] == [2, 4, 6]
    saved = {f"backbone.{name}" for name in ckpt["dyrep_fx"]["structures"]["backbone"]["sites"]}
    assert saved and saved <= set(api.blocks(resumed.model))
    plain = plain_model(fashion_cls_root)
    plain.load_state_dict(load_deploy(tmp_path / "dyrep_deploy.pth"), strict=True)


def test_load_from_with_mmpretrain_lars_restarts_the_schedule(run, fashion_cls_root, tmp_path):
    """``load_from`` a grown checkpoint without resume, training with mmpretrain's LARS optimizer: the grown
    structure is rebuilt so its weights load, DyRep's schedule starts over, and what grows next joins LARS."""
    runner, work_dir = run
    grown = set(api.blocks(runner.model))
    lars = dict(_delete_=True, type="LARS", lr=0.1, momentum=0.9, weight_decay=1e-4)
    tuned = train(fashion_cls_root, tmp_path, iters=4, interval=2, load_from=str(work_dir / f"iter_{ITERS}.pth"),
                  **{"optim_wrapper.optimizer": lars})
    optimizer = tuned.optim_wrapper.optimizer
    assert type(optimizer).__name__ == "LARS" and type(optimizer).__module__.startswith("mmpretrain")
    ctl = find_hook(tuned, "DyRepHook").controller
    assert [e["unit"] for e in ctl.history] == [2, 4]
    assert grown <= set(api.blocks(tuned.model))
    groups = optimizer_params(optimizer)
    assert {id(p) for p in tuned.model.parameters() if p.requires_grad} <= set(groups)
    assert all(torch.isfinite(p).all() for p in tuned.model.parameters())


def test_layer_decay_constructor_gives_new_branches_their_layers_lr(fashion_cls_root, tmp_path):
    """mmpretrain's LearningRateDecayOptimWrapperConstructor (layer-wise lr decay; its ResNet depths start at
    50): each new branch Parameter gets the layer id, lr scale and current lr of the conv it grew from."""
    decay = dict(_delete_=True, layer_decay_rate=0.8, norm_decay_mult=0.0)
    runner = train(fashion_cls_root, tmp_path, iters=2, interval=2, **{
        "model.backbone.depth": 50, "model.head.in_channels": 2048, "train_dataloader.batch_size": 4,
        "optim_wrapper.constructor": "LearningRateDecayOptimWrapperConstructor",
        "optim_wrapper.paramwise_cfg": decay, "param_scheduler.0.end": 100})
    groups = runner.optim_wrapper.optimizer.param_groups
    by_name = {g["param_name"]: g for g in groups}
    new = [g for g in groups if ".branches." in g["param_name"]]
    assert new and {g["layer_id"] for g in groups} == set(range(8))  # the stem, 6 layers, the head
    for group in new:
        source = by_name[group["param_name"].split(".branches.")[0] + ".weight"]
        assert (group["layer_id"], group["lr_scale"]) == (source["layer_id"], source["lr_scale"])
        assert group["lr"] == pytest.approx(source["lr"]) and group["lr"] < runner.optim_wrapper.optimizer.defaults["lr"]
        is_scale = group["param_name"].endswith("scale")
        assert group["weight_decay"] == (0.0 if is_scale else source["weight_decay"])


@pytest.mark.parametrize("target", ["neck", "head"])
def test_a_target_without_convolutions_is_refused_before_training(fashion_cls_root, tmp_path, target):
    """The GlobalAveragePooling neck and the LinearClsHead hold no conv: listing one stops the run before
    its first iteration, naming it (DyRep silently missing where the config asks for it would be worse)."""
    options = tiny_options(fashion_cls_root, tmp_path)
    options["custom_hooks"][0]["targets"] = ["backbone", target]
    with pytest.raises(ValueError, match=rf"hold no convolution.*{target} \((GlobalAveragePooling|LinearClsHead)\)"):
        train_from_config(str(CONFIG_DIR / CONFIG), work_dir=str(tmp_path), cfg_options=options)
    assert not list(tmp_path.glob("iter_*.pth"))


def test_inspect_mmpretrain_configs(capsys):
    """``dyrep-fx inspect`` on the CPU config (its test image size) and on mmpretrain's shipped R-50 config."""
    assert cli.main(["inspect", f"mm_configs/{CONFIG}"]) == 0
    out = capsys.readouterr().out
    assert "ImageClassifier, DyRep targets backbone (online mode), dummy input 1x3x64x64" in out
    assert "[backbone] 20 conv sites, 20 eligible" in out
    assert cli.main(["inspect", "mmpretrain::resnet/resnet50_8xb32_in1k.py", "--targets", "backbone,head"]) == 0
    out = capsys.readouterr().out
    assert "dummy input 1x3x224x224" in out and "[backbone] 53 conv sites, 53 eligible" in out
    assert "holds no convolution" in out.split("[head]")[1]


# -- mmpretrain's shipped models: ResNet-50, and RepVGG / MobileOne's own re-parameterization -----------


def _randomize_norms(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _real_batch(root: Path, count: int = 4, size: int = 64) -> dict:
    """``count`` validation items as a dataloader batch (BGR uint8, as LoadImageFromFile gives them)."""
    import numpy as np
    from mmengine.dataset import pseudo_collate
    from mmpretrain.structures import DataSample
    from PIL import Image

    paths = sorted((root / "val").glob("*/*.png"))[:count]
    images = [np.ascontiguousarray(np.asarray(Image.open(p).resize((size, size)))[:, :, ::-1]) for p in paths]
    return pseudo_collate([{"inputs": torch.from_numpy(im).permute(2, 0, 1).contiguous(),
                            "data_samples": DataSample()} for im in images])


@pytest.mark.parametrize("config, shipped, fuses", [
    (str(CONFIG_DIR / "mmpretrain/resnet50_8xb32_in1k_dyrep.py"), "mmpretrain::resnet/resnet50_8xb32_in1k.py", False),
    (str(CONFIG_DIR / "mmpretrain/repvgg-A0_8xb32_in1k_dyrep.py"), "mmpretrain::repvgg/repvgg-A0_8xb32_in1k.py", True),
    ("mmpretrain::mobileone/mobileone-s0_8xb32_in1k.py", "mmpretrain::mobileone/mobileone-s0_8xb32_in1k.py", True),
], ids=["resnet50", "repvgg-A0", "mobileone-s0"])
@torch.no_grad()
def test_folded_classifier_loads_into_the_shipped_config(fashion_cls_root, config, shipped, fuses):
    """DyRep grows branches onto convs of mmpretrain's models (for RepVGG and MobileOne, convs inside the
    blocks' own branches); the fold loads strictly into the model of mmpretrain's shipped, unmodified config
    with the same outputs, and for RepVGG / MobileOne mmpretrain's switch_to_deploy() then fuses each block
    into one conv: the same function at every step, on real images."""
    model = build_model_from_config(load_config_path(config)).eval()
    _randomize_norms(model, 0)
    data = model.data_preprocessor(_real_batch(fashion_cls_root), False)
    api.transform(model.backbone, (data["inputs"],))
    names = [s.name for s in api.sites(model.backbone) if s.eligible][2:8]
    if fuses:
        assert all(".branch" in n for n in names), names  # convs inside the blocks' own branches
    api.grow(model.backbone, names)
    g = torch.Generator().manual_seed(1)
    for name, p in model.backbone.named_parameters():
        if ".branches." in name or name.endswith("scale"):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)  # trained branches, not the neutral start
    grown = flat_tensors(model(**data, mode="tensor"))[0]

    plain = build_model_from_config(load_config_path(shipped)).eval()
    plain.load_state_dict(fold_targets(model, ["backbone"]).state_dict(), strict=True)
    outputs = [flat_tensors(plain(**data, mode="tensor"))[0]]
    if fuses:
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in plain.modules())
        plain.backbone.switch_to_deploy()
        assert sum(isinstance(m, torch.nn.Conv2d) for m in plain.modules()) < convs  # the blocks were fused
        outputs.append(flat_tensors(plain(**data, mode="tensor"))[0])
    for out in outputs:
        torch.testing.assert_close(out, grown, rtol=1e-4, atol=1e-5 * grown.abs().max().item())


def load_config_path(config: str):
    """A config file, or a shipped one (``package::path``), as mmengine's Config."""
    from mmengine.config import Config

    from dyrep_fx.mm.train import resolve_config_path

    return Config.fromfile(str(resolve_config_path(config)))
