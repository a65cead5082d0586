"""The report's entry points: one run or several, where the file goes, its size bound."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from gradguard.report import MAX_REPORT_BYTES, build_report, default_output, render_report
from tests.report.runs import write_synthetic


def data(page: str) -> dict:
    block = re.search(r'<script type="application/json" id="gg-data">(.*?)</script>', page, re.S)
    return json.loads(block.group(1))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_synthetic(root / "a", 300, ["l1.weight", "l2.weight"], every=10, batch=300)
    write_synthetic(root / "b", 500, ["l1.weight", "l2.weight"], every=10, batch=500)
    return root


def test_one_run_writes_next_to_its_store(two_runs):
    path = build_report(two_runs / "a")
    assert path == two_runs / "a" / "report.html"
    assert path.read_text().startswith("<!DOCTYPE html>")


def test_several_runs_share_one_axis_and_one_file(two_runs):
    path = build_report([two_runs / "a", two_runs / "b"])
    assert path == default_output([two_runs / "a", two_runs / "b"]) == two_runs / "compare.html"
    page = path.read_text()
    d = data(page)
    assert [r["label"] for r in d["runs"]] == ["a", "b"]
    assert d["x"] == list(range(500))  # the longer run's steps; the shorter one ends early
    a, b = (r["series"]["norm_max"] for r in d["runs"])
    assert len(a) == len(b) == 500 and a[300:] == [None] * 200
    assert b.count(None) == 1  # its one inf step, marked apart
    assert page.count('<div class="verdict ') == 2
    assert "gradguard report: a vs b" in page


def test_labels_name_the_runs(two_runs):
    page = render_report([two_runs / "a", two_runs / "b"], labels=["base", "tuned"])
    assert [r["label"] for r in data(page)["runs"]] == ["base", "tuned"]
    with pytest.raises(ValueError, match="labels"):
        render_report([two_runs / "a"], labels=["x", "y"])
    with pytest.raises(ValueError, match="at least one"):
        render_report([])


def test_a_long_wide_run_stays_under_the_bound_and_keeps_its_spikes(tmp_path):
    n = 200_000
    names = [f"blocks.{i // 10}.m{(i % 10) // 2}.{('weight', 'bias')[i % 2]}" for i in range(500)]
    truth = write_synthetic(tmp_path / "big", n, names, every=50)
    path = build_report(tmp_path / "big", tmp_path / "big.html", rules=False)
    size = path.stat().st_size
    assert size < MAX_REPORT_BYTES
    d = data(path.read_text())
    assert len(d["x"]) == 2000 and d["x"][0] == 0 and d["x_end"][-1] == n - 1
    top = d["runs"][0]["series"]["norm_max"]
    for step in truth["spikes"]:
        assert top[int(np.searchsorted(d["x"], step, side="right")) - 1] == 1e4
