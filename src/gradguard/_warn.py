"""gradguard's warnings: attributed to the user's line, and sent to the ``gradguard`` logger.

A warning raised deep inside gradguard (or inside a training framework that called it)
points at the first frame outside both, so ``warnings.filterwarnings(module=...)`` and
the printed location name the user's code. Every warning is also logged on
``logging.getLogger("gradguard")`` (which has a ``NullHandler``, so nothing is printed
twice unless the user adds a handler) for users who route messages through logging.

Warnings decided off the training thread (the recorder's writer thread runs the health
rules) have no user frame; :class:`Deferred` holds them until the training thread
calls :meth:`Deferred.emit`, at the user's ``guard.step`` line.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings

logger = logging.getLogger("gradguard")
logger.addHandler(logging.NullHandler())

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: Top-level packages whose frames are skipped too: a warning from inside a framework's
#: training loop belongs to the user's line that started it.
_FRAMEWORKS = (
    "torch",
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "transformers",
    "accelerate",
    "deepspeed",
    "keras",
    "tensorflow",
    "paddle",
    "jax",
    "optax",
    "numpy",  # np.errstate as a decorator wraps gradguard's own functions
    "threading",
    "contextlib",
)


def _is_library_frame(filename: str, module: str) -> bool:
    if os.path.abspath(filename).startswith(_PACKAGE_DIR):
        return True
    top = module.split(".", 1)[0]
    return top in _FRAMEWORKS


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in this function's caller
    name the first frame outside gradguard and the training frameworks."""
    frame = sys._getframe(1)  # the caller of user_stacklevel (inside gradguard)
    level = 1
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not _is_library_frame(frame.f_code.co_filename, module):
            return level
        frame = frame.f_back
        level += 1
    return 1


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """Warn at the user's line and log on the ``gradguard`` logger.

    ``message`` is prefixed with ``"gradguard: "`` unless it already is.
    """
    text = message if message.startswith("gradguard:") else f"gradguard: {message}"
    logger.warning(text)
    warnings.warn(text, category, stacklevel=user_stacklevel())


class Deferred:
    """Warnings queued on any thread and emitted later on the training thread."""

    def __init__(self) -> None:
        self._pending: list[tuple[str, type[Warning]]] = []
        self._lock = threading.Lock()

    def add(self, message: str, category: type[Warning] = RuntimeWarning) -> None:
        """Queue a warning (thread-safe)."""
        with self._lock:
            self._pending.append((message, category))

    def emit(self) -> None:
        """Emit the queued warnings at the user's line (call from the training thread)."""
        if not self._pending:
            return
        with self._lock:
            pending, self._pending = self._pending, []
        for message, category in pending:
            text = message if message.startswith("gradguard:") else f"gradguard: {message}"
            logger.warning(text)
            warnings.warn(text, category, stacklevel=user_stacklevel())
