"""benchmarks/gpu_check.py: a no-op without CUDA, its table and exit code, its isolation
of checks, and every check's code run on the CPU with host syncs simulated."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

checks = gpu_check.checks  # the module of checks, as the script imports it
SCRIPT = Path(gpu_check.__file__)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_without_cuda_it_says_so_and_exits_0():
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "needs CUDA" in done.stdout and "nothing checked" in done.stdout


def fake_results(*statuses: str) -> list[gpu_check.Result]:
    return [gpu_check.Result(f"check_{i}", s, f"detail {i}") for i, s in enumerate(statuses)]


def test_exit_code_is_1_exactly_when_a_check_failed():
    assert gpu_check.exit_code(fake_results("pass", "skip", "info")) == 0
    assert gpu_check.exit_code(fake_results("pass", gpu_check.FAIL, "skip")) == 1
    assert gpu_check.exit_code([]) == 0


def test_table_shows_every_row_and_a_summary():
    table = gpu_check.format_table(fake_results("pass", gpu_check.FAIL, "skip"))
    lines = table.splitlines()
    assert lines[0].split() == ["check", "status", "detail"]
    for i, status in enumerate(("pass", "FAIL", "skip")):
        assert lines[2 + i].split() == [f"check_{i}", status, "detail", str(i)]
    assert lines[-1] == "3 checks: 1 failed, 1 skipped"


def test_a_check_that_raises_or_skips_is_one_row(monkeypatch):
    def broken(device):
        raise ValueError("boom")

    def not_here(device):
        raise checks.Skip("needs 2 GPUs")

    monkeypatch.setitem(checks.CHECKS, "broken", broken)
    monkeypatch.setitem(checks.CHECKS, "not_here", not_here)
    assert gpu_check.run_check("broken", "cpu") == gpu_check.Result(
        "broken", gpu_check.FAIL, "ValueError: boom"
    )
    assert gpu_check.run_check("not_here", "cpu").status == gpu_check.SKIP


def test_a_crash_or_a_hang_in_a_check_process_is_a_failure_row():
    python = [sys.executable, "-c"]
    crashed = gpu_check.run_isolated("c", [*python, "import os; os._exit(3)"], 120)
    assert crashed.status == gpu_check.FAIL and "exited with 3" in crashed.detail
    hung = gpu_check.run_isolated("h", [*python, "import time; time.sleep(60)"], 1)
    assert hung.status == gpu_check.FAIL and "no result within 1 s" in hung.detail
    row = {"name": "w", "status": "pass", "detail": "ok"}
    write = f"import json, sys; open(sys.argv[1], 'w').write({json.dumps(json.dumps(row))})"
    assert gpu_check.run_isolated("w", [*python, write], 120) == gpu_check.Result(**row)


class SimulatedSyncDebug:
    """A CPU stand-in for ``torch.cuda.set_sync_debug_mode``: every host read of a tensor
    (``item``, ``tolist``, ``bool``, ...) counts as a sync, as it would on a GPU."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self) -> None:
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}

    def __call__(self, mode) -> None:
        level = {"default": 0, "warn": 1, "error": 2}.get(mode, mode)
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method if level == 0 else self._counted(method, level))

    @staticmethod
    def _counted(method, level):
        def read(tensor, *args, **kwargs):
            if level == 2:
                raise RuntimeError(checks.SYNC_TEXT)
            warnings.warn(checks.SYNC_TEXT, UserWarning, stacklevel=2)
            return method(tensor, *args, **kwargs)

        return read


@pytest.fixture
def simulated_cuda_checks(monkeypatch):
    """Run the CUDA-only checks on the CPU, host reads standing in for syncs."""
    fake = SimulatedSyncDebug()
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", fake)
    monkeypatch.setattr(checks, "_require_cuda", lambda device, gpus=1: None)
    yield
    fake(0)


def test_every_check_runs_on_cpu(simulated_cuda_checks):
    results = {name: gpu_check.run_check(name, "cpu") for name in checks.CHECKS}
    failed = {n: r.detail for n, r in results.items() if r.status not in ("pass", "info")}
    assert not failed
    assert results["fused_speed"].status == "info"
    assert all(f"{n} " in results["default_speed"].detail for n in ("default", "old default"))
    # the one sync gradguard allows: reading a skip flag before a non-fused step
    assert "1 per step over the bare step's" in results["sync_skip_unfused"].detail
    # the simulated sync is seen, and named where it happens (reading the skip flag)
    assert "result.py" in results["sync_skip_unfused"].detail


def test_a_sync_where_none_is_allowed_fails_the_check(simulated_cuda_checks, monkeypatch):
    original = checks._adamw
    monkeypatch.setattr(checks, "_adamw", lambda model, fused: original(model, False))
    result = gpu_check.run_check("sync_default_fused", "cpu")
    assert result.status == gpu_check.FAIL
    assert "syncs in 10 steps at" in result.detail and "result.py" in result.detail


def test_main_in_process_prints_the_table(capsys):
    assert gpu_check.main(["--device", "cpu", "--in-process", "--only", "low_precision"]) == 0
    out = capsys.readouterr().out
    assert "low_precision  pass" in out and out.rstrip().endswith("1 checks: 0 failed, 0 skipped")
