"""The command line, end to end in a subprocess."""

from __future__ import annotations

import subprocess
import sys

import gradguard


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradguard.cli", *args],
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"gradguard {gradguard.__version__}"


def test_bad_arguments_exit_with_usage_error():
    out = run_cli("demo", "--steps", "10")
    assert out.returncode == 2
    assert "--steps" in out.stderr
    assert run_cli("no-such-command").returncode == 2


def test_python_dash_m_gradguard():
    out = subprocess.run(
        [sys.executable, "-m", "gradguard", "--version"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0 and out.stdout.strip() == f"gradguard {gradguard.__version__}"
    usage = subprocess.run(
        [sys.executable, "-m", "gradguard", "watch", "nowhere", "--interval", "inf"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert usage.returncode == 2 and "finite" in usage.stderr and "Traceback" not in usage.stderr
