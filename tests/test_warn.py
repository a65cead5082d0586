"""gradguard's warnings name the user's line and reach the ``gradguard`` logger."""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path

from gradguard import _warn


def _user_code() -> None:
    _warn.warn("something happened")  # the line a user would see


def test_warning_points_at_the_first_frame_outside_gradguard(caplog):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        _user_code()
    assert len(caught) == 1
    assert caught[0].filename == __file__
    assert "_warn.warn(" in Path(__file__).read_text().splitlines()[caught[0].lineno - 1]
    assert str(caught[0].message) == "gradguard: something happened"
    assert [r.name for r in caplog.records] == ["gradguard"]
    assert caplog.records[0].getMessage() == "gradguard: something happened"


def test_deferred_warnings_from_another_thread_surface_on_the_emitting_line():
    deferred = _warn.Deferred()
    worker = threading.Thread(target=deferred.add, args=("decided on a writer thread",))
    worker.start()
    worker.join()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deferred.emit()
        line = _line_of("deferred.emit()")
        deferred.emit()  # nothing left: no second warning
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]
    assert str(caught[0].message) == "gradguard: decided on a writer thread"


def test_logger_prints_nothing_by_itself(capsys):
    _warn.logger.warning("quiet")  # NullHandler: the warnings module is the one display
    assert capsys.readouterr().err == ""


def _line_of(text: str) -> int:
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if line.strip() == text)
