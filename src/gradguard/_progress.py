"""A minimal progress bar on stderr, shown only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], label: str, total: int | None = None) -> Iterator[T]:
    """Yield ``items``, drawing ``label [#####     ] i/n  t s`` on a terminal."""
    stream = sys.stderr
    if not stream.isatty():
        yield from items
        return
    count = total if total is not None else len(items)  # type: ignore[arg-type]
    start = time.perf_counter()
    for index, item in enumerate(items):
        _draw(stream, label, index, count, start)
        yield item
    _draw(stream, label, count, count, start)
    stream.write("\n")


def _draw(stream, label: str, done: int, total: int, start: float) -> None:
    width = 24
    filled = width * done // max(total, 1)
    bar = "#" * filled + " " * (width - filled)
    elapsed = time.perf_counter() - start
    stream.write(f"\r{label} [{bar}] {done}/{total} {elapsed:5.1f}s")
    stream.flush()
