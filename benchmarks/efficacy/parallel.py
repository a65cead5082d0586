"""Run independent training jobs in worker processes (forked: the parent's modules)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any


def starmap(fn: Callable[..., Any], specs: Sequence[tuple], jobs: int = 1) -> list[Any]:
    """``[fn(*spec) for spec in specs]``, over ``jobs`` processes when ``jobs > 1``."""
    if jobs > 1 and specs:
        with ProcessPoolExecutor(jobs, mp_context=get_context("fork")) as pool:
            return list(pool.map(fn, *zip(*specs)))
    return [fn(*spec) for spec in specs]


def sweep_arguments(
    argv: list[str] | None, doc: str | None, rows: Sequence[str], seeds: int, **extra: Any
) -> tuple[Any, list[str]]:
    """Parse a sweep's command line (``--seeds``, ``--jobs``, ``--rows``, and each
    ``extra`` name as ``--name`` of its default's type); returns the arguments and the
    rows, ``none`` first (the unclipped reference every row is compared with)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--seeds", type=int, default=seeds)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--rows", default=",".join(rows))
    for name, default in extra.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    chosen = args.rows.split(",")
    return args, chosen if "none" in chosen else ["none", *chosen]
