"""The compiler package stays free of the example training and data code (``dyrep_fx_examples``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The one door from the library to the examples: ``dyrep-fx demo`` (imported inside its sub-command).
ALLOWED = {"dyrep_fx/cli.py"}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_only_the_cli_imports_the_examples():
    offenders = [str(p.relative_to(ROOT)) for d in ("dyrep_fx", "passes") for p in sorted((ROOT / d).rglob("*.py"))
                 if any(m.split(".")[0] == "dyrep_fx_examples" for m in imported_modules(p))
                 and str(p.relative_to(ROOT)) not in ALLOWED]
    assert not offenders, offenders


def test_the_example_code_left_the_core_package():
    assert not [p.name for p in (ROOT / "dyrep_fx").glob("*.py") if p.stem in ("demo", "data", "datasets")]
    assert (ROOT / "dyrep_fx_examples" / "demo.py").is_file()
