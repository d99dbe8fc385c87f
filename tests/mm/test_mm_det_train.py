"""RetinaNet R-18-FPN trained with DyRepHook by mmengine's own Runner on deepforest's aerial tree crowns.

One short real run (``mm_configs/cpu/retinanet_r18_fpn_deepforest_dyrep.py``, a DyRep step every 2 iterations,
stem and stage 1 frozen, ``norm_eval=True``) is shared by the tests of this module; then its folded
checkpoints are checked against the plain config, the ``dyrep-fx fold`` command and the fine-tuning config.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.mm_data import (
    BACKBONE_CKPT_ENV,
    DEEPFOREST_ENV,
    assert_fold_command_equals_deploy,
    build_model,
    evaluate,
    find_hook,
    load_config,
    load_deploy,
    make_recorder,
    optimizer_params,
    set_image_scale,
    small_run,
    tensor_outputs,
    without_dyrep,
)

from dyrep_fx import api
from dyrep_fx.block import RepConv2d

pytestmark = pytest.mark.slow

CONFIG = "cpu/retinanet_r18_fpn_deepforest_dyrep.py"
ITERS, INTERVAL = 4, 2
#: The test trains at 256 x 256 (the config: 320) with 1 image per batch, to keep it quick on 2 CPU cores.
SCALE, BATCH = (256, 256), 1
#: Deploy vs grown model, float32: |got - ref| <= RTOL * |ref| + ATOL_FRACTION * max|ref| per output tensor.
RTOL, ATOL_FRACTION = 1e-4, 1e-5
FROZEN = ("backbone.conv1", "backbone.layer1.")
#: Validation bbox mAP_50 the short run must gain over the model it started from (measured: +0.034).
MAP50_GAIN = 0.02


def train(cfg):
    from mmengine.runner import Runner

    runner = Runner.from_cfg(cfg)
    recorder = make_recorder()
    runner.register_hook(recorder, "LOWEST")
    runner.train()
    return runner, recorder


@pytest.fixture(scope="module")
def run(deepforest_root, tmp_path_factory):
    cfg = load_config(CONFIG, **{DEEPFOREST_ENV: str(deepforest_root)})
    cfg = small_run(cfg, tmp_path_factory.mktemp("retinanet_dyrep"), ITERS, INTERVAL, batch_size=BATCH)
    set_image_scale(cfg, SCALE)
    cfg.model.backbone.update(frozen_stages=1, norm_eval=True)  # as in COCO fine-tuning configs
    cfg.model.test_cfg.score_thr = 0.0  # a few iterations from scratch score < 0.05: let CocoMetric see boxes
    # No warm-up: 4 iterations of the config's 50-iteration linear warm-up (lr <= 8e-4) leave the detector
    # where it started (validation bbox mAP_50 0.002 before and after), so no check could tell a run that
    # trained from one that did not.
    cfg.param_scheduler = []
    runner, recorder = train(cfg)
    return SimpleNamespace(cfg=cfg, runner=runner, recorder=recorder, hook=find_hook(runner, "DyRepHook"),
                           work_dir=Path(cfg.work_dir), root=deepforest_root,
                           initial_metrics=evaluate(runner, recorder.initial_model))


def test_dyrep_grows_during_training_with_finite_loss(run):
    model = run.runner.model
    ctl = run.hook.controller
    assert [e["unit"] for e in ctl.history] == list(range(INTERVAL, ITERS + 1, INTERVAL))
    grown = {name for e in ctl.history for name in e["grown"]}
    assert grown, ctl.history
    blocks = api.blocks(model)
    assert blocks and all(isinstance(b, RepConv2d) for b in blocks.values())
    assert {name for name in grown if "branches" not in name} <= set(blocks)
    assert all(name.startswith(("backbone.", "neck.", "bbox_head.")) for name in blocks)
    # the head's own convs (depth 0); inner convs of grown branches are assembled once per forward, not per level
    head = [s for s in run.hook.controller.sites() if s.name.startswith("bbox_head.") and s.depth == 0]
    assert head and all(s.eligible and s.calls == 5 for s in head), [(s.name, s.calls, s.reason) for s in head]
    published = run.runner.message_hub.get_scalar("train/dyrep_blocks").current()
    assert published == sum(b.grown for b in blocks.values())
    branches = run.runner.message_hub.get_scalar("train/dyrep_branches").current()
    assert branches == sum(len(b.kinds) for b in blocks.values()) and branches >= published
    losses = [it["loss"] for it in run.recorder.iters]
    assert len(losses) == ITERS and all(math.isfinite(v) for v in losses), losses
    history = run.runner.message_hub.get_scalar("train/loss").data[0]
    assert len(history) == ITERS and all(math.isfinite(v) for v in history)
    # Validation ran on the grown model, and the run made it a better detector of the held-out tiles' trees
    # than the model it started from (evaluated the same way): guards that the optimizer's updates reached
    # the model that was validated; a run whose steps changed nothing (lr 0: checked) stays at the start.
    # Measured: bbox mAP_50 0.002 -> 0.036.
    (metrics,) = run.recorder.val_metrics
    assert metrics["coco/bbox_mAP_50"] >= run.initial_metrics["coco/bbox_mAP_50"] + MAP50_GAIN, \
        (metrics, run.initial_metrics)


def test_optimizer_holds_every_new_parameter(run):
    model = run.runner.model
    groups = optimizer_params(run.runner.optim_wrapper.optimizer)
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) <= set(groups), [trainable[i] for i in set(trainable) - set(groups)]
    model_ids = {id(p) for p in model.parameters()}
    assert set(groups) <= model_ids  # nothing stale (cut branches, replaced convs) left in the optimizer
    new = [n for n in trainable.values() if ".branches." in n or n.endswith("scale")]
    assert new


def test_frozen_stages_are_not_grown_and_norm_eval_holds(run):
    model = run.runner.model
    assert not [n for n in api.blocks(model) if n.startswith(FROZEN)]
    for site in run.hook.controller.sites():
        if site.name.startswith(FROZEN):
            assert not site.eligible and "frozen" in site.reason, (site.name, site.reason)
    # The frozen weights did not move.
    before = run.recorder.before_train_state
    now = model.state_dict()
    frozen_keys = [k for k in before if k.startswith(FROZEN) and k.endswith("weight")]
    assert frozen_keys and all(torch.equal(before[k], now[k]) for k in frozen_keys)
    # norm_eval=True: every backbone BatchNorm was in eval mode in every training forward (growth included).
    assert all(it["training"] for it in run.recorder.iters)
    assert all(it["bn"] and not any(it["bn"].values()) for it in run.recorder.iters)


def test_paramwise_cfg_gives_branch_scales_norm_decay(run):
    model = run.runner.model
    groups = optimizer_params(run.runner.optim_wrapper.optimizer)
    base_wd = run.cfg.optim_wrapper.optimizer.weight_decay
    assert run.cfg.optim_wrapper.paramwise_cfg.norm_decay_mult == 0.0
    scales = [(n, p) for n, p in model.named_parameters() if n.rpartition(".")[2] in ("scale", "main_scale")]
    assert scales
    for name, p in scales:
        assert groups[id(p)]["weight_decay"] == 0.0, name
    branch_convs = [(n, p) for n, p in model.named_parameters() if ".branches." in n and p.dim() == 4]
    assert branch_convs
    for name, p in branch_convs:
        assert groups[id(p)]["weight_decay"] == pytest.approx(base_wd), name
    bn = model.backbone.layer2[0].bn1.weight
    assert groups[id(bn)]["weight_decay"] == 0.0


def test_deploy_checkpoint_loads_strictly_and_computes_the_same(run):
    deploy = load_deploy(run.work_dir / "dyrep_deploy.pth")
    assert not [k for k in deploy if ".branches." in k or k.endswith("scale")]
    plain = build_model(without_dyrep(run.cfg))
    plain.load_state_dict(deploy, strict=True)
    baseline = build_model(load_config("cpu/retinanet_r18_fpn_deepforest.py"))
    baseline.load_state_dict(deploy, strict=True)  # the plain baseline config is the same architecture
    batch = next(iter(run.runner.val_dataloader))  # real held-out tiles, through the config's test pipeline
    ref = tensor_outputs(run.runner.model, batch)
    got = tensor_outputs(plain, batch)
    assert len(ref) == len(got) == 10  # 5 levels x (class scores, box deltas)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=RTOL, atol=ATOL_FRACTION * r.abs().max().item())


def test_fold_command_on_the_last_checkpoint_equals_the_deploy_file(run, tmp_path):
    assert_fold_command_equals_deploy(CONFIG, run.work_dir, ITERS, tmp_path / "folded.pth")


def test_finetune_config_starts_its_backbone_from_the_deploy_file(run, tmp_path):
    deploy_path = run.work_dir / "dyrep_deploy.pth"
    deploy = load_deploy(deploy_path)
    cfg = load_config("cpu/retinanet_r18_fpn_deepforest_finetune.py",
                      **{DEEPFOREST_ENV: str(run.root), BACKBONE_CKPT_ENV: str(deploy_path)})
    assert not [h for h in cfg.get("custom_hooks", []) if h["type"] == "DyRepHook"]
    assert cfg.model.backbone.init_cfg.checkpoint == str(deploy_path)
    backbone_keys = {k[len("backbone."):]: v for k, v in deploy.items() if k.startswith("backbone.")}

    model = build_model(cfg)
    model.init_weights()
    state = model.backbone.state_dict()
    assert set(state) == set(backbone_keys)
    for key, value in backbone_keys.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)

    cfg = small_run(cfg, tmp_path / "finetune", 2, batch_size=BATCH, validate=False)
    set_image_scale(cfg, SCALE)
    runner, recorder = train(cfg)
    start = recorder.before_train_state
    for key, value in backbone_keys.items():
        torch.testing.assert_close(start["backbone." + key], value, rtol=0, atol=0, msg=key)
    assert len(recorder.iters) == 2 and all(math.isfinite(it["loss"]) for it in recorder.iters)
    assert not api.blocks(runner.model)
    after = runner.model.state_dict()
    frozen = "layer1.0.conv1.weight"  # frozen_stages=1 in the fine-tuning config
    assert torch.equal(after["backbone." + frozen], backbone_keys[frozen])
    assert not torch.equal(after["backbone.layer4.1.conv2.weight"], backbone_keys["layer4.1.conv2.weight"])


@pytest.mark.parametrize("targets", [["backbone"], ["backbone", "neck"]])
def test_ema_hook_takes_every_growth(run, tmp_path, targets):
    """DyRepHook next to mmengine's EMAHook (whose averaged copy has requires_grad=False), also growing the
    FPN (which traces only with example inputs): the EMA copy takes every change, and its folded file
    (``ema_dyrep_deploy.pth``) loads strictly into the plain config."""
    cfg = small_run(run.cfg, tmp_path / "ema", 2, 1, batch_size=BATCH, validate=False, targets=targets)
    cfg.custom_hooks.append(dict(type="EMAHook", momentum=0.01))
    runner, recorder = train(cfg)
    assert all(math.isfinite(it["loss"]) for it in recorder.iters)
    ema = find_hook(runner, "EMAHook").ema_model.module
    assert set(api.blocks(ema)) == set(api.blocks(runner.model)) and api.blocks(ema)
    assert all(not p.requires_grad for p in ema.parameters())
    plain = build_model(without_dyrep(cfg))
    plain.load_state_dict(load_deploy(Path(cfg.work_dir) / "ema_dyrep_deploy.pth"), strict=True)
    # the EMA deploy file computes what the grown EMA model computes
    batch = next(iter(runner.train_dataloader))
    plain.data_preprocessor = ema.data_preprocessor
    for got, ref in zip(tensor_outputs(plain, batch), tensor_outputs(ema, batch)):
        assert (got - ref).abs().max() <= RTOL * ref.abs().max() + ATOL_FRACTION * ref.abs().max()
    # and `dyrep-fx fold --ema` on the last checkpoint writes exactly that file; without --ema, the live
    # model's (mmengine's EMAHook saves the EMA weights as the checkpoint's state_dict, the live ones aside)
    if targets == ["backbone", "neck"]:
        assert_fold_command_equals_deploy(CONFIG, Path(cfg.work_dir), 2, tmp_path / "ema_folded.pth", ema=True)
        assert_fold_command_equals_deploy(CONFIG, Path(cfg.work_dir), 2, tmp_path / "live_folded.pth")


@pytest.mark.parametrize("trust", [True, False])
def test_resume_loads_mmengine_checkpoints_only_when_trusted(run, tmp_path, trust):
    """mmengine's checkpoints need unpickling, which torch >= 2.6 refuses by default: DyRepHook allows it
    for the run's own load_or_resume when ``trust_checkpoint`` (the default), and not otherwise."""
    import os

    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ  # nothing global hides the refusal
    cfg = small_run(run.cfg, tmp_path / "resume", ITERS, INTERVAL, batch_size=BATCH, validate=False,
                    trust_checkpoint=trust)
    cfg.resume, cfg.load_from = True, str(run.work_dir / f"iter_{ITERS}.pth")
    if trust:
        runner, _ = train(cfg)
        assert runner.iter == ITERS and api.blocks(runner.model)
        assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ  # scoped to that one load
    else:
        with pytest.raises(Exception, match="(?i)weights.only"):
            train(cfg)
