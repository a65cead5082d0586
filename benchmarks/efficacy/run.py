"""Run the efficacy experiments and print markdown tables.

``python -m benchmarks.efficacy [--quick] [--seeds N] [--only rnn|lm] [--jobs J]``
(or ``python benchmarks/efficacy/run.py ...``) from the repository root. Every run
trains through :class:`gradguard.Guard` with the policy of its row plugged in; the
row ``none`` measures through the guard but never changes a gradient.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from typing import Any

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    __package__ = "benchmarks.efficacy"

import torch

from . import lm, rnn, tables
from .policies import NONE, roster


@dataclass(frozen=True)
class Experiment:
    """A set of tasks, the fixed thresholds swept on them, and how to train and tabulate."""

    key: str
    title: str
    tasks: tuple[Any, ...]
    thresholds: tuple[float, ...]
    train: Callable[..., Any]


def experiments(quick: bool, steps: int | None = None) -> list[Experiment]:
    """The experiments at full size, or a quick configuration; ``steps`` overrides both."""
    rnn_tasks = (
        rnn.RNNConfig(task="addition", length=20, lr=0.05),
        rnn.RNNConfig(task="addition", length=20, lr=0.1),
        rnn.RNNConfig(task="multiplication", length=20, lr=0.2),
    )
    lm_tasks = (
        lm.LMConfig(name="reference", bad_batches=()),
        lm.LMConfig(name="bad batches"),
        lm.LMConfig(name="high LR", lr=3e-2, bad_batches=()),
    )
    if quick:
        rnn_tasks = tuple(replace(t, steps=200, eval_every=20) for t in rnn_tasks)
        lm_tasks = tuple(
            replace(t, steps=60, bad_batches=(20, 21, 40) if t.bad_batches else ())
            for t in lm_tasks
        )
    if steps is not None:
        rnn_tasks = tuple(
            replace(t, steps=steps, eval_every=min(t.eval_every, steps)) for t in rnn_tasks
        )
        lm_tasks = tuple(replace(t, steps=steps) for t in lm_tasks)
    return [
        Experiment(
            "rnn",
            "Long-range tasks, vanilla tanh RNN, SGD (Pascanu et al. 2013)",
            rnn_tasks,
            (0.1, 0.3, 1.0, 3.0, 10.0),
            rnn.train,
        ),
        Experiment(
            "lm",
            "Loss-spike recovery, 2-layer transformer LM, AdamW",
            lm_tasks,
            (0.3, 1.0, 3.0),
            lm.train,
        ),
    ]


def _job(key: str, quick: bool, steps: int | None, task_index: int, name: str, seed: int) -> Any:
    torch.set_num_threads(1)
    # Skips are counted in the tables; the guard's one-time warning per run is noise here.
    warnings.filterwarnings("ignore", "gradguard: step", RuntimeWarning)
    experiment = next(e for e in experiments(quick, steps) if e.key == key)
    config = experiment.tasks[task_index]
    factory = roster(experiment.thresholds, with_candidates=True)[name]
    return experiment.train(config, name, factory, seed)


def _rows_for(
    experiment: Experiment, config: Any, rows: list[str] | None, with_candidates: bool
) -> list[str]:
    if experiment.key == "lm" and config.name == "reference":
        return [NONE]
    names = list(roster(experiment.thresholds, with_candidates))
    if rows is not None:
        unknown = sorted(set(rows) - set(names))
        if unknown:
            raise ValueError(f"rows: unknown policies {unknown}; known: {names}")
        names = [n for n in names if n in rows]
    return names


def run_experiment(
    experiment: Experiment,
    quick: bool,
    seeds: int,
    jobs: int = 1,
    steps: int | None = None,
    rows: list[str] | None = None,
    with_candidates: bool = False,
) -> dict:
    """Train every (task, policy, seed); returns ``{task index: {policy: [results]}}``."""
    specs = [
        (experiment.key, quick, steps, i, name, seed)
        for i, config in enumerate(experiment.tasks)
        for name in _rows_for(experiment, config, rows, with_candidates)
        for seed in range(seeds)
    ]
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=get_context("fork")) as pool:
            results = list(pool.map(_job, *zip(*specs)))
    else:
        torch.set_num_threads(1)
        results = [_job(*spec) for spec in specs]
    grouped: dict[int, dict[str, list]] = {}
    for (_, _, _, i, name, _), result in zip(specs, results):
        grouped.setdefault(i, {}).setdefault(name, []).append(result)
    return grouped


def render(experiment: Experiment, grouped: dict, seeds: int) -> tuple[str, list[list[str]]]:
    """Markdown for one experiment, and its rows of the tuning-burden table."""
    parts = [f"## {experiment.title}", ""]
    burden = []
    if experiment.key == "rnn":
        for i, config in enumerate(experiment.tasks):
            rows = grouped[i]
            parts += [
                f"### {config.label}, {config.steps} steps, {seeds} seeds, "
                f"solved = test MSE < {config.solve_mse:.2g}",
                "",
                tables.rnn_table(rows),
                "",
                "`S` solved, `.` not solved, `X` diverged (non-finite loss), one per seed.",
                "",
            ]
            burden.append(
                tables.burden_row(
                    config.label, rows, tables.rnn_score, tables.rnn_verdict, tables.describe_rnn
                )
            )
    else:
        index = {c.name: i for i, c in enumerate(experiment.tasks)}
        reference = {r.seed: r for r in grouped[index["reference"]][NONE]}
        ref_excess = [r.final_loss - r.floor for r in reference.values()]
        parts.append(
            "Reference (no clipping, no bad batches, base LR): final excess loss "
            + ", ".join(f"{v:.3f}" for v in ref_excess)
            + " per seed."
        )
        parts.append("")
        for i, config in enumerate(experiment.tasks):
            if config.name == "reference":
                continue
            rows = grouped[i]
            bad = f", bad batches at steps {list(config.bad_batches)} (loss ×{config.bad_scale:g})"
            parts += [
                f"### {config.label}: AdamW lr {config.lr:g}, {config.steps} steps, "
                f"{seeds} seeds{bad if config.bad_batches else ''}",
                "",
                tables.lm_table(rows, reference),
                "",
            ]
            burden.append(
                tables.burden_row(
                    f"LM, {config.label}",
                    rows,
                    tables.lm_score,
                    tables.lm_verdict,
                    tables.describe_lm,
                )
            )
    return "\n".join(parts), burden


def run_all(
    quick: bool = False,
    seeds: int = 3,
    *,
    only: str | None = None,
    jobs: int = 1,
    steps: int | None = None,
    rows: list[str] | None = None,
    candidates: bool = False,
) -> str:
    """Run the experiments and return their markdown tables, tuning burden last.

    ``quick`` picks the small configuration; ``only`` one experiment (``"rnn"`` or
    ``"lm"``); ``jobs`` worker processes (one thread each); ``steps`` overrides the
    number of training steps of every task (for smoke tests); ``rows`` restricts the
    policies run; ``candidates`` adds the proposed future defaults.
    """
    out, burden = [], []
    for experiment in experiments(quick, steps):
        if only is not None and experiment.key != only:
            continue
        start = time.perf_counter()
        grouped = run_experiment(experiment, quick, seeds, jobs, steps, rows, candidates)
        text, lines = render(experiment, grouped, seeds)
        out += [text, f"_{experiment.key}: {time.perf_counter() - start:.0f} s wall._", ""]
        burden += lines
    out += ["## Tuning burden: the untuned default against the best swept fixed threshold", ""]
    out.append(tables.burden_table(burden))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny configuration (under a minute): checks the machinery, too short for results",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", choices=("rnn", "lm"))
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (1 thread each)")
    parser.add_argument("--steps", type=int, help="override every task's number of steps")
    parser.add_argument("--rows", help="comma-separated policy rows to run (default: all)")
    parser.add_argument("--candidates", action="store_true", help="add candidate defaults")
    args = parser.parse_args(argv)
    rows = args.rows.split(",") if args.rows else None
    text = run_all(
        args.quick,
        args.seeds,
        only=args.only,
        jobs=args.jobs,
        steps=args.steps,
        rows=rows,
        candidates=args.candidates,
    )
    print(text)


if __name__ == "__main__":
    main()
