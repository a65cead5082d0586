"""Run the efficacy suite and print markdown tables.

``python -m benchmarks.efficacy [--quick] [--seeds N] [--seed-base S] [--tasks a,b]
[--rows r1,r2] [--jobs J]`` from the repository root. Every run trains
through :class:`gradguard.Guard` with the policy of its row plugged in; the row ``none``
measures through the guard but never changes a gradient. Seeds ``seed-base`` to
``seed-base + seeds - 1`` are used (the reported tables use 0–4; develop on others).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    __package__ = "benchmarks.efficacy"

import torch

from . import suite, tables
from .policies import DEFAULT, NONE, OLD_DEFAULT, REWIND, resolve, row_names
from .suite import SWEEP, Task


def _job(key: str, quick: bool, steps: int | None, name: str, seed: int) -> Any:
    torch.set_num_threads(1)
    # Skips and rewinds are counted in the tables; the guard's warnings are noise here.
    warnings.filterwarnings("ignore", "gradguard:", RuntimeWarning)
    warnings.filterwarnings("ignore", "gradguard:", UserWarning)
    task = suite.by_key(suite.tasks(quick, steps))[key]
    factory, rewind = resolve(name, SWEEP)
    return task.train(task.config, name, factory, seed, rewind)


#: Rows of the healthy tasks: does a default stay out of the way?
HEALTHY_ROWS = (NONE, DEFAULT, OLD_DEFAULT, DEFAULT + REWIND)


def rows_for(task: Task, rows: list[str] | None) -> list[str]:
    """The rows a task runs: the requested ones, else its own list or the full roster."""
    if rows is not None:
        names = list(rows)
    elif task.healthy:
        names = list(HEALTHY_ROWS)
    elif task.rows is not None:
        names = list(task.rows)
    else:
        names = row_names(SWEEP)
    for name in names:
        resolve(name, SWEEP)  # unknown rows fail before anything runs
    return names


def plan(
    selected: list[Task], known: dict[str, Task], rows: list[str] | None
) -> dict[str, list[str]]:
    """Rows per task key, with the unclipped rows of every reference a task needs."""
    out = {t.key: rows_for(t, rows) for t in selected}
    for task in selected:
        if task.healthy and NONE not in out[task.key]:
            out[task.key].insert(0, NONE)
        if task.reference is not None:
            if task.reference not in known:
                raise ValueError(f"task {task.key}: unknown reference {task.reference!r}")
            ref = out.setdefault(task.reference, [])
            if NONE not in ref:
                ref.insert(0, NONE)
    return out


def run_all(
    quick: bool = False,
    seeds: int = 3,
    *,
    seed_base: int = 0,
    only: list[str] | None = None,
    jobs: int = 1,
    steps: int | None = None,
    rows: list[str] | None = None,
    judged: list[str] | None = None,
    save: str | None = None,
) -> str:
    """Run the tasks and return their markdown tables, then the summaries.

    ``only`` picks task keys (default: all); ``rows`` restricts the policies run (a row
    ``"fb:knob=value;..."`` is FeedbackClip with other settings); ``judged`` names the
    rows compared with the best fixed threshold and with unclipped runs (default: the
    default, the old default, and the default with rewind). ``save`` names a folder where each
    task's results are pickled as soon as they are done (:func:`render_saved` reads
    them back), so a long run interrupted loses only the task in progress.
    """
    all_tasks = suite.tasks(quick, steps)
    known = suite.by_key(all_tasks)
    unknown = sorted(set(only or ()) - set(known))
    if unknown:
        raise ValueError(f"tasks: unknown {unknown}; known: {list(known)}")
    selected = [t for t in all_tasks if only is None or t.key in only]
    todo = plan(selected, known, rows)
    specs = [
        (key, quick, steps, name, seed)
        for key, names in todo.items()
        for name in names
        for seed in range(seed_base, seed_base + seeds)
    ]
    start = time.perf_counter()
    grouped: dict[str, dict[str, list]] = {}
    pool = ProcessPoolExecutor(jobs, mp_context=get_context("fork")) if jobs > 1 else None
    try:
        for key in todo:  # task by task, so each can be saved when done
            mine = [spec for spec in specs if spec[0] == key]
            began = time.perf_counter()
            if pool is not None:
                results = list(pool.map(_job, *zip(*mine)))
            else:
                results = [_job(*spec) for spec in mine]
            for (_, _, _, name, _), result in zip(mine, results):
                grouped.setdefault(key, {}).setdefault(name, []).append(result)
            if save is not None:
                _save(save, key, grouped[key], time.perf_counter() - began)
    finally:
        if pool is not None:
            pool.shutdown()
    wall = time.perf_counter() - start
    return render(selected, grouped, seeds, seed_base, judged, wall)


def _save(folder: str, key: str, rows: dict[str, list], wall: float) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{key}.pkl"), "wb") as handle:
        pickle.dump({"rows": rows, "wall": wall}, handle)


def render_saved(
    folders: list[str], seeds: int, seed_base: int = 0, judged: list[str] | None = None
) -> str:
    """The tables of results saved by ``run_all(save=...)`` in ``folders``: later folders
    add rows or seeds to a task, or replace the runs of a row with the same seed."""
    by_seed: dict[str, dict[str, dict[int, Any]]] = {}
    wall = 0.0
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".pkl"):
                with open(os.path.join(folder, name), "rb") as handle:
                    saved = pickle.load(handle)
                task = by_seed.setdefault(name[:-4], {})
                for row, results in saved["rows"].items():
                    task.setdefault(row, {}).update({r.seed: r for r in results})
                wall += saved["wall"]
    grouped = {
        key: {row: [runs[s] for s in sorted(runs)] for row, runs in rows.items()}
        for key, rows in by_seed.items()
    }
    selected = [t for t in suite.tasks() if t.key in grouped]
    return render(selected, grouped, seeds, seed_base, judged, wall)


def render(
    selected: list[Task],
    grouped: dict[str, dict[str, list]],
    seeds: int,
    seed_base: int,
    judged: list[str] | None,
    wall: float,
) -> str:
    """Markdown: one table per task, then the tuning-burden and healthy-run summaries."""
    run_names = {n for rows in grouped.values() for n in rows}
    if judged is None:
        judged = [n for n in (DEFAULT, OLD_DEFAULT, DEFAULT + REWIND) if n in run_names]
    seed_text = f"seeds {seed_base}–{seed_base + seeds - 1}"
    parts: list[str] = []
    burden: dict[str, list[list[str]]] = {j: [] for j in judged}
    healthy: list[list[str]] = []
    safety: list[list[str]] = []
    for task in selected:
        rows = grouped[task.key]
        steps = getattr(task.config, "steps", "")
        runs = [r for results in rows.values() for r in results]
        seconds = sum(r.seconds for r in runs)
        parts += [
            f"### {task.label} (`{task.key}`), {steps} steps, {seed_text}",
            "",
            f"_{len(runs)} runs, {seconds:.0f} s of training in all._",
            "",
        ]
        if task.kind == "solve":
            parts += [
                f"Solved = test MSE < {task.config.solve_mse:.2g}. `S` solved, `.` not "
                "solved, `X` diverged (non-finite loss), one per seed.",
                "",
                tables.solve_table(rows),
                "",
            ]
        else:
            ref = None
            if task.reference is not None and NONE in grouped.get(task.reference, {}):
                ref = {r.seed: r for r in grouped[task.reference][NONE]}
            parts += [tables.loss_table(rows, ref), ""]
        safety.append(tables.safety_row(task.key, rows, task.config.lost))
        if task.healthy:
            healthy += tables.healthy_row(task.key, task.kind, rows, judged)
        else:
            for name in judged:
                burden[name].append(tables.burden_row(task.key, task.kind, rows, name))
    for name, lines in burden.items():
        if any(lines):
            title = f"### Tuning burden: `{name}`, untuned, against the best swept fixed threshold"
            parts += [title, "", tables.burden_table(lines, name), ""]
    if healthy:
        parts += ["### Healthy runs", "", tables.healthy_table(healthy), ""]
    parts += ["### Runs lost", "", tables.safety_table(safety), ""]
    parts.append(f"_{len(selected)} tasks, {seed_text}: {wall:.0f} s wall._")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny configuration (a minute or two): checks the machinery, too short for results",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-base", type=int, default=0, help="first seed (reported: 0)")
    parser.add_argument("--tasks", help="comma-separated task keys (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (1 thread each)")
    parser.add_argument("--steps", type=int, help="override every task's number of steps")
    parser.add_argument(
        "--rows", help=f"comma-separated policy rows (default: all); '<row>{REWIND}' adds rewind"
    )
    parser.add_argument("--judged", help="rows compared with the best fixed threshold")
    parser.add_argument("--save", help="folder: pickle each task's results when done")
    parser.add_argument(
        "--render", help="comma-separated folders of saved results: print their tables, run nothing"
    )
    args = parser.parse_args(argv)
    split = lambda text: text.split(",") if text else None  # noqa: E731
    if args.render:
        folders = split(args.render)
        print(render_saved(folders, args.seeds, args.seed_base, split(args.judged)))
        return
    text = run_all(
        args.quick,
        args.seeds,
        seed_base=args.seed_base,
        only=split(args.tasks),
        jobs=args.jobs,
        steps=args.steps,
        rows=split(args.rows),
        judged=split(args.judged),
        save=args.save,
    )
    print(text)


if __name__ == "__main__":
    main()
