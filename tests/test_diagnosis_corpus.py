"""A fast subset of the labelled diagnosis corpus (benchmarks/diagnosis), trained for real
through ``gg.Guard`` with a run store; the findings read back from the store must detect
each labelled fault with its range and origin, and claim nothing false.

The whole corpus, both halves, is ``python -m benchmarks.diagnosis`` (see its RESULTS.md).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.diagnosis.corpus import CORPUS, split
from benchmarks.diagnosis.runner import train
from benchmarks.diagnosis.scorer import is_claim, read_findings, score_run
from gradguard.health.findings import FORWARD

BY_NAME = {spec.name: spec for spec in CORPUS}
TUNING = {spec.name for spec in split()[0]}


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def corpus_run(name, tmp_path):
    assert name in TUNING  # CI checks the tuning half; the held-out half stays unseen
    spec = BY_NAME[name]
    result = train(spec, tmp_path / name)
    findings = read_findings(result.store)
    return findings, score_run(spec, "tuning", findings, result.seconds, result.warnings)


@pytest.mark.parametrize("name", ["healthy_quickstart_like", "healthy_ln_mlp_fp16"])
def test_healthy_runs_raise_no_warning(name, tmp_path):
    findings, score = corpus_run(name, tmp_path)
    assert [f for f in findings if is_claim(f)] == []
    assert score.warnings == []


def _detected(score):
    assert score.false_claims == []
    for label in score.labels:
        assert label.detected and label.range_ok, label
        assert label.origin_ok in (None, True), label


def test_an_lr_jump_is_named_with_its_factor_and_its_harm(tmp_path):
    findings, score = corpus_run("lr_jump_mlp", tmp_path)
    _detected(score)
    (change,) = [f for f in findings if f.kind == "lr_change"]
    assert change.steps[0] == 150 and change.message.startswith(
        "learning rate raised 5e+03× at step 150 (0.001 → 5); gradient norm ×"
    )
    assert {"exploding", "loss_divergence", "run_lost"} <= {f.kind.value for f in findings}


def test_a_nan_input_is_blamed_on_the_forward_pass_not_the_output_layer(tmp_path):
    findings, score = corpus_run("nan_input_mlp", tmp_path)
    _detected(score)
    (nonfinite,) = [f for f in findings if f.kind == "nonfinite"]
    assert nonfinite.origin == FORWARD and nonfinite.steps == (140, 140)


def test_a_nan_born_in_backward_is_located_and_ranged(tmp_path):
    findings, score = corpus_run("backward_nan_wine_long", tmp_path)
    _detected(score)
    (nonfinite,) = [f for f in findings if f.kind == "nonfinite"]
    assert nonfinite.steps == (100, 119) and nonfinite.origin == "proj.weight"


@pytest.mark.parametrize(
    "name",
    [
        "dead_relu_cancer_monitor",
        "exploding_rnn_monitor",
        "scale_collapse_digits",
        "label_noise_mlp",
        "frozen_table_embedding",
    ],
)
def test_each_fault_is_detected_with_its_range(name, tmp_path):
    _, score = corpus_run(name, tmp_path)
    _detected(score)


def test_bad_input_to_the_scorer_is_a_clear_error(tmp_path, capsys):
    from benchmarks.diagnosis.__main__ import main
    from benchmarks.diagnosis.scorer import ScoreError

    with pytest.raises(SystemExit) as exc:
        main(["--runs", "no_such_run"])
    assert exc.value.code == 2 and "unknown run(s) ['no_such_run']" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "full")])
    assert "must be a new or empty directory" in capsys.readouterr().err
    assert main(["--replay", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "nan_input_mlp").mkdir()
    (tmp_path / "nan_input_mlp" / "gradguard.db").write_text("not sqlite")
    with pytest.raises(ScoreError, match="cannot score"):
        read_findings(tmp_path / "nan_input_mlp")
    assert main(["--replay", str(tmp_path), "--runs", "nan_input_mlp"]) == 2
    assert "not a gradguard run store" in capsys.readouterr().err
