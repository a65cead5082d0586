"""``gradguard demo``: the unguarded run is lost, the guarded one survives, one report."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import gradguard


def test_demo_prints_each_run_and_writes_one_comparison_report(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "gradguard.cli", "demo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "the seeds'" not in text
    assert "an MLP's first-layer\n   gradient vanishing with depth" in text
    unguarded, guarded = text.split("guarded (gradguard.Guard")
    assert "weights finite: False" in unguarded
    assert "lost at step 450: the loss is non-finite from there to the end" in unguarded
    assert "weights finite: True" in guarded
    assert "skipped step 450: nonfinite" in guarded
    assert "The guard kept the run alive." in text
    report = tmp_path / "compare.html"
    assert f"  {report.resolve().as_uri()}\n" in text
    assert not (tmp_path / "unguarded" / "report.html").exists()
    page = report.read_text()
    data = json.loads(re.search(r'id="gg-data">(.*?)</script>', page, re.S).group(1))
    assert [(r["label"], r["verdict"], r["lost_at"]) for r in data["runs"]] == [
        ("unguarded", "lost", 450),
        ("guarded", "recovered", None),
    ]
    assert "<b>lost at step 450</b>" in page and "<b>recovered from" in page
    stored = gradguard.RunStore.open(tmp_path / "guarded")
    assert stored.steps()["skipped"].sum() == 1
    stored.close()


def test_the_efficacy_experiments_are_not_part_of_the_demo():
    out = subprocess.run(
        [sys.executable, "-m", "gradguard.cli", "demo", "--full"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "--full" in out.stderr
