"""Launching test worker scripts in fresh processes: one process, or 2 ranks with torchrun (gloo, CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "scripts"
#: torch's unsafe-loading switch; fresh test processes never inherit it (the library scopes its own use).
UNSAFE_LOAD_FLAG = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """This process's environment with one intra-op thread and without the unsafe-loading switch."""
    env = {k: v for k, v in os.environ.items() if k != UNSAFE_LOAD_FLAG}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: list[str], timeout: int) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def run_script(script: str, *args: str, timeout: int = 300) -> None:
    """``python tests/scripts/<script> ARGS`` in a fresh process; its failure fails the test."""
    _run([sys.executable, str(SCRIPTS / script), *args], timeout)


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 300) -> None:
    """``torchrun --nproc_per_node NPROC tests/scripts/<script> ARGS`` on this host."""
    _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
          "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(SCRIPTS / script), *args],
         timeout)
