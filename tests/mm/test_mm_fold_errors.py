"""``dyrep-fx fold`` (and ``train --resume``) given a checkpoint it cannot use: one line on stderr naming the
file and the problem, exit code 2, no traceback, nothing written; ``--debug`` shows the traceback.

The checkpoints are real: a DyRepHook run of the toy classifier (:mod:`helpers.mm_toy`, a few seconds on a
CPU) and the same run without the hook, then broken the ways a user's file breaks (missing, truncated,
text, a plain pickle, a ``torch.save`` of something else, another model's checkpoint). Each case goes
through the CLI's entry point, ``cli.main`` in this process (where the toy model is registered) or
``python -m dyrep_fx.cli`` in a fresh one; a control folds the intact checkpoint with the same config.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmengine")

from helpers.launch import ROOT, clean_env  # noqa: E402
from helpers.mm_toy import toy_cfg, train_toy  # noqa: E402
from mmengine.config import Config  # noqa: E402

from dyrep_fx import cli  # noqa: E402
from dyrep_fx.mm.checkpoint import CheckpointError  # noqa: E402
from dyrep_fx.mm.fold_checkpoint import build_model_from_config  # noqa: E402

ITERS, INTERVAL = 4, 2


def toy_config_file(path: Path, work_dir: Path, width: int = 8, dyrep: bool = True) -> Path:
    """The toy run's config as a file, as a user would pass it to the CLI (``width``: another model)."""
    entries = {"model": dict(type="ToyClassifier", width=width), "default_scope": "mmengine"}
    if not dyrep:
        entries["custom_hooks"] = []
    toy_cfg(work_dir, ITERS, INTERVAL, **entries).dump(str(path))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A DyRepHook checkpoint and a plain one (the same toy run without the hook), with their configs, and
    the config of another model (the toy classifier at width 4)."""
    root = tmp_path_factory.mktemp("fold_errors")
    found: dict[str, Path] = {}
    for name, dyrep in (("dyrep", True), ("plain", False)):
        work = root / name
        config = toy_config_file(root / f"{name}.py", work, dyrep=dyrep)
        train_toy(Config.fromfile(str(config)))  # the file the CLI reads is the config that trained
        found[name], found[f"{name}_config"] = work / f"iter_{ITERS}.pth", config
    found["other_config"] = toy_config_file(root / "other.py", root / "other", width=4)
    ckpt = torch.load(found["dyrep"], map_location="cpu", weights_only=False)
    assert ckpt["dyrep_fx"]["history"] and any(e["grown"] for e in ckpt["dyrep_fx"]["history"])
    return found


def fold(capsys, config: Path, checkpoint: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    code = cli.main(["fold", str(config), str(checkpoint), "-o", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> str:
    assert code == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err + out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_the_intact_checkpoint_folds(runs, tmp_path, capsys):
    """The control: the config and checkpoint the error cases break fold, and the result loads strictly."""
    out = tmp_path / "deploy.pth"
    code, stdout, err = fold(capsys, runs["dyrep_config"], runs["dyrep"], out)
    assert code == 0 and f"folded checkpoint written to {out}" in stdout, err
    state = torch.load(out, weights_only=True)["state_dict"]
    build_model_from_config(str(runs["dyrep_config"])).load_state_dict(state, strict=True)


def _write_truncated(runs, path: Path) -> Path:
    data = runs["dyrep"].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _write_text(runs, path: Path) -> Path:
    path.write_text("model = dict(type='ToyClassifier')\n")  # e.g. the config given twice
    return path


def _write_pickled_list(runs, path: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump([1, 2, 3], f)
    return path


def _write_saved_list(runs, path: Path) -> Path:
    torch.save([torch.zeros(2)], path)
    return path


def _write_bare_state_dict(runs, path: Path) -> Path:
    torch.save({"backbone.0.weight": torch.zeros(8, 3, 3, 3)}, path)
    return path


def _write_corrupt_archive(runs, path: Path) -> Path:
    """torch.save's layout (a zip archive with ``data.pkl``) around bytes that are no pickle."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x00garbage" * 10)
        archive.writestr("archive/version", b"3\n")
    return path


def _write_empty(runs, path: Path) -> Path:
    path.write_bytes(b"")
    return path


BROKEN = {
    "missing": (lambda runs, path: path, ["no such file"]),
    "a directory": (lambda runs, path: (path.mkdir(), path)[1], ["not a file"]),
    "empty": (_write_empty, ["not a readable PyTorch checkpoint: the file is empty"]),
    "truncated": (_write_truncated, ["not a readable PyTorch checkpoint: truncated or corrupt"]),
    "a corrupt archive": (_write_corrupt_archive, ["not a readable PyTorch checkpoint: corrupt ("]),
    "a text file": (_write_text, ["not a readable PyTorch checkpoint: a text file"]),
    "a pickle of a list": (_write_pickled_list, ["not a readable PyTorch checkpoint: not written by torch.save"]),
    "torch.save of a list": (_write_saved_list, ["holds a list, not an mmengine checkpoint"]),
    "a bare state dict": (_write_bare_state_dict, ["has no 'state_dict'", "'backbone.0.weight'"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_an_unreadable_or_foreign_file_is_one_line(runs, tmp_path, capsys, case):
    write, fragments = BROKEN[case]
    checkpoint = write(runs, tmp_path / "ckpt.pth")
    out = tmp_path / "deploy.pth"
    code, stdout, err = fold(capsys, runs["dyrep_config"], checkpoint, out)
    assert_one_line_error(code, stdout, err, f"checkpoint {checkpoint}", *fragments)
    assert not out.exists()


def test_a_checkpoint_without_dyrep_structure_is_one_line(runs, tmp_path, capsys):
    out = tmp_path / "deploy.pth"
    code, stdout, err = fold(capsys, runs["plain_config"], runs["plain"], out)
    assert_one_line_error(code, stdout, err, f"checkpoint {runs['plain']}", "holds no DyRep structure",
                          "DyRepHook")
    assert not out.exists()


def test_a_checkpoint_of_another_model_is_one_line(runs, tmp_path, capsys):
    out = tmp_path / "deploy.pth"
    code, stdout, err = fold(capsys, runs["other_config"], runs["dyrep"], out)
    line = assert_one_line_error(code, stdout, err, f"checkpoint {runs['dyrep']}",
                                 f"does not fit the model of {runs['other_config']}", "another shape",
                                 "(8, 3, 3, 3) in the checkpoint, (4, 3, 3, 3) in the model")
    assert "ToyClassifier" in line
    assert not out.exists()


def test_ema_weights_asked_of_a_checkpoint_without_them_is_one_line(runs, tmp_path, capsys):
    out = tmp_path / "deploy.pth"
    code, stdout, err = fold(capsys, runs["dyrep_config"], runs["dyrep"], out, "--ema")
    assert_one_line_error(code, stdout, err, f"checkpoint {runs['dyrep']}", "no EMA weights")
    assert not out.exists()


def test_a_missing_config_is_one_line(runs, tmp_path, capsys):
    missing = tmp_path / "nowhere.py"
    code, stdout, err = fold(capsys, missing, runs["dyrep"], tmp_path / "deploy.pth")
    assert_one_line_error(code, stdout, err, f"config file not found: {missing}")


def test_debug_raises_the_error_with_its_cause(runs, tmp_path):
    checkpoint = _write_corrupt_archive(runs, tmp_path / "ckpt.pth")
    for argv in (["--debug", "fold"], ["fold", "--debug"]):
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as info:
            cli.main([*argv, str(runs["dyrep_config"]), str(checkpoint), "-o", str(tmp_path / "deploy.pth")])
        assert info.value.__cause__ is not None  # torch's own error, for the traceback


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dyrep_fx.cli", *args], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["missing", "truncated", "a corrupt archive"])
def test_the_command_in_a_fresh_process(runs, tmp_path, case):
    """``python -m dyrep_fx.cli fold``: one line and exit code 2; with ``--debug`` the traceback."""
    write, fragments = BROKEN[case]
    checkpoint = write(runs, tmp_path / "ckpt.pth")
    args = ["fold", str(runs["dyrep_config"]), str(checkpoint), "-o", str(tmp_path / "deploy.pth")]
    proc = run_cli(*args)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, f"checkpoint {checkpoint}", *fragments)
    debug = run_cli(*args, "--debug")
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "CheckpointError" in debug.stderr
    assert fragments[0] in debug.stderr


@pytest.mark.parametrize("case", ["empty", "truncated", "a text file", "a pickle of a list"])
def test_train_resume_from_a_broken_checkpoint_is_one_line_before_anything_runs(runs, tmp_path, capsys, case):
    write, fragments = BROKEN[case]
    checkpoint = write(runs, tmp_path / "ckpt.pth")
    work = tmp_path / "work"
    code = cli.main(["train", str(runs["dyrep_config"]), "--resume", str(checkpoint), "--work-dir", str(work)])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.out, captured.err, f"checkpoint {checkpoint}", *fragments)
    assert not work.exists()  # nothing started
    code = cli.main(["train", str(runs["dyrep_config"]), "--resume", str(tmp_path / "none.pth"),
                     "--work-dir", str(work)])
    assert_one_line_error(code, *capsys.readouterr(), "checkpoint to resume not found")


class _Planted:
    """Unpickling it creates the folder ``marker`` (a stand-in for what an untrusted pickle may do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def test_the_resume_check_unpickles_nothing(tmp_path):
    """``train --resume`` checks the file before the run, where the config's DyRepHook may not trust it
    (``trust_checkpoint=False``): the check reads bytes only."""
    from dyrep_fx.mm.checkpoint import check_checkpoint_file

    marker = tmp_path / "unpickled"
    checkpoint = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {}, "payload": _Planted(str(marker))}, checkpoint)
    check_checkpoint_file(checkpoint)  # a complete torch.save file: accepted
    assert not marker.exists()
    torch.load(checkpoint, weights_only=False)  # the control: unpickling it does create the marker
    assert marker.is_dir()
