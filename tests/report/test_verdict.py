"""The verdict line and headline numbers: healthy, recovered from N incidents, lost at N."""

from __future__ import annotations

import math

import numpy as np

from gradguard.health import Finding, Kind, Severity
from gradguard.report.data import RunData
from gradguard.report.verdict import (
    LOST_SKIPPED_TAIL,
    incidents,
    lost_at,
    summarize,
    top_findings,
    verdict,
)
from gradguard.schema import SkipReason


def make_run(n=100, findings=(), **columns) -> RunData:
    steps = {
        "step": np.arange(n),
        "total_norm": np.full(n, 0.5),
        "clip_coef": np.ones(n),
        "threshold": np.full(n, np.inf),
        "clipped": np.zeros(n, dtype=bool),
        "skipped": np.zeros(n, dtype=bool),
        "reason": np.zeros(n, dtype=np.int64),
        "loss": np.linspace(2.0, 1.0, n),
        "lr": np.full(n, 0.1),
        "loss_scale": np.full(n, np.nan),
    }
    steps.update(columns)
    run = RunData("r", {}, (), steps, np.zeros(0), (), np.zeros((0, 0)), [])
    run.findings = list(findings)
    run.wall_seconds = 20.0
    return run


def finding(kind, severity, a, b) -> Finding:
    return Finding(kind, severity, (a, b), (), {}, (), f"{kind.value} {a}")


def test_a_clean_run_is_healthy_with_its_numbers():
    run = make_run()
    v = verdict(run)
    assert (v.state, v.text, v.lost_at) == ("healthy", "healthy", None)
    s = summarize(run)
    assert s.steps == 100 and (s.first_step, s.last_step) == (0, 99)
    assert s.final_window == 50
    assert math.isclose(s.final_loss, float(np.linspace(2.0, 1.0, 100)[-50:].mean()))
    assert (s.best_loss, s.best_step) == (1.0, 99)
    assert s.steps_per_second == 5.0 and s.median_norm == 0.5


def test_a_run_whose_loss_stays_nan_is_lost_where_the_tail_starts():
    loss = np.linspace(2.0, 1.0, 100)
    loss[60:] = np.nan
    norm = np.full(100, 0.5)
    norm[61:] = np.nan
    run = make_run(loss=loss, total_norm=norm)
    v = verdict(run)
    assert (v.state, v.text, v.lost_at) == ("lost", "lost at step 60", 60)
    assert math.isnan(summarize(run).final_loss)
    assert lost_at(run.steps) == 60


def test_without_a_recorded_loss_the_norm_decides():
    norm = np.full(100, 0.5)
    norm[90:] = np.inf
    assert lost_at(make_run(loss=np.full(100, np.nan), total_norm=norm).steps) == 90


def test_skipped_bad_steps_are_survived_unless_they_never_end():
    norm, skipped = np.full(100, 0.5), np.zeros(100, dtype=bool)
    norm[[40, 98, 99]] = np.nan
    skipped[[40, 98, 99]] = True
    loss = np.linspace(2.0, 1.0, 100)
    loss[[40, 98, 99]] = np.nan
    run = make_run(total_norm=norm, skipped=skipped, loss=loss)
    assert lost_at(run.steps) is None  # a guard skipping the last two bad batches
    assert verdict(run).state == "ongoing"  # but the incident is still open at the end
    tail = LOST_SKIPPED_TAIL
    norm[-tail:] = np.nan
    skipped[-tail:] = True
    assert lost_at(make_run(total_norm=norm, skipped=skipped).steps) == 100 - tail


def test_incidents_merge_findings_and_skips_and_ignore_advice_and_amp_overflows():
    skipped, reason = np.zeros(100, dtype=bool), np.zeros(100, dtype=np.int64)
    skipped[[50, 70]] = True
    reason[50] = SkipReason.NONFINITE
    reason[70] = SkipReason.AMP_OVERFLOW
    found = [
        finding(Kind.SPIKE, Severity.INFO, 20, 21),
        finding(Kind.NONFINITE, Severity.CRITICAL, 50, 50),
        finding(Kind.CLIP_INACTIVE, Severity.WARNING, 0, 99),  # advice, not an incident
        finding(Kind.EXPLODING, Severity.CRITICAL, 22, 30),
    ]
    run = make_run(findings=found, skipped=skipped, reason=reason)
    assert incidents(run) == [(20, 30), (50, 50)]
    v = verdict(run)
    assert (v.state, v.text) == ("recovered", "recovered from 2 incidents")


def test_a_single_incident_reads_in_the_singular():
    run = make_run(findings=[finding(Kind.SPIKE, Severity.WARNING, 10, 12)])
    assert verdict(run).text == "recovered from 1 incident"


def test_final_loss_ignores_a_skipped_nan_batch_before_the_end():
    loss = np.ones(100)
    loss[80] = np.nan
    assert summarize(make_run(loss=loss)).final_loss == 1.0


def test_an_empty_run():
    run = make_run(n=0)
    assert verdict(run).state == "empty"
    s = summarize(run)
    assert s.steps == 0 and s.last_step is None and math.isnan(s.steps_per_second)


def test_top_findings_are_the_most_severe_then_the_earliest():
    found = [
        finding(Kind.SPIKE, Severity.INFO, 1, 1),
        finding(Kind.NONFINITE, Severity.CRITICAL, 90, 90),
        finding(Kind.EXPLODING, Severity.CRITICAL, 30, 40),
        finding(Kind.DEAD_LAYER, Severity.WARNING, 0, 99),
    ]
    assert [f.steps[0] for f in top_findings(found, 3)] == [30, 90, 0]
