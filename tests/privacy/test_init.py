"""The privacy package: importing it loads no Opacus, and its modules import without cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import gradguard.privacy

PACKAGE = Path(gradguard.privacy.__file__).parent


def test_importing_the_privacy_package_does_not_import_opacus():
    code = (
        "import sys, gradguard, gradguard.privacy, gradguard.policies.noise; "
        "print('opacus' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False"


def sibling_imports(path: Path) -> set[str]:
    """Modules of this package that ``path`` imports anywhere (also inside functions and
    ``TYPE_CHECKING`` blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def test_no_import_cycles_between_the_privacy_modules():
    graph = {
        path.stem: sibling_imports(path) for path in PACKAGE.glob("*.py") if path.stem != "__init__"
    }
    assert "quantile" not in graph["opacus"]  # the cycle opacus <-> quantile is gone
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for target in graph.get(module, ()):
            visit(target, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())
