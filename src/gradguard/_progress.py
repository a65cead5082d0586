"""Progress bars for long loops: rich or tqdm when installed, a plain bar otherwise.

Bars are drawn on stderr, and only when it is a terminal (a log file or a pipe gets
nothing). ``pip install 'gradguard[console]'`` brings rich; tqdm is used when rich is
absent; neither is required.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import TextIO, TypeVar

T = TypeVar("T")
BACKENDS = ("rich", "tqdm", "plain")


def available_backend() -> str:
    """The best installed backend: ``rich``, ``tqdm`` or ``plain``."""
    for name in BACKENDS[:2]:
        if importlib.util.find_spec(name) is not None:
            return name
    return "plain"


def progress(
    items: Iterable[T],
    label: str,
    total: int | None = None,
    *,
    stream: TextIO | None = None,
    backend: str | None = None,
) -> Iterator[T]:
    """Yield ``items`` while drawing a bar labelled ``label`` on ``stream`` (stderr).

    Nothing is drawn unless ``stream`` is a terminal; ``backend`` forces ``rich``,
    ``tqdm`` or ``plain`` (default: :func:`available_backend`).
    """
    stream = stream if stream is not None else sys.stderr
    if not stream.isatty():
        yield from items
        return
    if total is None and isinstance(items, Sized):
        total = len(items)
    backend = backend or available_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "rich":
        yield from _rich(items, label, total, stream)
    elif backend == "tqdm":
        from tqdm import tqdm

        yield from tqdm(items, desc=label, total=total, file=stream, leave=True)
    else:
        yield from _plain(items, label, total, stream)


def _rich(items: Iterable[T], label: str, total: int | None, stream: TextIO) -> Iterator[T]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    console = Console(file=stream)
    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        yield from bar.track(items, total=total, description=label)


def _plain(items: Iterable[T], label: str, total: int | None, stream: TextIO) -> Iterator[T]:
    count = total or 0
    start = time.perf_counter()
    done = 0
    for item in items:
        _draw(stream, label, done, count, start)
        yield item
        done += 1
    _draw(stream, label, done, count, start)
    stream.write("\n")


def _draw(stream: TextIO, label: str, done: int, total: int, start: float) -> None:
    width = 24
    filled = width * done // max(total, 1)
    bar = "#" * filled + " " * (width - filled)
    elapsed = time.perf_counter() - start
    stream.write(f"\r{label} [{bar}] {done}/{total} {elapsed:5.1f}s")
    stream.flush()
