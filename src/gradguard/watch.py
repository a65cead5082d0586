"""``gradguard watch``: a live terminal view of a run store while training writes it.

Each frame reads only the latest steps and events through its own read-only SQLite
connection (the store is in WAL mode, so reading never blocks the writer), so a
frame costs the same at step 100 and at step 10M.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

import numpy as np

from .health import HealthConfig, diagnose
from .record.store import RunStore
from .schema import SkipReason

BLOCKS = "▁▂▃▄▅▆▇█"
RECENT = 1000  # steps read per frame


def sparkline(values: Sequence[float], width: int = 60) -> str:
    """A unicode sparkline of ``values`` on a log scale, max per character; ``!`` non-finite."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return ""
    starts = np.unique((np.arange(min(width, v.size)) * v.size) // min(width, v.size))
    bad = np.add.reduceat((~np.isfinite(v)).astype(np.int64), starts) > 0
    clean = np.where(np.isfinite(v) & (v > 0), v, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        logs = np.log10(clean)
    peak = np.fmax.reduceat(np.nan_to_num(logs, nan=-np.inf), starts)
    finite = peak[np.isfinite(peak)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    out = []
    for p, b in zip(peak.tolist(), bad.tolist()):
        if b:
            out.append("!")
        elif not math.isfinite(p):
            out.append(" ")
        else:
            out.append(BLOCKS[min(len(BLOCKS) - 1, int((p - lo) / span * len(BLOCKS)))])
    return "".join(out)


def render_frame(
    run_dir: str | os.PathLike[str], width: int = 60, run: int | str | None = None
) -> str:
    """One text frame of ``run`` (default the latest): step, norm, clip rate, sparkline,
    findings and events."""
    with RunStore.open(run_dir, run=run) as store:
        meta = store.meta()
        s = store.steps(last=RECENT)
        recent_events = store.events(last=5)
    which = f" · run {meta['run']} ({meta.get('status', '?')})" if meta.get("run") else ""
    lines = [f"gradguard watch · {os.fspath(run_dir)}{which}"]
    if s["step"].size == 0:
        lines.append("waiting for the first flushed steps…")
        return "\n".join(lines)
    norms = s["total_norm"]
    last = -1
    clipped = np.nan_to_num(s["clipped"]) > 0
    skipped = np.nan_to_num(s["skipped"]) > 0
    thr = s["threshold"][last]
    lines += [
        f"step {int(s['step'][last])}   total norm {norms[last]:.4g}   threshold "
        f"{thr:.4g}   loss {s['loss'][last]:.4g}",
        f"last {norms.size} steps: clip rate {clipped.mean():.1%}   skipped {int(skipped.sum())}"
        f"   non-finite {int((~np.isfinite(norms)).sum())}   median norm "
        f"{np.nanmedian(np.where(np.isfinite(norms), norms, np.nan)):.4g}",
        f"norm (log, last {min(norms.size, width * 10)}) {sparkline(norms[-width * 10 :], width)}",
    ]
    reasons = {int(r) for r in s["reason"][skipped] if math.isfinite(r)}
    if reasons:
        lines.append(
            "skip reasons: "
            + ", ".join(
                SkipReason(r).label for r in sorted(reasons) if r in SkipReason._value2member_map_
            )
        )
    lines += _findings(meta, s)
    events = recent_events
    lines.append(f"latest events: {len(events) or 'none'}")
    lines += [f"  step {e.step} {e.kind}: {e.message}" for e in events]
    return "\n".join(lines)


def _findings(meta: dict, s: dict) -> list[str]:
    """The health rules over the frame's steps; a live view shows what it can."""
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    family = config.get("family") if isinstance(config.get("family"), str) else "default"
    try:
        health = HealthConfig(family=family)
    except ValueError:
        health = HealthConfig()
    columns = {k: v for k, v in s.items() if k != "step"}
    try:
        found = diagnose(columns, s["step"], config=health)
    except Exception as e:  # a frame never dies on the rules; say why they are missing
        return [f"findings: not evaluated ({type(e).__name__}: {e})"]
    lines = [f"findings in the last {s['step'].size} steps: {len(found) or 'none'}"]
    return lines + [f"  {f}" for f in found[-5:]]


def watch(
    run_dir: str | os.PathLike[str],
    interval: float = 2.0,
    once: bool = False,
    stream: TextIO | None = None,
    run: int | str | None = None,
) -> int:
    """Print frames every ``interval`` seconds until interrupted (one frame with ``once``).

    Without ``run``, each frame shows the store's latest run (a new run started in the
    same directory takes over the view).
    """
    out = stream or sys.stdout
    clear = "\x1b[H\x1b[2J" if (not once and out.isatty()) else ""
    try:
        while True:
            frame = render_frame(run_dir, run=run)
            out.write(clear + frame + "\n")
            out.flush()
            if once:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
