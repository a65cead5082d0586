"""The CLI never prints a traceback: fuzzed arguments and damaged stores (hypothesis).

Input errors are one line on stderr and exit 2; nothing a user passes or a file holds
reaches the internal-error path (exit 70). A writer never changes a store it cannot read.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sqlite3
import textwrap
import unittest.mock
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradguard import cli
from gradguard.record import Recorder, RunStore, StoreError
from tests.record.fake_steps import NAMES, run_steps

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A small closed store: two runs, snapshots, events, an episode."""
    root = tmp_path_factory.mktemp("base")
    for steps in (30, 24):
        with Recorder(root, log_every=4, tensor_every=3) as rec:
            rec.start(NAMES)
            run_steps(rec, range(steps))
            from gradguard.schema import Event

            rec.event(Event(5, "skip", "step 5 skipped", {"reason": "nonfinite"}))
            rec.event(Event(6, "health.spike", "spike", {"severity": "warning"}, 9, "k", False))
    factories = root.parent / "factories"
    factories.mkdir()
    (factories / "gg_fuzz_factories.py").write_text(
        textwrap.dedent(
            """
            import torch

            def raises():
                raise RuntimeError("no dataset here")

            def bad_forward():
                model = torch.nn.Linear(3, 1)
                return model, (torch.randn(4, 5), torch.randn(4, 1)), torch.nn.functional.mse_loss
            """
        )
    )
    return root


def _call(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in process; watch loops end at their first sleep."""
    out, err = io.StringIO(), io.StringIO()
    sleep = unittest.mock.patch("gradguard.watch.time.sleep", side_effect=KeyboardInterrupt)
    with sleep, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse: usage errors and --help
            code = e.code if isinstance(e.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def _assert_clean(code: int, err: str, argv: list[str]) -> None:
    assert code in (0, 1, 2, 130), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2 and err.startswith("gradguard: error:"):
        assert len(err.strip().splitlines()) == 1, (argv, err)


TARGETS = ["STORE"] * 6 + ["STORE_DB", "MISSING", "FILE", "DIR", "", "-", "\x00", "é"]
FACTORIES = [
    "gg_fuzz_factories:raises",
    "gg_fuzz_factories:bad_forward",
    "gg_fuzz_factories:missing",
    "gg_fuzz_factories",
    "m:f",
    "FILE:f",
    ":",
]
VALUES = {
    "--out": ["OUT", "-", "FILE", "DIR", "STORE_DB", "MISSING/sub/x.html", ""],
    "--format": ["csv", "jsonl", "parquet", "csv", "jsonl", "csv", "xml"],
    "--interval": ["inf", "-inf", "nan", "0", "-1", "1e309", "0.01", "1e6", "x"],
    "--run": ["1", "2", "latest", "1", "2", "3", "0", "x"],
    "--steps": ["1", "2", "0", "-3", "x", "1e3"],
}
OPTIONS = {  # each command's own options (and flags)
    "report": ["--out"],
    "watch": ["--run", "--interval", "--once"],
    "export": ["--format", "--run", "--out", "--tensors"],
    "diagnose": ["--steps"],
    "runs": [],
}


@st.composite
def arguments(draw) -> list[str]:
    """A command, a target and its options with values: mostly well-formed, some not."""
    command = draw(st.sampled_from(sorted(OPTIONS)))
    target = draw(st.sampled_from(FACTORIES if command == "diagnose" else TARGETS))
    argv = [command, target]
    wanted = draw(st.lists(st.sampled_from(OPTIONS[command] or ["-h"]), max_size=3, unique=True))
    if command == "export" and "--format" not in wanted and draw(st.integers(0, 4)):
        wanted.append("--format")
    if command == "watch" and "--once" not in wanted and draw(st.integers(0, 3)):
        wanted.append("--once")
    for name in wanted:
        argv.append(name)
        if name in VALUES and draw(st.integers(0, 9)):  # now and then a value is missing
            value = st.sampled_from(VALUES[name])
            argv.append(draw(st.one_of(value, value, value, st.text(max_size=5))))
    return argv


JUNK = st.lists(
    st.sampled_from([*OPTIONS, *VALUES, *TARGETS, "--version", "inf"]) | st.text(max_size=8),
    max_size=6,
)


@SETTINGS
@given(words=st.one_of(arguments(), arguments(), arguments(), JUNK))
def test_fuzzed_arguments_never_trace_back(base, tmp_path_factory, monkeypatch, words):
    place = tmp_path_factory.mktemp("args")
    (place / "file.txt").write_text("hello")
    store = place / "store"
    shutil.copytree(base, store)
    names = {
        "STORE": str(store),
        "STORE_DB": str(store / "gradguard.db"),
        "MISSING": str(place / "missing"),
        "FILE": str(place / "file.txt"),
        "DIR": str(place),
        "OUT": str(place / "out.file"),
    }
    argv = [names.get(w.split("/")[0], w.split("/")[0]) + w[len(w.split("/")[0]) :] for w in words]
    if "demo" in argv:
        return
    monkeypatch.chdir(place)
    monkeypatch.syspath_prepend(str(base.parent / "factories"))
    before = (store / "gradguard.db").read_bytes()
    code, _, err = _call(argv)
    _assert_clean(code, err, argv)
    assert (store / "gradguard.db").read_bytes() == before  # no command changes the store


def _edit(path: Path, sql: str) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.executescript(sql)
    except sqlite3.Error:
        pass  # an edit that does not apply leaves another valid example
    finally:
        conn.close()


EDITS = [
    "DROP TABLE steps",
    "DROP TABLE runs",
    "DROP TABLE meta",
    "DROP TABLE tensor_norms",
    "UPDATE steps SET total_norm = 'big'",
    "UPDATE steps SET loss = x'00ff'",
    "UPDATE steps SET reason = 1e300",
    "UPDATE steps SET reason = 2.5",
    "UPDATE steps SET step = -step",
    "UPDATE steps SET clipped = 'yes'",
    "UPDATE steps SET threshold = -1e308, lr = 9e307",
    "UPDATE tensor_norms SET norms = x'0102'",
    "UPDATE tensor_norms SET norms = 42",
    "UPDATE tensor_norms SET step = NULL",
    "UPDATE events SET data = 'not json'",
    "UPDATE events SET data = '\"a string\"'",
    "UPDATE events SET step = 'x'",
    "UPDATE events SET message = x'ff00'",
    "UPDATE events SET kind = NULL",
    "UPDATE events SET end_step = 'later'",
    "UPDATE meta SET value = '{' WHERE key = 'schema_version'",
    "UPDATE meta SET value = '99' WHERE key = 'schema_version'",
    "UPDATE meta SET value = '\"2\"' WHERE key = 'schema_version'",
    "UPDATE meta SET value = 'true' WHERE key = 'schema_version'",
    "UPDATE runs SET names = '[1, 2]'",
    "UPDATE runs SET names = '{}'",
    "UPDATE runs SET config = '[]'",
    "UPDATE runs SET shapes = 'x'",
    "UPDATE runs SET resumed = '5'",
    "UPDATE runs SET started = NULL",
    "UPDATE runs SET run = 'one'",
    "UPDATE runs SET pid = 'p'",
    "DELETE FROM runs",
    "ALTER TABLE steps RENAME TO old_steps",
    "CREATE TABLE extra (x)",
]


@st.composite
def damage(draw) -> tuple[str, object]:
    kind = draw(st.sampled_from(["flip", "truncate", "edit", "edits"]))
    if kind == "flip":
        flips = st.tuples(st.integers(0, 10**6), st.integers(0, 7))
        return kind, draw(st.lists(flips, min_size=1, max_size=8))
    if kind == "truncate":
        return kind, draw(st.floats(0.0, 0.999))
    if kind == "edit":
        return kind, [draw(st.sampled_from(EDITS))]
    return kind, draw(st.lists(st.sampled_from(EDITS), min_size=2, max_size=4))


def _damage(path: Path, kind: str, detail) -> None:
    if kind == "flip":
        data = bytearray(path.read_bytes())
        for offset, bit in detail:
            data[offset % len(data)] ^= 1 << bit
        path.write_bytes(bytes(data))
    elif kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * detail)])
    else:
        for sql in detail:
            _edit(path, sql)


def _openable(path: Path) -> bool:
    """Whether the store opens: header, tables, meta (damage inside rows may remain, and
    does not stop a writer from adding a run)."""
    try:
        RunStore.open(path).close()
        return True
    except StoreError:
        return False


@SETTINGS
@given(damaged=damage())
def test_damaged_stores_give_one_line_errors_and_are_never_written(base, tmp_path_factory, damaged):
    place = tmp_path_factory.mktemp("damaged")
    run = place / "run"
    shutil.copytree(base, run)
    db = run / "gradguard.db"
    _damage(db, *damaged)
    for argv in (
        ["watch", str(run), "--once"],
        ["export", str(run), "--format", "csv", "--out", "-"],
        ["export", str(run), "--format", "jsonl", "--tensors", "--out", "-", "--run", "1"],
        ["runs", str(run)],
        ["report", str(run), "--out", str(place / "report.html")],
    ):
        code, _, err = _call(argv)
        assert code in (0, 2), (damaged, argv, code, err)
        _assert_clean(code, err, argv)
        if code == 2:
            assert str(run) in err, err
    openable = _openable(db)
    before = db.read_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Recorder(run, log_every=2) as rec:  # training goes on either way
            rec.start(NAMES)
            run_steps(rec, range(3))
    if not openable:  # a store that does not even open is never written
        assert db.read_bytes() == before, damaged
        assert any("RunStore" in str(w.message) for w in caught), damaged
