"""CLI errors: one line and exit 2 for input errors, 70 for internal ones; runs and --run."""

from __future__ import annotations

import sys
import textwrap

import pytest

from gradguard import cli
from gradguard.record import Recorder
from tests.record.fake_steps import NAMES, run_steps


@pytest.fixture
def two_runs(tmp_path):
    for steps in (12, 8):
        with Recorder(tmp_path / "run", log_every=4) as rec:
            rec.start(NAMES)
            run_steps(rec, range(steps))
    return tmp_path / "run"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("gradguard: error:") and len(err.strip().splitlines()) == 1, err
    return err


def test_runs_lists_every_run_and_run_selects_one(two_runs, capsys):
    assert cli.main(["runs", str(two_runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:5] for line in lines] == [
        ["run", "1", "closed", "12", "steps"],
        ["run", "2", "closed", "8", "steps"],
    ]
    assert cli.main(["export", str(two_runs), "--format", "csv", "--out", "-"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 8  # the latest run
    assert cli.main(["export", str(two_runs), "--format", "csv", "--out", "-", "--run", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 12
    assert cli.main(["watch", str(two_runs), "--once", "--run", "1"]) == 0
    assert "run 1 (closed)" in capsys.readouterr().out
    assert cli.main(["watch", str(two_runs), "--once", "--run", "5"]) == 2
    assert "no run 5 (runs: 1, 2)" in _one_line_error(capsys)


def test_export_never_writes_over_the_store(two_runs, capsys):
    db = two_runs / "gradguard.db"
    before = db.read_bytes()
    assert cli.main(["export", str(two_runs), "--format", "csv", "--out", str(db)]) == 2
    assert "is a database (a run store)" in _one_line_error(capsys)
    assert db.read_bytes() == before


@pytest.mark.parametrize("target", ["gradguard.db", "gradguard.db-wal", "other.sqlite"])
def test_report_and_export_never_write_over_a_database(two_runs, tmp_path, target, capsys):
    # the store read, or any other SQLite file (another run's store, renamed or not), or
    # the write-ahead log beside one: a report or an export over it would destroy a run
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "gradguard.db").write_bytes((two_runs / "gradguard.db").read_bytes())
    (other / "other.sqlite").write_bytes((two_runs / "gradguard.db").read_bytes())
    (other / "gradguard.db-wal").write_bytes(b"")
    out = other / target
    before = out.read_bytes()
    for argv in (["report", str(two_runs)], ["export", str(two_runs), "--format", "jsonl"]):
        assert cli.main([*argv, "--out", str(out)]) == 2
        assert "is a database (a run store)" in _one_line_error(capsys)
        assert out.read_bytes() == before
    # the report's own store, named by its file
    db = two_runs / "gradguard.db"
    store_bytes = db.read_bytes()
    assert cli.main(["report", str(two_runs), "--out", str(db)]) == 2
    assert db.read_bytes() == store_bytes


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-2", "1e9", "x"])
def test_watch_interval_must_be_a_sane_number(two_runs, value, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["watch", str(two_runs), "--interval", value])
    assert exc.value.code == 2 and "--interval" in capsys.readouterr().err


FACTORY = """
import torch

def raises():
    raise RuntimeError("no dataset here")

def bad_forward():
    model = torch.nn.Linear(3, 1)
    return model, (torch.randn(4, 5), torch.randn(4, 1)), torch.nn.functional.mse_loss
"""


@pytest.mark.parametrize(
    "name, words",
    [
        ("raises", "the factory raised RuntimeError: no dataset here"),
        ("bad_forward", "running the model failed with RuntimeError"),
    ],
)
def test_diagnose_user_code_errors_are_input_errors(tmp_path, monkeypatch, capsys, name, words):
    (tmp_path / "gg_cli_factory.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "gg_cli_factory", raising=False)
    assert cli.main(["diagnose", f"gg_cli_factory:{name}", "--steps", "1"]) == 2
    assert words in _one_line_error(capsys)


def test_an_internal_error_is_one_line_and_exit_70(two_runs, monkeypatch, capsys):
    import gradguard.export

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(gradguard.export, "export", broken)
    argv = ["export", str(two_runs), "--format", "csv"]
    assert cli.main(argv) == 70
    assert "internal error (ZeroDivisionError: a bug); please report it" in _one_line_error(capsys)
    monkeypatch.setenv("GRADGUARD_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(argv)


COMMANDS = [["report", "RUN"], ["export", "RUN", "--format", "csv"], ["demo"]]
READERS = [["report"], ["export", "--format", "csv"], ["runs"], ["watch"]]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("out", ["", "a\x00b"])
def test_an_output_path_the_os_cannot_create_is_a_usage_error(two_runs, command, out, capsys):
    argv = [str(two_runs) if word == "RUN" else word for word in command]
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--out", out])
    assert exc.value.code == 2 and "--out: expected a file path" in capsys.readouterr().err


@pytest.mark.parametrize("command", READERS)
def test_a_run_directory_the_os_cannot_name_is_a_usage_error(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*command[:1], "a\x00b", *command[1:]])
    assert exc.value.code == 2 and "expected a file path" in capsys.readouterr().err
