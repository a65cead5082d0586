"""The plain-PyTorch quickstart example runs and does what its docstring says."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import gradguard as gg

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"


def test_quickstart_skips_its_nan_batch_and_writes_a_report(tmp_path, capsys):
    saved = sys.argv
    sys.argv = [str(EXAMPLE), str(tmp_path / "run")]
    try:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    finally:
        sys.argv = saved
    out = capsys.readouterr().out
    assert "optimizer steps: 50, skipped: [(10, " in out  # micro-batch 41 → step 10
    assert (tmp_path / "run" / "report.html").stat().st_size > 10_000
    steps = gg.RunStore.open(tmp_path / "run").steps()
    assert steps["skipped"].tolist() == [i == 10 for i in range(50)]
    assert steps["loss"][-10:].mean() < steps["loss"][:5].mean() / 5  # it learns
