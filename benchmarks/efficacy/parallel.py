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
