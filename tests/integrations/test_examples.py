"""The integration examples run and show what they claim (in-process, CPU, seconds)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(True)
        state.GradientState._reset_state()


def run(name: str, *args: str) -> None:
    saved = sys.argv
    sys.argv = [name, *args]
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    finally:
        sys.argv = saved


def test_lightning_example_skips_its_bad_batches(tmp_path, capsys):
    pytest.importorskip("lightning")
    with pytest.warns(RuntimeWarning, match="skipped"):
        run("lightning_example.py", str(tmp_path / "run"))
    assert "skipped steps: [5, 21]" in capsys.readouterr().out


def test_accelerate_example_skips_step_3(capsys):
    pytest.importorskip("accelerate")
    with pytest.warns(RuntimeWarning, match="skipped"):
        run("accelerate_example.py")
    out = capsys.readouterr().out
    assert "step 3: norm nan skipped" in out and "step 7:" in out


def test_transformers_example_logs_gradguard_metrics(tmp_path, capsys):
    pytest.importorskip("transformers")
    run("transformers_example.py", str(tmp_path / "out"))
    lines = [x for x in capsys.readouterr().out.splitlines() if "gradguard total_norm" in x]
    assert len(lines) == 3
