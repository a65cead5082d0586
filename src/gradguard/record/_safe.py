"""Fault isolation: a failing sink or listener is disabled with one warning; training goes on."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from .._warn import warn as _warn


class Guarded:
    """Wraps a sink (or listener); the first exception disables it with one warning.

    ``warn(message)`` reports the fault; the recorder passes one that defers warnings
    decided on its writer thread to the training thread (see :class:`~gradguard._warn.Deferred`).
    """

    def __init__(
        self,
        target: Any,
        label: str | None = None,
        warn: Callable[[str], None] = _warn,
    ) -> None:
        self.target = target
        self.label = label or _describe(target)
        self.failed: BaseException | None = None
        self._warn = warn

    @property
    def alive(self) -> bool:
        return self.failed is None

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``target.method(*args)``; return ``None`` if disabled or it raised."""
        if self.failed is not None:
            return None
        fn: Callable[..., Any] = getattr(self.target, method) if method else self.target
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            self._disable(method, e)
            return None

    def _disable(self, method: str, error: Exception) -> None:
        self.failed = error
        where = f" in {method}()" if method else ""
        self._warn(
            f"gradguard: {self.label} failed{where} and is disabled for the rest of the run "
            f"({type(error).__name__}: {error}); training goes on"
        )
        close = getattr(self.target, "close", None)
        if method != "close" and callable(close):
            with contextlib.suppress(Exception):  # a broken sink may fail to close too
                close()


def _describe(target: Any) -> str:
    path = getattr(target, "path", None)
    name = (
        type(target).__name__
        if not callable(target) or hasattr(target, "write")
        else getattr(target, "__qualname__", repr(target))
    )
    return f"{name}({str(path)!r})" if path is not None else name
