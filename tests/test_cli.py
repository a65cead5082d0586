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


def test_demo_unguarded_run_is_lost_and_guarded_run_survives(tmp_path):
    out = run_cli("demo", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    unguarded, guarded = text.split("guarded (gradguard.Guard")
    assert "weights finite: False" in unguarded
    assert "the run is lost" in unguarded
    assert "weights finite: True" in guarded
    assert "skipped step 450: nonfinite" in guarded
    assert "The guard kept the run alive." in text
    assert "First-layer gradient norm of an MLP vs depth" in text
    for run in ("unguarded", "guarded"):
        report = tmp_path / run / "report.html"
        assert f"report: {report}" in text
        assert report.stat().st_size > 10_000
    stored = gradguard.RunStore.open(tmp_path / "guarded")
    assert stored.steps()["skipped"].sum() == 1


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
