"""Shared benchmark plumbing: fresh worker processes, interleaved rounds, medians and tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "machine": platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_worker(script: str, args: Sequence[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script --worker args`` in a fresh Python process and return the JSON it prints last."""
    full_env = dict(os.environ, **(env or {}))
    out = subprocess.run([sys.executable, str(HERE / script), "--worker", *args], capture_output=True, text=True,
                         env=full_env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and spread (min, max) of a list of measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB since it started or since :func:`reset_peak_rss`
    (``VmHWM``, Linux)."""
    with open("/proc/self/status") as f:
        line = next(entry for entry in f if entry.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def reset_peak_rss() -> None:
    """Start :func:`peak_rss_mib` over from the current RSS (Linux >= 4.0: ``clear_refs`` value 5), so that
    a peak reached earlier (building the model) does not hide a smaller one measured later."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def write_json(path: str | Path, data: Any, compact: bool = False) -> None:
    """Write ``data`` as JSON (indented, or ``compact`` for large per-step records), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, separators=(",", ":")) if compact else json.dumps(data, indent=2))
