"""The library's modules use each other through public names only (no cross-module underscore access)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Private attributes of torch / mmengine objects the library has to touch (not of its own modules).
THIRD_PARTY = {"_version", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_conv_forward",
               "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_always_called", "_backward_hooks",
               "_backward_pre_hooks", "_resume"}
IMPORT = re.compile(r"^\s*from\s+(\.[\w.]*|dyrep_fx[\w.]*)\s+import\s+\(?([^)#\n]*)", re.M)
ACCESS = re.compile(r"(?<![\w.])(\w+)\.(_[a-z]\w*)")


def library_files() -> list[Path]:
    return sorted(p for d in ("dyrep_fx", "passes") for p in (ROOT / d).rglob("*.py"))


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in library_files():
        for module, names in IMPORT.findall(path.read_text()):
            found += [f"{path.relative_to(ROOT)}: from {module} import {n.strip()}" for n in names.split(",")
                      if n.strip().startswith("_") and n.strip() != "__future__"]
    assert not found, found


def test_no_module_reaches_into_another_modules_private_parts():
    found = []
    for path in library_files():
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if code.strip().startswith(("'", '"')) or "``" in code:
                continue  # docstrings mentioning third-party internals
            for owner, attr in ACCESS.findall(code):
                if owner in ("self", "cls") or attr in THIRD_PARTY or attr.startswith("__"):
                    continue
                found.append(f"{path.relative_to(ROOT)}:{lineno}: {owner}.{attr}")
    assert not found, found


def test_an_uninstalled_checkout_says_how_to_install(tmp_path):
    """``passes/`` becomes ``dyrep_fx.passes`` only when installed; without that, say so (not a circular import)."""
    import shutil
    import subprocess
    import sys

    import torch

    shutil.copytree(ROOT / "dyrep_fx", tmp_path / "dyrep_fx")
    site = str(Path(torch.__file__).resolve().parents[1])  # site-packages, without the editable finder (-S)
    proc = subprocess.run([sys.executable, "-S", "-c", "import dyrep_fx"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": f"{tmp_path}:{site}"}, timeout=120)
    assert proc.returncode != 0 and "pip install -e ." in proc.stderr, proc.stderr[-2000:]
