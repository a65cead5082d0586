"""``import gradguard.health`` needs numpy, not torch."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_health_rules_does_not_import_torch():
    code = (
        "import sys, gradguard.health as h\n"
        "h.diagnose({'total_norm': [1.0, float('nan')]}, [0, 1])\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
        "h.BackwardOrder  # the one torch-dependent name, loaded on use\n"
        "assert 'torch' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_only_origin_imports_torch():
    import ast
    import pathlib

    import gradguard.health as health

    root = pathlib.Path(health.__file__).parent
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        imported |= {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0
        }
        assert ("torch" in imported) == (path.name == "origin.py"), path.name
