"""The report in a real headless browser: it renders, logs no console error, runs no script.

Needs Debian's ``chromium`` (``apt-get install -y chromium``); skipped when absent.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gradguard.report import build_report
from tests.report.runs import EVIL, recorded_run_dir

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"
)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--enable-logging=stderr",
    "--v=0",
)


def chromium(tmp: Path, page: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *extra, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=90,
    )


def console_errors(stderr: str) -> list[str]:
    return [
        line
        for line in stderr.splitlines()
        if "Uncaught" in line or "ERROR:CONSOLE" in line or "CONSOLE(" in line
    ]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    run_dir = recorded_run_dir(tmp_path_factory)
    return build_report(run_dir, tmp_path_factory.mktemp("html") / "report.html")


def test_report_renders_in_chromium_with_a_screenshot(report, tmp_path):
    shot = tmp_path / "report.png"
    out = chromium(tmp_path, report, f"--screenshot={shot}", "--window-size=1400,2000")
    assert shot.is_file(), out.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    assert console_errors(out.stderr) == []


def test_rendered_dom_holds_the_plots_and_the_name_as_text(report, tmp_path):
    out = chromium(tmp_path, report, "--dump-dom")
    dom = out.stdout
    assert console_errors(out.stderr) == []
    assert dom.count("<svg") >= 4  # total norm, clip rate, heatmap, latest layers
    assert "<polygon" in dom and "<polyline" in dom and "<image" in dom
    # the parameter named like a script tag is text, never an element
    assert html.escape(EVIL) in dom
    assert not re.search(r"<script[^>]*>\s*alert", dom)
    assert "<script" not in dom


def test_the_console_check_catches_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>notDefined();</script></body></html>")
    out = chromium(tmp_path, page, "--dump-dom")
    assert any("notDefined" in line for line in console_errors(out.stderr))
