"""Smoke test of the efficacy experiments (benchmarks/efficacy): tiny runs, real training."""

from __future__ import annotations

import math

import pytest
import torch

import gradguard as gg
from benchmarks.efficacy import lm, rnn, run_all, tables
from benchmarks.efficacy.policies import DEFAULT, NONE, NoClip, roster


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tables(text: str) -> list[list[list[str]]]:
    """Markdown tables in ``text`` as lists of rows of cells (header first)."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def test_run_all_quick_prints_every_table():
    text = run_all(quick=True, seeds=1, steps=4)
    tables = _tables(text)
    # addition at two LRs, multiplication, LM bad batches, LM high LR, tuning burden
    assert len(tables) == 6
    for table in tables:
        assert set(table[1]) == {"---"}
        assert all(len(row) == len(table[0]) for row in table)
    rnn_rows = [row[0] for row in tables[0][2:]]
    assert rnn_rows == list(roster((0.1, 0.3, 1.0, 3.0, 10.0)))
    lm_rows = [row[0] for row in tables[3][2:]]
    assert lm_rows == list(roster((0.3, 1.0, 3.0)))
    burden = tables[5]
    assert [row[0] for row in burden[2:]] == [
        "addition T=20 lr 0.05",
        "addition T=20 lr 0.1",
        "multiplication T=20 lr 0.2",
        "LM, bad batches",
        "LM, high LR",
    ]
    assert all(row[4] in {"beats", "matches", "worse"} for row in burden[2:])


def test_guard_keeps_exploding_rnn_finite():
    config = rnn.RNNConfig(task="addition", length=20, lr=0.3, steps=60, eval_every=10)
    unguarded = rnn.train(config, NONE, NoClip, seed=0)
    assert unguarded.diverged and math.isnan(unguarded.test_mse)
    guarded = rnn.train(config, DEFAULT, gg.default_policy, seed=0)
    assert not guarded.diverged and math.isfinite(guarded.test_mse)
    assert guarded.clipped > 0


def test_bad_batches_stall_unclipped_adam_and_clipping_recovers():
    config = lm.LMConfig(steps=40, bad_batches=(20, 21), vocab=8, context=12, width=16)
    reference = lm.train(lm.LMConfig(**{**config.__dict__, "bad_batches": ()}), NONE, NoClip, 0)
    unclipped = lm.train(config, NONE, NoClip, 0)
    clipped = lm.train(config, "clip 1", lambda: gg.ClipNorm(1.0), 0)
    assert len(unclipped.curve) == 38  # bad batches are left out of the curve
    assert clipped.final_loss < unclipped.final_loss
    assert lm.steps_lost(clipped, reference) < lm.steps_lost(unclipped, reference)


def test_steps_lost_reads_the_reference_curve():
    def result(final: float, curve: list[float], diverged: bool = False) -> lm.LMResult:
        return lm.LMResult("x", 0, diverged, final, 0.0, curve, 0.0, 0, 0.0)

    reference = result(1.0, [4.0] * 10 + [1.0] * 90)
    assert lm.steps_lost(result(0.5, []), reference) == 0
    assert lm.steps_lost(result(5.0, []), reference) == 99
    assert lm.steps_lost(result(math.nan, [], diverged=True), reference) == 100
    smooth = lm.smooth(reference.curve)
    first = next(i for i, v in enumerate(smooth) if v <= 2.0)
    assert lm.steps_lost(result(2.0, []), reference) == 99 - first


def test_run_all_rejects_unknown_rows():
    with pytest.raises(ValueError, match="rows: unknown"):
        run_all(quick=True, seeds=1, only="rnn", steps=2, rows=["no such policy"])


def test_rnn_verdict_counts_solves_then_compares_error():
    def runs(solved: int, mse: float) -> list[rnn.RNNResult]:
        return [rnn.RNNResult("x", i, i < solved, False, 10, mse, 0.0, 0, 0.0) for i in range(3)]

    assert tables.rnn_verdict(runs(2, 0.1), runs(3, 0.1)) == "worse"
    assert tables.rnn_verdict(runs(3, 0.5), runs(3, 0.1)) == "matches"
    assert tables.rnn_verdict(runs(0, 1e4), runs(0, 0.1)) == "worse"
    assert tables.rnn_verdict(runs(0, 0.105), runs(0, 0.1)) == "matches"
