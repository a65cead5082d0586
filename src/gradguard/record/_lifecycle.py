"""Process-exit hooks: flush on SIGTERM (then chain to the previous handler) and at exit."""

from __future__ import annotations

import atexit
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any


class ExitHooks:
    """Installs a SIGTERM handler (main thread only) and an atexit hook; :meth:`remove` undoes both.

    ``on_signal(signum)`` returns ``True`` when it finished the recorder's work, then the
    previous handler runs: a Python handler is called, the default action re-delivers the
    signal (the process dies as it would have), an ignored signal stays ignored.
    """

    def __init__(self, on_signal: Callable[[int], bool], on_exit: Callable[[], None]) -> None:
        self._on_signal = on_signal
        self._on_exit = on_exit
        self._previous: Any = None
        self._installed_signal = False
        atexit.register(self._on_exit)
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
                self._installed_signal = True
            except (ValueError, OSError):  # embedded interpreters, unusual platforms
                self._installed_signal = False

    def remove(self) -> None:
        """Restore the previous SIGTERM handler (if ours is still set); drop the atexit hook."""
        atexit.unregister(self._on_exit)
        if self._installed_signal and threading.current_thread() is threading.main_thread():
            self._installed_signal = False
            if signal.getsignal(signal.SIGTERM) == self._handle:
                signal.signal(signal.SIGTERM, self._previous if self._previous is not None
                              else signal.SIG_DFL)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._on_signal(signum):
            self.chain(signum, frame)

    def chain(self, signum: int, frame: FrameType | None = None) -> None:
        """Hand the signal to whatever handled it before us."""
        previous = self._previous
        self.remove()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_IGN:
            return
        else:  # SIG_DFL or unknown (installed from C): die as the default would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
