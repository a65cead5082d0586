"""Markdown tables from per-seed results, and the tuning-burden comparison."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from .lm import LMResult, steps_lost
from .policies import DEFAULT, NONE, is_fixed
from .rnn import RNNResult


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _num(value: float, digits: int = 3) -> str:
    return "—" if not math.isfinite(value) else f"{value:.{digits}g}"


# -- RNN --------------------------------------------------------------------------------


def rnn_score(results: Sequence[RNNResult]) -> tuple[float, float, float]:
    """Higher is better: seeds solved, then fewer steps to solve, then lower test MSE."""
    solved = [r.steps for r in results if r.solved]
    mse = _median([r.test_mse for r in results])
    return (
        sum(r.solved for r in results),
        -statistics.mean(solved) if solved else -math.inf,
        -mse if math.isfinite(mse) else -math.inf,
    )


def rnn_table(rows: dict[str, list[RNNResult]]) -> str:
    """One row per policy: seeds solved, each seed's outcome, steps and error."""
    body = []
    for name, results in rows.items():
        marks = " ".join("S" if r.solved else ("X" if r.diverged else ".") for r in results)
        solved_steps = [float(r.steps) for r in results if r.solved]
        body.append(
            [
                name,
                f"{sum(r.solved for r in results)}/{len(results)}",
                f"`{marks}`",
                _num(_median(solved_steps), 4),
                _num(_median([r.test_mse for r in results])),
                f"{statistics.mean(r.clipped for r in results):.0%}",
                str(sum(r.skipped for r in results)),
            ]
        )
    header = [
        "policy",
        "solved",
        "per seed",
        "median steps to solve",
        "median test MSE",
        "steps clipped",
        "steps skipped",
    ]
    return markdown(header, body)


# -- LM ---------------------------------------------------------------------------------


def lm_score(results: Sequence[LMResult]) -> tuple[float, float]:
    """Higher is better: fewer diverged seeds, then lower median final loss."""
    return (-sum(r.diverged for r in results), -_median([r.final_loss for r in results]))


def lm_table(rows: dict[str, list[LMResult]], reference: dict[int, LMResult]) -> str:
    """One row per policy: divergence, excess final loss and steps lost against the reference."""
    body = []
    for name, results in rows.items():
        excess = [r.final_loss - r.floor for r in results]
        lost = [float(steps_lost(r, reference[r.seed])) for r in results]
        body.append(
            [
                name,
                f"{sum(r.diverged for r in results)}/{len(results)}",
                _num(_median(excess)),
                f"{_num(min(excess))}–{_num(max(excess))}"
                if all(map(math.isfinite, excess))
                else "—",
                _num(_median(lost), 4),
                _num(max(lost), 4),
                f"{statistics.mean(r.clipped for r in results):.0%}",
                str(sum(r.skipped for r in results)),
            ]
        )
    header = [
        "policy",
        "diverged",
        "final excess loss (median)",
        "range",
        "steps lost (median)",
        "steps lost (worst)",
        "steps clipped",
        "steps skipped",
    ]
    return markdown(header, body)


# -- tuning burden ----------------------------------------------------------------------


def rnn_verdict(default: Sequence[RNNResult], best: Sequence[RNNResult]) -> str:
    """Compare seeds solved; where neither solves any, compare median test MSE (±10%)."""
    a, b = sum(r.solved for r in default), sum(r.solved for r in best)
    if a != b:
        return "beats" if a > b else "worse"
    if a > 0:
        return "matches"
    ma = _median([r.test_mse for r in default])
    mb = _median([r.test_mse for r in best])
    if math.isnan(ma) or math.isnan(mb):  # diverged on every seed
        return (
            "matches"
            if math.isnan(ma) == math.isnan(mb)
            else ("worse" if math.isnan(ma) else "beats")
        )
    if abs(ma - mb) <= 0.1 * mb:
        return "matches"
    return "beats" if ma < mb else "worse"


def lm_verdict(default: Sequence[LMResult], best: Sequence[LMResult]) -> str:
    """Compare divergences, then median excess loss within 10% (or 0.01 nats)."""
    da, db = sum(r.diverged for r in default), sum(r.diverged for r in best)
    if da != db:
        return "beats" if da < db else "worse"
    a = _median([r.final_loss - r.floor for r in default])
    b = _median([r.final_loss - r.floor for r in best])
    if abs(a - b) <= max(0.1 * b, 0.01):
        return "matches"
    return "beats" if a < b else "worse"


def burden_row(task: str, rows: dict[str, list], score, verdict, describe) -> list[str]:
    """Best hand-tuned fixed threshold vs the default and the best adaptive default."""
    fixed = {n: r for n, r in rows.items() if is_fixed(n)}
    adaptive = {n: r for n, r in rows.items() if not is_fixed(n) and n not in (NONE, DEFAULT)}
    if not fixed or not adaptive or DEFAULT not in rows:
        return []
    best_fixed = max(fixed, key=lambda n: score(fixed[n]))
    best_adaptive = max(adaptive, key=lambda n: score(adaptive[n]))
    beaten = sum(verdict(rows[DEFAULT], r) != "worse" for r in fixed.values())
    return [
        task,
        f"{best_fixed}: {describe(fixed[best_fixed])}",
        describe(rows[DEFAULT]),
        f"{best_adaptive}: {describe(adaptive[best_adaptive])}",
        verdict(rows[DEFAULT], fixed[best_fixed]),
        f"{beaten}/{len(fixed)}",
    ]


def burden_table(lines: list[list[str]]) -> str:
    """The tuning-burden table; rows lacking fixed or default results are left out."""
    lines = [line for line in lines if line]
    header = [
        "task",
        "best fixed threshold (swept)",
        "default, untuned",
        "best adaptive at defaults",
        "default vs best fixed",
        "swept thresholds the default matches or beats",
    ]
    return markdown(header, lines)


def describe_rnn(results: Sequence[RNNResult]) -> str:
    solved = [r.steps for r in results if r.solved]
    steps = f", {statistics.mean(solved):.0f} steps" if solved else ""
    if not solved:
        steps = f", test MSE {_num(_median([r.test_mse for r in results]))}"
    return f"{sum(r.solved for r in results)}/{len(results)} solved{steps}"


def describe_lm(results: Sequence[LMResult]) -> str:
    diverged = sum(r.diverged for r in results)
    excess = _median([r.final_loss - r.floor for r in results])
    return f"excess {_num(excess)}" + (f", {diverged} diverged" if diverged else "")
