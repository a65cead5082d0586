"""Progress bars: rich, tqdm or plain, drawn only on a terminal, never changing the items."""

from __future__ import annotations

import io

import pytest

from gradguard._progress import available_backend, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("backend", ["rich", "tqdm", "plain"])
def test_each_backend_draws_its_bar_and_yields_every_item(backend):
    pytest.importorskip(backend) if backend != "plain" else None
    stream = Terminal()
    assert list(progress(range(30), "training", stream=stream, backend=backend)) == list(range(30))
    drawn = stream.getvalue()
    assert "training" in drawn and "30/30" in drawn.replace(" ", "").replace("it", "")


def test_nothing_is_drawn_when_the_stream_is_not_a_terminal():
    stream = io.StringIO()
    assert list(progress(iter("abc"), "x", stream=stream)) == ["a", "b", "c"]
    assert stream.getvalue() == ""


def test_the_plain_bar_fills_as_items_pass():
    stream = Terminal()
    for _ in progress(range(4), "run", stream=stream, backend="plain"):
        pass
    frames = stream.getvalue().split("\r")[1:]
    assert [f.split("]")[1].split()[0] for f in frames] == ["0/4", "1/4", "2/4", "3/4", "4/4"]
    assert "[########################]" in frames[-1]


def test_an_unknown_backend_is_refused_and_the_best_one_is_found():
    with pytest.raises(ValueError, match="backend must be one of"):
        list(progress(range(2), "x", stream=Terminal(), backend="curses"))
    assert available_backend() in ("rich", "tqdm", "plain")
