"""The report in a real headless Chromium driven by Playwright: it loads without a console
error, every chart draws, hover shows values, a zoom on one chart moves the others,
clicking a finding highlights its range, a comparison shows both runs, hostile names
stay text, and the Content-Security-Policy blocks any script but the page's own.

Needs the system Chromium (``apt-get install -y chromium``) and Playwright's Python
package (the ``dev`` extra); no browser is downloaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gradguard.report import build_report
from tests.report.runs import EVIL, NAN_STEP, recorded_run_dir, write_synthetic

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]')"
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"
)

#: Pixels whose channels differ by more than this are "ink" of a coloured series,
#: not the grey grid, axes and text.
SATURATED = 60


class Page:
    """A loaded report page and everything it logged."""

    def __init__(self, browser, path: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1300, "height": 1000})
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(path.as_uri())

    def ready(self) -> Page:
        self.page.wait_for_function("window.gradguardReport && window.gradguardReport.ready")
        return self

    def js(self, expression: str, arg=None):
        return self.page.evaluate(expression, arg)

    def x_range(self, chart: str) -> list[float]:
        return self.js(
            "c => [window.gradguardReport.charts[c].scales.x.min, "
            "window.gradguardReport.charts[c].scales.x.max]",
            chart,
        )

    def over(self, chart: str) -> dict:
        """The box of the chart's plotting area (where the mouse hovers and drags)."""
        area = self.page.locator(f"#panel-{chart} .u-over")
        area.scroll_into_view_if_needed()
        return area.bounding_box()


INK = """
([chart, saturated]) => {
  let ctx, x = 0, y = 0, w, h;
  if (chart === "heatmap") {
    const canvas = document.getElementById("heatmap-canvas");
    ctx = canvas.getContext("2d"); w = canvas.width; h = canvas.height;
  } else {
    const u = window.gradguardReport.charts[chart];
    ctx = u.ctx; x = u.bbox.left; y = u.bbox.top; w = u.bbox.width; h = u.bbox.height;
  }
  const px = ctx.getImageData(x, y, w, h).data;
  let n = 0;
  for (let i = 0; i < px.length; i += 4) {
    const hi = Math.max(px[i], px[i + 1], px[i + 2]), lo = Math.min(px[i], px[i + 1], px[i + 2]);
    if (px[i + 3] > 0 && hi - lo > saturated) n++;
  }
  return n;
}
"""

PIXEL = """
([c, step]) => {
  const u = window.gradguardReport.charts[c];
  const x = Math.round(u.valToPos(step, "x", true)), y = Math.round(u.bbox.top + u.bbox.height - 3);
  return Array.from(u.ctx.getImageData(x, y, 1, 1).data);
}
"""


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return recorded_run_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory) -> Path:
    return build_report(run_dir, tmp_path_factory.mktemp("html") / "report.html")


@pytest.fixture(scope="module")
def comparison(run_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    names = ["inp.weight", "out.weight"]
    write_synthetic(root / "synthetic", 300, names, every=10, batch=300, training=True)
    return build_report([run_dir, root / "synthetic"], root / "compare.html")


def test_the_page_loads_without_errors_and_every_chart_draws(browser, report):
    page = Page(browser, report).ready()
    charts = page.js("Object.keys(window.gradguardReport.charts)")
    assert set(charts) == {"loss", "lr", "norm", "clip", "history"}
    for chart in charts:
        assert page.js(INK, [chart, SATURATED]) > 150, chart
    heat = page.js(INK, ["heatmap", SATURATED])
    assert heat > 2000
    assert page.errors == [] and page.dialogs == []


def test_hovering_a_chart_shows_the_step_and_values(browser, report):
    page = Page(browser, report).ready()
    legend = page.page.locator("#panel-norm .u-legend .u-value")
    assert legend.first.inner_text() == "–"
    box = page.over("norm")
    page.page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    page.page.wait_for_function(
        "() => document.querySelector('#panel-norm .u-legend .u-value').textContent !== '–'"
    )
    values = legend.all_inner_texts()
    assert values[0].startswith("step ")
    step = int(values[0].split()[1])
    assert 80 <= step <= 120
    norm = page.page.locator("#panel-norm .u-legend tr", has_text="total norm").locator(".u-value")
    assert float(norm.inner_text().split()[0]) > 0
    # the cursor is synced: the loss chart shows the same step
    assert page.page.locator("#panel-loss .u-legend .u-value").first.inner_text() == values[0]


def heatmap_step_at(page: Page, fraction: float) -> int:
    """The snapshot step the heatmap shows at ``fraction`` of its width (its tooltip)."""
    canvas = page.page.locator("#heatmap-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    page.page.mouse.move(box["x"] + box["width"] * fraction, box["y"] + 22 + 10)
    tip = page.page.locator("#heatmap .tip").inner_text()
    return int(tip.split(" · ")[1].split()[1].split("–")[0])


def test_zooming_one_chart_zooms_every_chart_and_the_heatmap(browser, report):
    page = Page(browser, report).ready()
    full = page.x_range("loss")
    before = heatmap_step_at(page, 0.2)
    box = page.over("norm")
    y = box["y"] + box["height"] / 2
    page.page.mouse.move(box["x"] + box["width"] * 0.3, y)
    page.page.mouse.down()
    page.page.mouse.move(box["x"] + box["width"] * 0.6, y, steps=5)
    page.page.mouse.up()
    zoomed = page.x_range("norm")
    assert full[0] < zoomed[0] < zoomed[1] < full[1]
    for chart in ("loss", "lr", "clip", "history"):
        assert page.x_range(chart) == pytest.approx(zoomed), chart
    assert page.js("window.gradguardReport.view") == pytest.approx(zoomed)
    after = heatmap_step_at(page, 0.2)  # the same place on the heatmap: a zoomed-in step
    assert before < zoomed[0] - 5 and zoomed[0] - 5 <= after <= zoomed[1]
    page.page.click("#reset-zoom")
    assert page.x_range("lr") == pytest.approx(full)


def test_clicking_a_finding_highlights_its_range_on_every_chart(browser, report):
    page = Page(browser, report).ready()
    before = page.js(PIXEL, ["lr", NAN_STEP])
    finding = page.page.locator(f'#findings .finding[data-start="{NAN_STEP}"]').first
    finding.click()
    assert page.js("window.gradguardReport.highlight") == {
        "run": 0,
        "start": NAN_STEP,
        "end": NAN_STEP,
    }
    assert "active" in finding.get_attribute("class")
    lo, hi = page.x_range("loss")
    assert lo <= NAN_STEP <= hi and hi - lo < 150  # zoomed around it
    for chart in ("loss", "lr", "norm", "clip"):
        r, g, b, _ = page.js(PIXEL, [chart, NAN_STEP])
        assert r > b + 40 and g > b + 20, (chart, r, g, b)  # amber highlight
    assert page.js(PIXEL, ["lr", NAN_STEP]) != before
    assert page.errors == []


def test_log_linear_toggle_and_the_layer_view(browser, report):
    page = Page(browser, report).ready()
    assert page.js("window.gradguardReport.charts.norm.scales.y.distr") == 3
    page.page.click("#panel-norm button.scale")
    assert page.js("window.gradguardReport.charts.norm.scales.y.distr") == 1
    assert page.page.locator("#panel-norm button.scale").inner_text() == "linear"
    # the step selector starts at the last snapshot
    slider = page.page.locator("#layer-step")
    assert slider.input_value() == slider.get_attribute("max") == "39"  # 200 steps, every 5
    # clicking a layer row shows its norm history
    canvas = page.page.locator("#heatmap-canvas").bounding_box()
    page.page.mouse.click(canvas["x"] + 30, canvas["y"] + 22 + 2 * 20 + 10)  # third row
    title = page.page.locator("#history-title").inner_text()
    assert title == "Norm history of out"
    assert page.js("window.gradguardReport.charts.history.series[1].label") == "out"
    assert page.errors == []


def test_a_comparison_shows_both_runs(browser, comparison, run_dir):
    page = Page(browser, comparison).ready()
    labels = page.js("window.gradguardReport.charts.norm.series.map(s => s.label)")
    assert f"{run_dir.name} · total norm" in labels and "synthetic · total norm" in labels
    cards = page.page.locator(".verdict").all_inner_texts()
    assert len(cards) == 2 and run_dir.name in cards[0] and "synthetic" in cards[1]
    # the AMP run brings its loss-scale chart; every chart of the comparison draws
    assert "scale" in page.js("Object.keys(window.gradguardReport.charts)")
    for chart in ("loss", "norm", "clip", "lr", "scale"):
        assert page.js(INK, [chart, SATURATED]) > 150, chart
    heads = page.page.locator("table.summary tr").first.locator("th").all_inner_texts()
    assert heads[1:] == [run_dir.name, "synthetic"]
    # the layer view switches between the runs
    page.page.select_option("#layer-run", "1")
    assert page.page.locator("#history-title").inner_text().endswith("(synthetic)")
    assert page.errors == []


def test_hostile_names_stay_text(browser, report):
    page = Page(browser, report).ready()
    assert page.dialogs == []
    assert page.js("document.querySelectorAll('script').length") == 3  # data + 2 scripts
    params = page.page.locator("#findings .params", has_text=EVIL)
    assert params.count() >= 1 and params.first.inner_text().startswith(EVIL)
    names = page.js("JSON.parse(document.getElementById('gg-data').textContent).runs[0].layers")
    assert EVIL in [row["name"] for row in names["rows"]]


def test_the_policy_blocks_any_other_script(browser, report, tmp_path):
    tampered = tmp_path / "tampered.html"
    tampered.write_text(
        report.read_text().replace("</body>", "<script>window.injected = 1;</script></body>")
    )
    page = Page(browser, tampered).ready()  # the page's own scripts still run
    assert page.js("window.injected") is None
    assert any("Content Security Policy" in e for e in page.errors)


def test_the_error_check_catches_a_broken_page(browser, tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>notDefined();</script></body></html>")
    page = Page(browser, broken)
    page.page.wait_for_load_state()
    assert any("notDefined" in e for e in page.errors)


def test_a_run_without_steps_renders_without_errors(browser, tmp_path):
    from gradguard.record.store import RunStore

    store = RunStore(tmp_path / "empty")
    store.start(["a.weight"])
    store.close()
    page = Page(browser, build_report(tmp_path / "empty", tmp_path / "empty.html")).ready()
    assert page.js("Object.keys(window.gradguardReport.charts)") == []
    assert "No steps were recorded." in page.page.locator("#panels").inner_text()
    assert "No per-layer snapshots" in page.page.locator("#heatmap").inner_text()
    assert page.errors == []


def test_a_sequential_index_is_titled_as_a_layer(browser, tmp_path):
    write_synthetic(tmp_path / "seq", 100, ["0.weight", "1.weight"], every=10, batch=100)
    page = Page(browser, build_report(tmp_path / "seq", tmp_path / "seq.html")).ready()
    assert page.page.locator("#history-title").inner_text() in (
        "Norm history of layer 0",
        "Norm history of layer 1",
    )
    assert page.errors == []
