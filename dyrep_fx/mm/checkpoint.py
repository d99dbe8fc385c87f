"""DyRep's entry in mmengine checkpoints, and loading mmengine checkpoints under torch >= 2.6.

Every checkpoint saved by a run with DyRepHook holds the structure and the controller's state under
:data:`STATE_KEY`.

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine 0.10.7 checkpoints hold
``HistoryBuffer`` objects and numpy arrays in ``message_hub``, which that mode refuses (upstream
open-mmlab/mmengine#1655). mmengine calls ``torch.load`` itself, so the switch has to be the one torch
reads at each call: ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``. It turns off safe loading, so it is set only
inside :func:`mmengine_checkpoint_loading` and only for checkpoints the user trusts; dyrep_fx's own loads
(:func:`load_mmengine_checkpoint`) pass ``weights_only=False`` to their one ``torch.load`` call instead,
which needs no environment variable and prints no warning. dyrep_fx's own data
(structures, controller state) is plain data and loads with ``weights_only=True``.

:func:`read_checkpoint` is the checked load for commands given a checkpoint path (``dyrep-fx fold``,
with :func:`check_checkpoint_file` first): a missing, truncated or foreign file raises
:class:`CheckpointError`, whose one-line message names the file and what is wrong with it.
:func:`check_checkpoint_file` alone checks a file without unpickling it (``dyrep-fx train --resume``,
where the config may not trust the checkpoint).
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["STATE_KEY", "CheckpointError", "check_checkpoint_file", "is_resuming", "load_mmengine_checkpoint",
           "mmengine_checkpoint_loading", "one_line", "read_checkpoint", "scope_checkpoint_loading"]

#: The checkpoint entry holding DyRep's structure and controller state.
STATE_KEY = "dyrep_fx"

_FLAG = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def mmengine_checkpoint_loading() -> Iterator[None]:
    """Within the block, ``torch.load`` calls without ``weights_only`` unpickle mmengine checkpoints."""
    old = os.environ.get(_FLAG)
    os.environ[_FLAG] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_FLAG, None)
        else:
            os.environ[_FLAG] = old


def load_mmengine_checkpoint(path: str, map_location: str = "cpu") -> dict[str, Any]:
    """Load a (trusted) mmengine checkpoint file."""
    # torch.load's own switch for this call only (the environment flag is for loads inside mmengine)
    return torch.load(path, map_location=map_location, weights_only=False)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message (one line) names the file and what is wrong."""


def one_line(text: str) -> str:
    """``text`` with its lines joined (exception messages such as ``load_state_dict``'s span several)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


#: How a file written by torch.save begins: its zip format (torch >= 1.6), and its older format (a pickled
#: magic number, ``torch.serialization.MAGIC_NUMBER``).
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."


def _what_file_is_this(file: Path) -> str | None:
    """Why ``file`` cannot be a complete file written by ``torch.save``, from its bytes alone (nothing is
    unpickled), or ``None`` when it may be one."""
    with open(file, "rb") as f:
        head = f.read(4096)
    if not head:
        return "the file is empty"
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(file):
            return f"truncated or corrupt (torch.save's zip archive without its end, {file.stat().st_size} bytes)"
        with zipfile.ZipFile(file) as archive:
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in archive.namelist()):
                return "a zip archive that torch.save did not write (no data.pkl in it)"
        return None
    if head.startswith(_LEGACY_MAGIC):
        return None
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "a text file, not a checkpoint"
        except UnicodeDecodeError as bad:
            if bad.start >= len(head) - 4:  # only a character cut at the end of the sample
                return "a text file, not a checkpoint"
    return "not written by torch.save (neither its zip format nor its older one)"


def check_checkpoint_file(path: str | os.PathLike[str]) -> None:
    """Check, without unpickling anything (for a file not trusted yet), that ``path`` exists and may be a
    complete file written by ``torch.save``: not empty, not text, not truncated (a zip archive without its
    end).

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    file = Path(path)
    if not file.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path}: not a file")
    what = _what_file_is_this(file)
    if what is not None:
        raise CheckpointError(f"checkpoint {path}: not a readable PyTorch checkpoint: {what}")


def read_checkpoint(path: str | os.PathLike[str], map_location: str = "cpu") -> dict[str, Any]:
    """Load the (trusted) mmengine checkpoint at ``path`` and check that it is one: a dict whose
    ``'state_dict'`` maps names to tensors.

    Raises:
        CheckpointError: the file is missing, is not a readable PyTorch file (truncated, corrupt, text,
            a plain pickle), or holds something other than an mmengine checkpoint.
    """
    check_checkpoint_file(path)  # what the bytes alone tell, before unpickling
    try:
        ckpt = load_mmengine_checkpoint(str(path), map_location=map_location)
    except Exception as exc:  # torch.load raises whatever the unpickler or the zip reader meets
        raise CheckpointError(f"checkpoint {path}: not a readable PyTorch checkpoint: corrupt "
                              f"({type(exc).__name__}: {one_line(exc)[:160]})") from exc
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"checkpoint {path}: holds a {type(ckpt).__name__}, not an mmengine checkpoint "
                              "(a dict with a 'state_dict')")
    state = ckpt.get("state_dict")
    if not isinstance(state, Mapping):
        keys = ", ".join(repr(k) for k in list(ckpt)[:6]) or "none"
        raise CheckpointError(f"checkpoint {path}: has no 'state_dict' of weights (its keys: {keys}); not an "
                              "mmengine checkpoint")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path}: its 'state_dict' holds non-tensors (e.g. {bad[0]!r}); not "
                              "a model's weights")
    return dict(ckpt)


def scope_checkpoint_loading(runner) -> None:
    """Run the runner's next ``load_or_resume`` (where mmengine loads ``resume`` / ``load_from``) inside
    :func:`mmengine_checkpoint_loading`; that call only, then the runner's own method is back.

    ``Runner.train`` / ``val`` / ``test`` call ``before_run`` and then ``load_or_resume``, and no hook
    event lies between them, so this is the narrowest scope a hook can give the switch.
    """
    previous = runner.__dict__.get("load_or_resume")
    original = runner.load_or_resume

    def load_or_resume():
        try:
            with mmengine_checkpoint_loading():
                return original()
        finally:
            if previous is None:
                runner.__dict__.pop("load_or_resume", None)
            else:
                runner.load_or_resume = previous

    runner.load_or_resume = load_or_resume


def is_resuming(runner) -> bool:
    """Whether the runner's checkpoint load is a resume (``resume=True``) rather than a ``load_from``.

    mmengine 0.10.7's ``Runner.load_or_resume`` resumes exactly when the runner's ``resume`` argument
    (``cfg.resume``, kept as ``runner._resume``) is true, and loads ``load_from`` as weights otherwise; both
    go through ``Runner.load_checkpoint``, which fires ``after_load_checkpoint``.
    """
    flag = getattr(runner, "_resume", None)
    if flag is None:
        cfg = getattr(runner, "cfg", None)
        flag = cfg.get("resume", False) if cfg is not None else False
    return bool(flag)
