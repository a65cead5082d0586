"""Size and speed of the HTML report on a long, wide run.

    python benchmarks/bench_report.py                 # 1M steps x 1,000 tensors
    python benchmarks/bench_report.py --steps 100000 --tensors 200 --keep /tmp/run

Writes a synthetic run (norms with spikes and an inf, snapshots every 50 steps) through
the run store, builds its report (best of ``--repeat``), and loads the page in headless
Chromium (Playwright, the system browser) to time the first render: from navigation
start to the end of the page's script, every chart drawn (best of ``--repeat`` loads).
Targets (issue 15): <= 3 MB, <= 10 s to build, first render <= 1 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tensor_names(n: int) -> list[str]:
    """A transformer-like layout: blocks of 10 modules with a weight and a bias each."""
    kinds = ("weight", "bias")
    return [f"blocks.{i // 20}.m{(i % 20) // 2}.{kinds[i % 2]}" for i in range(n)]


def first_render_ms(page_path: Path, repeat: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    times = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        for _ in range(repeat):
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            errors: list[str] = []
            page.on("console", lambda m, e=errors: e.append(m.text) if m.type == "error" else None)
            page.goto(page_path.as_uri())
            page.wait_for_function("window.gradguardReport && window.gradguardReport.ready")
            times.append(page.evaluate("window.gradguardReport.renderMs"))
            if errors:
                raise SystemExit(f"console errors: {errors}")
            page.close()
        browser.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--tensors", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", metavar="DIR", help="write (or reuse) the run here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # tests.report.runs: the same synthetic run the tests use
    from gradguard.report import MAX_REPORT_BYTES, build_report
    from gradguard.report.data import load_run
    from tests.report.runs import write_synthetic

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_report_"))
    run = work / "run"
    if not (run / "gradguard.db").exists():
        started = time.perf_counter()
        write_synthetic(run, args.steps, tensor_names(args.tensors))
        print(
            f"wrote {args.steps} steps x {args.tensors} tensors in "
            f"{time.perf_counter() - started:.1f} s"
        )
    builds, loads, cpu = [], [], []
    for _ in range(args.repeat):
        started = time.perf_counter()
        load_run(run, rules=False)
        loads.append(time.perf_counter() - started)
        started, used = time.perf_counter(), time.process_time()
        out = build_report(run, work / "report.html")
        builds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - used)
    size = out.stat().st_size
    renders = first_render_ms(out, args.repeat)
    print(f"report: {size / 1e6:.2f} MB (bound {MAX_REPORT_BYTES / 1e6:.0f} MB)")
    print(
        f"build: best {min(builds):.2f} s wall, {min(cpu):.2f} s CPU, of {args.repeat} "
        f"(reading the store: {min(loads):.2f} s wall); load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"first render in headless Chromium: best {min(renders):.0f} ms, "
        f"all {', '.join(f'{t:.0f}' for t in renders)} ms"
    )
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
