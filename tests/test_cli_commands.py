"""``gradguard report | watch | diagnose | export`` end to end in subprocesses."""

from __future__ import annotations

import csv
import json
import math
import sqlite3
import textwrap

import pytest

from tests.report.runs import EVIL, NAN_STEP, STEPS, recorded_run_dir, run_cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return recorded_run_dir(tmp_path_factory)


@pytest.mark.parametrize("command", ["report", "watch", "diagnose", "export"])
def test_every_command_has_help(command, capsys):
    from gradguard import cli

    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: gradguard " + command)


def test_report_command_writes_the_file(run_dir, tmp_path):
    target = tmp_path / "out" / "r.html"
    out = run_cli("report", str(run_dir), "--out", str(target))
    assert out.returncode == 0, out.stderr
    assert str(target) in out.stdout
    text = target.read_text()
    assert text.startswith("<!DOCTYPE html>") and 'id="findings"' in text


def test_report_command_compares_runs(run_dir, tmp_path):
    target = tmp_path / "cmp.html"
    out = run_cli(
        "report", str(run_dir), str(run_dir), "--label", "a", "--label", "b", "--out", str(target)
    )
    assert out.returncode == 0, out.stderr
    assert target.resolve().as_uri() in out.stdout
    page = target.read_text()
    assert page.count('<div class="verdict ') == 2 and "gradguard report: a vs b" in page
    out = run_cli("report", str(run_dir), str(run_dir), "--label", "a")
    assert out.returncode == 2 and "--label: give one per run (2), got 1" in out.stderr


@pytest.mark.parametrize("command", ["report", "watch", "export"])
def test_bad_run_directories_are_usage_errors_without_traceback(command, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "gradguard.db").write_bytes(b"this is not sqlite at all" * 10)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    extra = ["--format", "csv"] if command == "export" else ["--once"] if command == "watch" else []
    from gradguard import cli

    for target, words in (
        (tmp_path / "missing", "does not exist"),
        (empty, "no gradguard run"),
        (corrupt, "not a gradguard run store"),
        (foreign, "not a gradguard"),
    ):
        assert cli.main([command, str(target), *extra]) == 2, target
        err = capsys.readouterr().err
        assert err.startswith("gradguard: error:") and words in err, err
    out = run_cli(command, str(corrupt), *extra)  # and once as a real process
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_watch_once_prints_one_frame(run_dir):
    out = run_cli("watch", str(run_dir), "--once")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"step {STEPS - 1}" in text
    assert "clip rate" in text
    spark = next(line for line in text.splitlines() if line.startswith("norm (log"))
    assert "!" in spark  # the NaN step is marked
    assert any(ch in spark for ch in "▁▂▃▄▅▆▇█")
    assert f"nonfinite @ step {NAN_STEP}" in text


def test_watch_reads_a_store_while_it_is_written(tmp_path):
    from gradguard.record.store import RunStore
    from gradguard.schema import STEP_COLUMNS, HostBatch
    from gradguard.watch import render_frame

    store = RunStore(tmp_path / "live")
    store.start(["a.weight"], config={})
    try:

        def write(a, b):
            cols = {c: [0.5] * (b - a) for c in STEP_COLUMNS}
            store.write(HostBatch(list(range(a, b)), cols, ("a.weight",)))

        write(0, 10)
        first = render_frame(tmp_path / "live")
        write(10, 25)
        second = render_frame(tmp_path / "live")
    finally:
        store.close()
    assert "step 9 " in first and "step 24 " in second
    assert "last 25 steps" in second


def test_export_csv_and_jsonl_round_trip_the_steps(run_dir, tmp_path):
    from gradguard.record.store import RunStore

    with RunStore.open(run_dir) as store:
        steps = store.steps()
        snap_steps, names, _ = store.tensor_norms()
    out = run_cli("export", str(run_dir), "--format", "csv", "--out", str(tmp_path / "s.csv"))
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert len(rows) == steps["step"].size
    assert [int(r["step"]) for r in rows] == steps["step"].tolist()
    for r, norm in zip(rows, steps["total_norm"].tolist()):
        if math.isfinite(norm):
            assert float(r["total_norm"]) == norm
    assert int(rows[NAN_STEP]["skipped"]) == 1
    out = run_cli("export", str(run_dir), "--format", "jsonl", "--tensors", "--out", "-")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == snap_steps.size * len(names)
    assert {line["name"] for line in lines} == set(names) and EVIL + ".weight" in names


def test_export_parquet_or_a_clear_error(run_dir, tmp_path, capsys):
    from gradguard import cli

    target = tmp_path / "s.parquet"
    code = cli.main(["export", str(run_dir), "--format", "parquet", "--out", str(target)])
    try:
        import pandas as pd
        import pyarrow  # noqa: F401
    except ImportError:
        assert code == 2 and "pandas and pyarrow" in capsys.readouterr().err
        return
    assert code == 0
    frame = pd.read_parquet(target)
    assert len(frame) == STEPS and list(frame.columns)[:2] == ["step", "total_norm"]


def test_export_parquet_names_the_extra_when_pyarrow_is_missing(run_dir, monkeypatch, capsys):
    import sys

    from gradguard import cli

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    code = cli.main(["export", str(run_dir), "--format", "parquet", "--out", "x.parquet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "pandas and pyarrow" in err and "gradguard[parquet]" in err


FACTORIES = """
import torch
from torch import nn


def healthy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    return model, (torch.randn(16, 4), torch.randn(16, 1)), nn.functional.mse_loss


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(30))
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        for layer in self.layers:
            x = torch.sigmoid(layer(x))
        return x


def vanishing():
    torch.manual_seed(0)
    return Deep(), (torch.randn(16, 8), torch.randn(16, 8)), nn.functional.mse_loss


class Log(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 1)

    def forward(self, x):
        return self.b(torch.log(self.a(x) - 100.0))


def nonfinite():
    return Log(), (torch.randn(8, 4), torch.randn(8, 1)), nn.functional.mse_loss


def wrong():
    return 42
"""


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    root = tmp_path_factory.mktemp("factories")
    (root / "gg_factories.py").write_text(textwrap.dedent(FACTORIES))
    return root


def test_diagnose_healthy_model_exits_0(factories):
    out = run_cli("diagnose", "gg_factories:healthy", "--steps", "3", cwd=factories)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "findings: none" in out.stdout
    assert "recommended clip threshold: 1 " in out.stdout  # default family starts at 1


def test_diagnose_reports_vanishing_and_dead_layers(factories):
    out = run_cli("diagnose", str(factories / "gg_factories.py") + ":vanishing")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "vanishing_layer" in out.stdout and "layers.0" in out.stdout
    assert "dead_layer" in out.stdout and "unused" in out.stdout


def test_diagnose_names_the_nonfinite_origin(factories):
    out = run_cli("diagnose", "gg_factories:nonfinite", "--steps", "2", cwd=factories)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "CRITICAL nonfinite" in out.stdout
    # log() of negative values in the parent's forward: b is the first module with a
    # non-finite output, and b.bias the first non-finite gradient in backward order
    assert "origin b.bias" in out.stdout
    assert "forward check: first non-finite output at module b" in out.stdout


@pytest.mark.parametrize(
    "spec, words",
    [
        ("no_colon", "MODULE:FUNCTION"),
        ("gg_nope_module:f", "cannot import"),
        ("gg_factories:missing", "no callable"),
        ("gg_factories:wrong", "(model, batch, loss_fn)"),
    ],
)
def test_diagnose_usage_errors_exit_2(factories, spec, words, monkeypatch, capsys):
    from gradguard import cli

    monkeypatch.chdir(factories)
    monkeypatch.syspath_prepend(str(factories))
    assert cli.main(["diagnose", spec]) == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["watch", "RUN", "--interval", "0"],
        ["export", "RUN", "--format", "xml"],
        ["diagnose", "m:f", "--steps", "0"],
        ["report"],
    ],
)
def test_bad_options_exit_2(run_dir, args, capsys):
    from gradguard import cli

    with pytest.raises(SystemExit) as exc:
        cli.main([str(run_dir) if a == "RUN" else a for a in args])
    assert exc.value.code == 2
    assert "usage: gradguard" in capsys.readouterr().err


def test_diagnose_threshold_comes_from_measured_norms_with_enough_passes(factories, monkeypatch):
    from gradguard.diagnose import load_factory, probe, report

    monkeypatch.syspath_prepend(str(factories))
    result = probe(load_factory("gg_factories:healthy"), steps=20)
    assert result.exit_code == 0
    median = sorted(result.total_norms)[10]
    assert median <= result.threshold <= 10 * median
    assert "p95 of 20 unclipped norms" in report(result)
