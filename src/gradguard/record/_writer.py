"""Where a flushed batch gets written: on a background thread, or inline.

Both keep a ``durable`` flag: cleared when a job is handed over, set once the job's
run-store transaction has committed (the job calls :meth:`mark_durable`, or finishes).
The recorder waits for it before buffering the next interval, which bounds what a
SIGKILL can lose to one ``log_every`` interval.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

Work = Callable[..., None]


class InlineWriter:
    """Writes on the caller's thread."""

    def __init__(self, work: Work) -> None:
        self._work = work

    def submit(self, *job: Any) -> None:
        self._work(*job)

    def mark_durable(self) -> None:
        """Nothing waits: a job is written before ``submit`` returns."""

    def wait_durable(self) -> None:
        """Nothing is ever pending."""

    def on_writer_thread(self) -> bool:
        return False

    def drain(self) -> None:
        """Nothing is ever pending."""

    def stop(self) -> None:
        """Nothing to stop."""


class BackgroundWriter:
    """Runs ``work(*job)`` on one daemon thread, one job at a time.

    ``submit`` waits until the previous job is done, so at most one job is in flight:
    the caller blocks only when writing is slower than the interval between flushes.
    The work must not raise (the recorder's sinks and listeners are wrapped to warn).
    """

    def __init__(self, work: Work) -> None:
        self._work = work
        self._jobs: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._durable = threading.Event()
        self._durable.set()

    def submit(self, *job: Any) -> None:
        if self.on_writer_thread():
            self._work(*job)  # a flush from inside the writer (e.g. a listener): no deadlock
            return
        self._ensure_thread()
        self._jobs.join()
        self._durable.clear()
        self._jobs.put(job)

    def mark_durable(self) -> None:
        """Called by the job once what must survive a crash is committed."""
        self._durable.set()

    def wait_durable(self) -> None:
        """Wait until the job in flight has committed its durable part."""
        if not self._durable.is_set() and not self.on_writer_thread():
            self._durable.wait()

    def on_writer_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def drain(self) -> None:
        """Wait until every submitted job is written."""
        if self._thread is not None and not self.on_writer_thread():
            self._jobs.join()

    def stop(self) -> None:
        """Write what is pending, then end the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None or threading.current_thread() is thread:
            return
        self._jobs.put(None)
        thread.join()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="gradguard-writer", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                self._work(*job)
            finally:
                self._durable.set()
                self._jobs.task_done()
