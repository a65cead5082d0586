"""The page: one offline file, a CSP that allows only its own scripts, data that cannot
break out of its element, every chart's data present."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re

import pytest

from gradguard.record.store import RunStore
from gradguard.report import render_report
from gradguard.report.page import asset, run_labels
from gradguard.report.text import script_json
from tests.report.runs import EVIL, recorded_run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return recorded_run_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def page(run_dir):
    return render_report(run_dir)


def scripts(page: str) -> list[str]:
    return re.findall(r"<script>(.*?)</script>", page, re.S)


def data(page: str) -> dict:
    block = re.search(r'<script type="application/json" id="gg-data">(.*?)</script>', page, re.S)
    return json.loads(block.group(1))


def test_the_policy_allows_exactly_the_pages_own_scripts_and_style(page):
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'"
    inline = scripts(page)
    assert len(inline) == 2  # uPlot and the report's script
    hashes = {
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in inline
    }
    assert set(directives["script-src"].split()) == hashes
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert directives["style-src"] == f"'sha256-{digest}'"
    assert "unsafe" not in policy and "connect-src" not in policy  # default-src 'none' covers it


def test_the_chart_library_is_vendored_with_its_licence(page):
    library = asset("uPlot.iife.min.js")
    assert library.startswith("/*! https://github.com/leeoniya/uPlot (v1.6.32) */")
    assert library in scripts(page)
    assert "MIT License" in asset("uPlot.LICENSE") and "Leon Sorokin" in asset("uPlot.LICENSE")
    assert len(page.encode()) < 400_000


def test_nothing_is_fetched_and_no_handler_is_inline(page):
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    assert "@import" not in page and "url(http" not in page
    assert not re.search(r"<[^>]+\son[a-z]+=", page)  # no onclick= and the like
    assert "fetch(" not in asset("report.js") and "eval(" not in asset("report.js")
    assert "innerHTML" not in asset("report.js")


def test_hostile_names_never_appear_raw(page):
    assert EVIL not in page
    assert html.escape(EVIL) in page  # as text in findings and the config table
    assert f"<th>note</th><td><code>{html.escape(EVIL)}</code></td>" in page
    layers = data(page)["runs"][0]["layers"]
    assert EVIL in [row["name"] for row in layers["rows"]]  # drawn on a canvas as text


def test_data_cannot_close_its_element():
    raw = script_json({"name": "</script><script>alert(1)</script> & <!--"})
    assert "<" not in raw and ">" not in raw and "&" not in raw
    assert json.loads(raw)["name"] == "</script><script>alert(1)</script> & <!--"


def test_every_panel_has_its_data(run_dir, page):
    run = data(page)["runs"][0]
    s = run["series"]
    with RunStore.open(run_dir) as store:
        steps = store.steps()
    n = steps["step"].size
    assert data(page)["x"] == steps["step"].tolist()  # a short run: one bucket per step
    for key in ("loss_mean", "lr", "norm_max", "threshold", "clip_rate", "clip_coef"):
        assert len(s[key]) == n, key
    assert "loss_scale" not in s  # no AMP
    assert s["skip_steps"] == steps["step"][steps["skipped"]].tolist()
    assert run["verdict"] == "recovered" and run["lost_at"] is None
    for section in ("summary", "charts", "layers", "findings", "events", "meta"):
        assert f'<section id="{section}">' in page


def test_the_summary_leads_with_the_verdict_and_numbers(page):
    summary = page.split('<section id="summary">')[1].split("</section>")[0]
    assert '<div class="verdict recovered" data-run="0">' in summary
    assert "<b>recovered from 1 incident</b>" in summary
    for row in ("final loss", "best loss", "duration", "steps/s", "skipped steps"):
        assert f"<th>{row}</th>" in summary
    assert "Read first" in summary and 'class="finding brief critical"' in summary


def test_run_labels_are_short_and_distinct():
    assert run_labels(["/x/runs/a", "/x/runs/b"]) == ["a", "b"]
    assert run_labels(["/x/one/run", "/x/two/run"]) == ["one/run", "two/run"]
    assert run_labels(["/x/a/gradguard.db"]) == ["a"]
