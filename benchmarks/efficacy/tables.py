"""Markdown tables from per-seed results, verdicts, and the tuning-burden comparison.

Rows are paired by seed: every policy of a task trains on the same data and initial
weights for a given seed. A *verdict* compares two rows: ``solve`` tasks by seeds
solved, then (where neither solves) median test error within 10%; ``loss`` tasks by
seeds diverged, then median final loss within the seeds' noise (one standard deviation
across seeds of the row compared against, at least 0.5% of its median excess).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from .lm import steps_lost
from .loop import Result
from .policies import DEFAULT, NONE, OLD_DEFAULT, REWIND, is_fixed

Rows = dict[str, list[Result]]


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    """Median of the finite values (NaN when there are none)."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def num(value: float, digits: int = 3) -> str:
    return "—" if not math.isfinite(value) else f"{value:.{digits}g}"


def _clip_rate(results: Sequence[Result]) -> str:
    return f"{statistics.mean(r.clipped for r in results):.0%}"


def _rewinds(results: Sequence[Result]) -> str:
    count = sum(len(r.rewinds) for r in results)
    if not count:
        return "0"
    lost = [e["steps_lost"] for r in results for e in r.rewinds]
    return f"{count} (median {statistics.median(lost):g} steps lost)"


# -- per-task tables --------------------------------------------------------------------


def solve_table(rows: Rows) -> str:
    """Seeds solved, each seed's outcome, steps and error (``S`` solved, ``X`` diverged)."""
    body = []
    for name, results in rows.items():
        marks = " ".join("S" if r.solved else ("X" if r.diverged else ".") for r in results)
        solved_steps = [float(r.steps) for r in results if r.solved]
        body.append(
            [
                name,
                f"{sum(r.solved for r in results)}/{len(results)}",
                f"`{marks}`",
                num(median(solved_steps), 4),
                num(median([r.final for r in results])),
                _clip_rate(results),
                str(sum(r.skipped for r in results)),
                _rewinds(results),
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
        "rewinds",
    ]
    return markdown(header, body)


def loss_table(rows: Rows, reference: dict[int, Result] | None) -> str:
    """Divergence, final (excess) loss, steps lost against the reference, activity."""
    body = []
    for name, results in rows.items():
        excess = [r.excess for r in results]
        cells = [
            name,
            f"{sum(r.diverged for r in results)}/{len(results)}",
            num(median(excess)),
            f"{num(min(excess))}–{num(max(excess))}" if all(map(math.isfinite, excess)) else "—",
        ]
        if reference is not None:
            lost = [float(steps_lost(r, reference[r.seed])) for r in results]
            cells += [num(median(lost), 4), num(max(lost), 4)]
        if "accuracy" in results[0].extra:
            cells.append(f"{median([r.extra['accuracy'] for r in results]):.1%}")
        cells += [_clip_rate(results), str(sum(r.skipped for r in results)), _rewinds(results)]
        body.append(cells)
    first = next(iter(rows.values()))[0]
    metric = "final excess loss" if first.floor else "final loss"
    header = ["policy", "diverged", f"{metric} (median)", "range"]
    if reference is not None:
        header += ["steps lost (median)", "steps lost (worst)"]
    if "accuracy" in first.extra:
        header.append("test accuracy (median)")
    header += ["steps clipped", "steps skipped", "rewinds"]
    return markdown(header, body)


# -- verdicts ---------------------------------------------------------------------------


def solve_score(results: Sequence[Result]) -> tuple[float, float, float]:
    """Higher is better: seeds solved, then fewer steps to solve, then lower test MSE."""
    solved = [r.steps for r in results if r.solved]
    mse = median([r.final for r in results])
    return (
        sum(r.solved for r in results),
        -statistics.mean(solved) if solved else -math.inf,
        -mse if math.isfinite(mse) else -math.inf,
    )


def loss_score(results: Sequence[Result]) -> tuple[float, float]:
    """Higher is better: fewer diverged seeds, then lower median final loss."""
    final = median([r.final for r in results])
    return (-sum(r.diverged for r in results), -final if math.isfinite(final) else -math.inf)


def solve_verdict(a: Sequence[Result], b: Sequence[Result]) -> str:
    """``a`` against ``b``: seeds solved; where neither solves, median test MSE (±10%)."""
    sa, sb = sum(r.solved for r in a), sum(r.solved for r in b)
    if sa != sb:
        return "beats" if sa > sb else "worse"
    if sa > 0:
        return "matches"
    ma, mb = median([r.final for r in a]), median([r.final for r in b])
    if math.isnan(ma) or math.isnan(mb):  # diverged on every seed
        if math.isnan(ma) == math.isnan(mb):
            return "matches"
        return "worse" if math.isnan(ma) else "beats"
    if abs(ma - mb) <= 0.1 * mb:
        return "matches"
    return "beats" if ma < mb else "worse"


def noise(results: Sequence[Result]) -> float:
    """The seeds' noise of a row: standard deviation across seeds of the final metric,
    at least 0.5% of the median excess loss."""
    finals = [r.final for r in results if math.isfinite(r.final)]
    spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
    excess = median([r.excess for r in results])
    return max(spread, 0.005 * abs(excess) if math.isfinite(excess) else 0.0)


def loss_verdict(a: Sequence[Result], b: Sequence[Result]) -> str:
    """``a`` against ``b``: seeds diverged, then median final loss within ``b``'s noise."""
    da, db = sum(r.diverged for r in a), sum(r.diverged for r in b)
    if da != db:
        return "beats" if da < db else "worse"
    ma, mb = median([r.final for r in a]), median([r.final for r in b])
    if math.isnan(ma) or math.isnan(mb):
        return "matches"
    if abs(ma - mb) <= noise(b):
        return "matches"
    return "beats" if ma < mb else "worse"


def describe(kind: str, results: Sequence[Result]) -> str:
    """One cell summarising a row: solved count and steps, or final loss."""
    if kind == "solve":
        solved = [r.steps for r in results if r.solved]
        if solved:
            return f"{len(solved)}/{len(results)} solved, {statistics.mean(solved):.0f} steps"
        return f"0/{len(results)} solved, test MSE {num(median([r.final for r in results]))}"
    diverged = sum(r.diverged for r in results)
    label = "excess" if results[0].floor else "loss"
    text = f"{label} {num(median([r.excess for r in results]))}"
    return text + (f", {diverged} diverged" if diverged else "")


SCORE = {"solve": solve_score, "loss": loss_score}
VERDICT = {"solve": solve_verdict, "loss": loss_verdict}


# -- tuning burden ----------------------------------------------------------------------


def burden_row(task: str, kind: str, rows: Rows, judged: str = DEFAULT) -> list[str]:
    """Best hand-tuned fixed threshold against the ``judged`` row and the best adaptive."""
    fixed = {n: r for n, r in rows.items() if is_fixed(n)}
    adaptive = {n: r for n, r in rows.items() if not is_fixed(n) and n not in (NONE, judged)}
    if not fixed or judged not in rows:
        return []
    score, verdict = SCORE[kind], VERDICT[kind]
    best_fixed = max(fixed, key=lambda n: score(fixed[n]))
    best_adaptive = max(adaptive, key=lambda n: score(adaptive[n])) if adaptive else None
    matched = sum(verdict(rows[judged], r) != "worse" for r in fixed.values())
    return [
        task,
        f"{best_fixed}: {describe(kind, fixed[best_fixed])}",
        describe(kind, rows[judged]),
        f"{best_adaptive}: {describe(kind, adaptive[best_adaptive])}" if best_adaptive else "—",
        verdict(rows[judged], fixed[best_fixed]),
        verdict(rows[judged], rows[NONE]) if NONE in rows else "—",
        f"{matched}/{len(fixed)}",
    ]


def burden_table(lines: list[list[str]], judged: str = DEFAULT) -> str:
    """The tuning-burden table; rows lacking fixed or judged results are left out."""
    header = [
        "task",
        "best fixed threshold (swept)",
        f"{judged}, untuned",
        "best other adaptive at defaults",
        "vs best fixed",
        "vs unclipped",
        "swept thresholds matched or beaten",
    ]
    return markdown(header, [line for line in lines if line])


def healthy_row(task: str, kind: str, rows: Rows, judged: Sequence[str]) -> list[list[str]]:
    """Per judged row on a healthy task: clip rate, and final metric against unclipped."""
    if NONE not in rows:
        return []
    out = []
    for name in judged:
        if name not in rows:
            continue
        results = rows[name]
        out.append(
            [
                task,
                name,
                describe(kind, rows[NONE]),
                describe(kind, results),
                VERDICT[kind](results, rows[NONE]),
                _clip_rate(results),
                str(sum(r.skipped for r in results)),
            ]
        )
    return out


def healthy_table(lines: list[list[str]]) -> str:
    header = [
        "healthy task",
        "policy",
        "unclipped",
        "with the policy",
        "vs unclipped",
        "steps clipped",
        "steps skipped",
    ]
    return markdown(header, lines)


# -- runs lost --------------------------------------------------------------------------

#: Rows of the runs-lost table.
SAFETY_ROWS = (NONE, OLD_DEFAULT, DEFAULT, DEFAULT + REWIND)


def safety_row(task: str, rows: Rows, lost) -> list[str]:
    """Runs lost (``lost(result)``) per row, and the rewinds of the rewind row."""
    cells = [task]
    for name in SAFETY_ROWS:
        results = rows.get(name)
        if not results:
            cells.append("—")
            continue
        gone = sum(bool(lost(r)) for r in results)
        nonfinite = sum(r.diverged for r in results)
        cells.append(f"{gone}/{len(results)}" + (f" ({nonfinite} non-finite)" if nonfinite else ""))
    events = [e for r in rows.get(DEFAULT + REWIND, []) for e in r.rewinds]
    if events:
        lost_steps = [e["steps_lost"] for e in events]
        runs = sum(bool(r.rewinds) for r in rows[DEFAULT + REWIND])
        cells.append(
            f"{len(events)} in {runs} runs; {statistics.median(lost_steps):g} "
            f"(max {max(lost_steps)}) steps lost each"
        )
    else:
        cells.append("none")
    return cells


def safety_table(lines: list[list[str]]) -> str:
    header = ["task", *(f"lost: {name}" for name in SAFETY_ROWS), f"rewinds ({DEFAULT}{REWIND})"]
    return markdown(header, lines)
