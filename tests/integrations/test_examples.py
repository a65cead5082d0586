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


def test_lightning_example_skips_its_bad_batches_and_holds_the_lr(tmp_path, capsys):
    pytest.importorskip("lightning")
    with pytest.warns(RuntimeWarning, match="skipped"):
        run("lightning_example.py", str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "skipped steps: [5, 21]" in out
    held = [
        line.split(": ")[1].split(" (")[0].split() for line in out.splitlines() if "held" in line
    ]
    assert len(held) == 2 and all(a == b for a, b in held)


def test_accelerate_example_skips_step_3_and_tells_accelerate(capsys):
    pytest.importorskip("accelerate")
    with pytest.warns(RuntimeWarning, match="skipped"):
        run("accelerate_example.py")
    lines = capsys.readouterr().out.splitlines()
    assert "step 3: norm nan skipped, optimizer_step_was_skipped=True" in lines[3]
    lrs = [line.rsplit("lr ", 1)[1] for line in lines[:5]]
    assert lrs[3] == lrs[2] != lrs[4]  # the prepared scheduler held on the skip
    assert all(
        "optimizer_step_was_skipped=False" in line for line in lines if "skipped," not in line
    )


def test_transformers_example_logs_gradguard_metrics(tmp_path, capsys):
    pytest.importorskip("transformers")
    run("transformers_example.py", str(tmp_path / "out"))
    lines = [x for x in capsys.readouterr().out.splitlines() if "gradguard total_norm" in x]
    assert len(lines) == 3
    for line in lines:  # the Trainer's grad_norm is gradguard's pre-clip norm
        words = line.split()
        assert words[words.index("grad_norm") + 1] == words[words.index("total_norm") + 1]


def test_deepspeed_example_skips_step_4_through_the_engine(tmp_path, capsys, monkeypatch):
    pytest.importorskip("deepspeed")
    from tests.integrations._deepspeed import isolate, release

    isolate(monkeypatch)
    try:
        with pytest.warns(RuntimeWarning, match="step 4 skipped"):
            run("deepspeed_example.py", str(tmp_path / "run"))
    finally:
        release()
    out = capsys.readouterr().out
    assert "10 steps in" in out and "skipped steps: [4], DeepSpeed skipped_steps=1" in out
