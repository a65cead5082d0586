"""Make README's screenshot: the demo's comparison report, rendered in headless Chromium.

    python tools/screenshot_report.py              # writes docs/report.png
    python tools/screenshot_report.py --out shot.png --height 1600

Trains the demo's two runs (unguarded and guarded, ~10 s on a CPU), builds their
comparison report, and screenshots its top: the verdicts, the summary and the first
charts. Needs Playwright's Python package and the system Chromium (no browser download).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument(
        "--height",
        type=int,
        default=0,
        help="crop height (default: to the end of the clipping chart)",
    )
    args = parser.parse_args()

    import torch
    from playwright.sync_api import sync_playwright

    from gradguard.demo import train
    from gradguard.report import build_report

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="gradguard_shot_"))
    here = Path.cwd()
    out = args.out.resolve()
    os.chdir(work)  # the page names the runs as a user's demo does: gradguard-demo/...
    try:
        stores = [Path("gradguard-demo/unguarded"), Path("gradguard-demo/guarded")]
        for guarded, store in zip((False, True), stores):
            train(guarded, store=store)
        page_path = build_report(stores, Path("gradguard-demo/compare.html")).resolve()
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(
                viewport={"width": args.width, "height": 900}, device_scale_factor=1
            )
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(page_path.as_uri())
            page.wait_for_function("window.gradguardReport && window.gradguardReport.ready")
            if errors:
                raise SystemExit(f"the page logged errors: {errors}")
            height = args.height or int(
                page.evaluate(
                    "document.getElementById('panel-clip').getBoundingClientRect().bottom"
                    " + window.scrollY + 8"
                )
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(
                path=str(out),
                full_page=True,
                clip={"x": 0, "y": 0, "width": args.width, "height": height},
            )
            browser.close()
    finally:
        os.chdir(here)
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
