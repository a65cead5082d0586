"""The front-ends are optional: importing gradguard imports none of their frameworks."""

from __future__ import annotations

import subprocess
import sys


def test_import_gradguard_imports_no_frontend_framework():
    code = (
        "import sys, gradguard, gradguard.frontends, gradguard.record;"
        "bad = [m for m in ('jax', 'optax', 'paddle', 'keras', 'tensorflow') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
