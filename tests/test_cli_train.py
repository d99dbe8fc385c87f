"""``dyrep-fx train CONFIG``: mmdet's / mmseg's ``tools/train.py`` for pip installs, in fresh processes.

The small CPU RetinaNet config with DyRep (deepforest's tree crowns) trains 2 iterations at 256 x 256 with
one image per batch (``--cfg-options``), then ``--resume`` continues it to 4; the same 2 iterations run on
2 CPU ranks under torchrun (``--launcher pytorch``, gloo). Errors (a missing config, ``--amp`` without a GPU,
``--launcher pytorch`` outside torchrun) end with a message and exit code 2.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.launch import ROOT, clean_env, free_port

pytest.importorskip("mmdet")

from dyrep_fx import cli  # noqa: E402
from dyrep_fx.mm.checkpoint import load_mmengine_checkpoint  # noqa: E402
from dyrep_fx.mm.train import TORCHRUN_ENV, TrainConfigError, resolve_config_path  # noqa: E402

CONFIG = "mm_configs/cpu/retinanet_r18_fpn_deepforest_dyrep.py"
#: 256 x 256 (the config: 320), 1 image per batch, no validation, a DyRep step and a checkpoint every 2
#: iterations, quiet.
SMALL = ["val_cfg=None", "val_dataloader=None", "val_evaluator=None", "train_dataloader.batch_size=1",
         "train_dataloader.dataset.pipeline.2.scale=(256,256)", "default_hooks.checkpoint.interval=2",
         "custom_hooks.0.dyrep.interval=2", "log_level=WARNING"]
#: A BatchNorm bias the resume test shifts in the checkpoint (outside what DyRep rebuilds).
PLANTED = "backbone.layer4.1.bn2.bias"


@pytest.fixture(scope="module")
def deepforest_root(tmp_path_factory) -> Path:
    from dyrep_fx_examples.datasets import deepforest_coco

    return deepforest_coco(tmp_path_factory.mktemp("deepforest_coco"))


def run_cli(*args: str, data: Path | None = None, launcher: list[str] | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m dyrep_fx.cli ARGS`` (under ``launcher``, e.g. torchrun) in a fresh process, one thread."""
    env = clean_env()
    if data is not None:
        env["DYREP_DEEPFOREST"] = str(data)
    prefix = launcher or [sys.executable]
    return subprocess.run([*prefix, "-m", "dyrep_fx.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_train_writes_checkpoints_and_deploy_file_and_resumes(deepforest_root, tmp_path):
    work = tmp_path / "work"
    proc = run_cli("train", CONFIG, "--work-dir", str(work), "--cfg-options", "train_cfg.max_iters=2", *SMALL,
                   data=deepforest_root)
    assert proc.returncode == 0, output(proc)
    assert "finished at iteration 2" in proc.stdout
    assert (work / "iter_2.pth").is_file() and (work / "dyrep_deploy.pth").is_file()
    first = load_mmengine_checkpoint(str(work / "iter_2.pth"))
    assert first["meta"]["iter"] == 2 and first["dyrep_fx"]["units"] == 2
    grown = first["dyrep_fx"]["history"]
    assert [e["unit"] for e in grown] == [2] and grown[0]["grown"]
    # A fresh 4-iteration run makes the same step at unit 2 (same seed) and reaches the same counters: mark
    # the checkpoint's history and shift one of its weights, which only a run that loaded it can show.
    grown[0]["mark"] = "written into iter_2.pth by the test"
    saved = first["state_dict"][PLANTED].clone()
    first["state_dict"][PLANTED] += 1.0
    torch.save(first, work / "iter_2.pth")

    # --resume without a value: the latest checkpoint in the work dir; the iteration counter goes on
    proc = run_cli("train", CONFIG, "--work-dir", str(work), "--resume", "--cfg-options", "train_cfg.max_iters=4",
                   *SMALL, data=deepforest_root)
    assert proc.returncode == 0, output(proc)
    assert "finished at iteration 4" in proc.stdout
    again = load_mmengine_checkpoint(str(work / "iter_4.pth"))
    assert again["meta"]["iter"] == 4
    state = again["dyrep_fx"]
    assert state["units"] == 4 and [e["unit"] for e in state["history"]] == [2, 4]
    assert state["history"][0] == grown[0]  # the checkpoint's step, mark included, carried over
    assert_planted_shift(again, saved)

    # --resume CHECKPOINT: that checkpoint, into another work dir
    other = tmp_path / "other"
    proc = run_cli("train", CONFIG, "--work-dir", str(other), "--resume", str(work / "iter_2.pth"),
                   "--cfg-options", "train_cfg.max_iters=4", *SMALL, data=deepforest_root)
    assert proc.returncode == 0, output(proc)
    resumed = load_mmengine_checkpoint(str(other / "iter_4.pth"))
    assert resumed["dyrep_fx"]["units"] == 4 and resumed["dyrep_fx"]["history"][0] == grown[0]
    assert_planted_shift(resumed, saved)


def assert_planted_shift(final: dict, saved: torch.Tensor) -> None:
    """The weight shifted by 1 in the checkpoint is still ~1 away from its saved value two warm-up
    iterations later (learning rate below 1e-3, gradients clipped); a run that started over is not."""
    shift = final["state_dict"][PLANTED] - saved
    assert torch.allclose(shift, torch.ones_like(shift), atol=0.1), shift


@pytest.mark.slow
def test_train_on_two_cpu_ranks_under_torchrun(deepforest_root, tmp_path):
    work = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    proc = run_cli("train", CONFIG, "--launcher", "pytorch", "--work-dir", str(work), "--cfg-options",
                   "train_cfg.max_iters=2", *SMALL, data=deepforest_root, launcher=torchrun)
    assert proc.returncode == 0, output(proc)
    assert proc.stdout.count("finished at iteration 2") == 1  # rank 0 reports
    checkpoint = load_mmengine_checkpoint(str(work / "iter_2.pth"))
    assert checkpoint["meta"]["iter"] == 2 and checkpoint["dyrep_fx"]["history"][0]["grown"]
    assert (work / "dyrep_deploy.pth").is_file()


def test_missing_config_fails_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "config.py"
    assert cli.main(["train", str(missing)]) == 2
    assert f"config file not found: {missing}" in capsys.readouterr().err
    assert cli.main(["train", "mmdet::retinanet/no_such_config.py"]) == 2
    assert "retinanet/no_such_config.py does not exist" in capsys.readouterr().err


def test_config_without_a_model_fails(tmp_path, capsys):
    config = tmp_path / "empty.py"
    config.write_text("work_dir = 'x'\n")
    assert cli.main(["train", str(config)]) == 2
    assert "defines no 'model'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="AMP is refused only without a GPU")
def test_amp_without_a_gpu_is_refused(tmp_path, capsys):
    assert cli.main(["train", CONFIG, "--amp", "--work-dir", str(tmp_path)]) == 2
    assert "--amp needs a CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing started


def test_pytorch_launcher_outside_torchrun_says_how_to_start_it(tmp_path, capsys, monkeypatch):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is running in this process")
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    assert cli.main(["train", CONFIG, "--launcher", "pytorch", "--work-dir", str(tmp_path)]) == 2
    assert "torchrun --nproc_per_node N -m dyrep_fx.cli train" in capsys.readouterr().err


def test_package_configs_resolve_to_the_shipped_configs():
    path = resolve_config_path("mmdet::retinanet/retinanet_r18_fpn_1x_coco.py")
    assert path.is_file() and path.parts[-4:] == (".mim", "configs", "retinanet", "retinanet_r18_fpn_1x_coco.py")
    with pytest.raises(TrainConfigError, match="'no_such_package' is not installed"):
        resolve_config_path("no_such_package::a/b.py")


def test_cli_imports_no_openmmlab_module_until_a_command_needs_it():
    code = ("import sys, dyrep_fx.cli as c; c.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mmengine', 'mmdet', 'mmseg', 'mmcv')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, output(proc)
    assert proc.stdout.strip() == "[]"
