"""The library's modules use each other through public names only (no cross-module underscore access)."""

from __future__ import annotations

import ast
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


# -- the import graph: no cycle, and no module imports a layer above its own ------------------------------
#: Source folders and the package each installs as (pyproject.toml's package-dir: ``passes/`` is
#: ``dyrep_fx.passes``).
PACKAGE_DIRS = {"dyrep_fx": "dyrep_fx", "passes": "dyrep_fx.passes", "dyrep_fx_examples": "dyrep_fx_examples"}

#: The layers from the ground up; a module may import its own layer and those below, never one above.
#: A name places that module; ``pkg.*`` places a package and every module in it. A new module must be placed
#: here before the test passes.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("dyrep_fx.defaults", "dyrep_fx.conv_classes", "dyrep_fx.kernels", "dyrep_fx.forward_scope",
                    "dyrep_fx.saliency", "dyrep_fx.optim_sync", "dyrep_fx.distributed", "dyrep_fx.calibration",
                    "dyrep_fx.step_plan", "dyrep_fx.target_names", "dyrep_fx.schedule")),
    ("geometry", ("dyrep_fx.geometry",)),
    ("kernel ops", ("dyrep_fx.assembly", "dyrep_fx.dbb_ops", "dyrep_fx.execution")),
    ("kinds", ("dyrep_fx.kinds.*",)),
    ("block", ("dyrep_fx.block", "dyrep_fx.cost_model")),
    ("trace", ("dyrep_fx.tracing",)),
    ("passes", ("dyrep_fx.passes.*", "dyrep_fx.structure_spec", "dyrep_fx.policies")),
    ("handle", ("dyrep_fx.handle", "dyrep_fx.api", "dyrep_fx.ema_copies", "dyrep_fx.target_set")),
    ("controller", ("dyrep_fx.controller", "dyrep_fx.checkpoint_state", "dyrep_fx.step_history",
                    "dyrep_fx.live_changes", "dyrep_fx.step_transaction")),
    ("package", ("dyrep_fx",)),
    ("applications", ("dyrep_fx.mm.*", "dyrep_fx_examples.*")),
    ("command line", ("dyrep_fx.cli", "dyrep_fx.__main__")),
)


def module_files() -> dict[str, Path]:
    """Every module of the library by its installed dotted name."""
    found = {}
    for folder, package in PACKAGE_DIRS.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")) if base.is_dir() else ():
            parts = path.relative_to(base).with_suffix("").parts
            name = ".".join((package,) + parts).removesuffix(".__init__")
            found[name] = path
    return found


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` is or lies in (``pkg.mod.attr`` -> ``pkg.mod``), or None outside the library."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _absolute(target: str, level: int, package: str) -> str:
    """A relative import's module as an absolute name (``level`` dots, from inside ``package``)."""
    if not level:
        return target
    base = package.split(".")[: len(package.split(".")) - level + 1]
    return ".".join(base + ([target] if target else []))


def imported_names(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The library modules ``name`` imports anywhere in its file.

    Counted: ``import`` and ``from ... import`` statements at any depth (inside functions and ``if
    TYPE_CHECKING:`` blocks too), ``importlib.import_module`` / ``__import__`` calls with a literal name,
    and any string constant that is exactly a library module's dotted name (a list of modules loaded by name).
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module or "", node.level, package)
            targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif isinstance(node, ast.Call) and _called(node) in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                text = arg.value
                targets.append(_absolute(text.lstrip("."), len(text) - len(text.lstrip(".")), package))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
            targets.append(node.value)
    return {known for t in targets if (known := _known(t, modules)) not in (None, name)}


def _called(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def import_graph() -> dict[str, set[str]]:
    """Module -> the library modules it imports."""
    modules = module_files()
    return {name: imported_names(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(name: str) -> int | None:
    """The index in :data:`LAYERS` of the layer that places ``name``, or None."""
    for i, (_, placed) in enumerate(LAYERS):
        for entry in placed:
            package = entry.removesuffix(".*")
            if name == package or (entry.endswith(".*") and name.startswith(package + ".")):
                return i
    return None


def test_the_graph_counts_hidden_imports():
    """Imports inside functions, under TYPE_CHECKING, by ``importlib`` and by module name are all counted."""
    import tempfile

    source = ('from typing import TYPE_CHECKING\nimport importlib\nif TYPE_CHECKING:\n    from .b import B\n'
              'def f():\n    from . import c\n    importlib.import_module("pkg.d")\nNAMES = ("pkg.e",)\n')
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "a.py"
        path.write_text(source)
        modules = {f"pkg.{m}": path for m in "abcde"}
        assert imported_names("pkg.a", path, modules) == {"pkg.b", "pkg.c", "pkg.d", "pkg.e"}


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_every_module_has_a_layer():
    unplaced = [name for name in import_graph() if layer_of(name) is None]
    assert not unplaced, f"place these modules in tests/test_layering.py's LAYERS: {unplaced}"


def test_no_module_imports_a_layer_above_its_own():
    graph = import_graph()
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
              for a in sorted(graph) for b in sorted(graph[a])
              if None not in (layer_of(a), layer_of(b)) and layer_of(b) > layer_of(a)]
    assert not upward, upward


def test_each_kind_is_named_only_in_its_own_module():
    """A kind's name appears as a string in the code of its own module only (docstrings aside): blocks,
    passes, specs, the controller and the other kinds reach it through the registry or its module."""
    from dyrep_fx.kinds import get_kind, kind_names

    modules = module_files()
    homes = {name: get_kind(name).branch.__module__ for name in kind_names()}
    found = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in homes and homes[node.value] != module:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r} (its module: {homes[node.value]})")
    assert not found, found
