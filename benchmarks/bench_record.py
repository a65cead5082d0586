"""Recording cost: store size per 1k steps, time per ``Recorder.record`` call, store start/close.

Run: ``PYTHONPATH=src python benchmarks/bench_record.py``. Sizes are of the closed SQLite
file; the 1M x 1000 projection scales a measured run linearly. ``record()`` is timed
as the Guard calls it (device scalars and the step's per-tensor norms at every step),
including its share of the flushes, in CPU time (robust to other processes on a shared
machine): on the training thread, and for the whole process (the writer thread too);
against ``torch.nn.utils.clip_grad_norm_`` on 150 small gradients in the same run.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

import torch

from gradguard.record import Recorder, RunStore


class _Stats:
    def __init__(self, norms: torch.Tensor, names: tuple[str, ...], shapes: tuple) -> None:
        self.norms, self.names, self.shapes = norms, names, shapes

    def labels(self) -> tuple[str, ...]:
        return self.names


def _names(n: int) -> tuple[str, ...]:
    return tuple(f"transformer.h.{i // 12}.block_param_{i % 12}.weight" for i in range(n))


def _step_inputs(steps: int, n: int, nan_every: int = 0) -> list[tuple[dict, _Stats]]:
    """What the Guard hands ``record()`` each step; a NaN gradient every ``nan_every`` steps."""
    g = torch.Generator().manual_seed(0)
    names = _names(n)
    shapes = tuple(torch.Size([1]) for _ in names)
    out = []
    for step in range(steps):
        norms = torch.rand(n, generator=g)
        if nan_every and step % nan_every == nan_every // 2:
            norms[n // 2] = float("nan")
        total = norms.norm()
        coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
        values = dict(
            total_norm=total,
            clipped_norm=total * coef,
            clip_coef=coef,
            threshold=torch.tensor(1.0),
            skipped=~torch.isfinite(total),
            reason=torch.tensor(0, dtype=torch.int8),
            loss=torch.rand((), generator=g) + 2.0,
            lr=3e-4,
        )
        out.append((values, _Stats(norms, names, shapes)))
    return out


def _record_run(path: Path, inputs: list, log_every: int) -> Recorder:
    rec = Recorder(path, log_every=log_every)
    rec.start(inputs[0][1].names, [(1,)] * len(inputs[0][1].names))
    for step, (values, stats) in enumerate(inputs):
        rec.record(step, stats=stats, **values)
    rec.close()
    return rec


def _table_bytes(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall()
        return {name: int(size) for name, size in rows}
    except sqlite3.OperationalError:  # SQLite built without dbstat
        return {}
    finally:
        conn.close()


def size_report(tmp: Path, steps: int, n: int, log_every: int = 50) -> dict[str, float]:
    run = tmp / f"size-{n}"
    _record_run(run, _step_inputs(steps, n), log_every)
    db = run / "gradguard.db"
    with RunStore.open(run) as store:
        assert len(store.steps()["step"]) == steps
    tables = _table_bytes(db)
    keep = ("steps", "tensor_norms", "meta", "events", "runs")
    return {"file": db.stat().st_size, **{k: v for k, v in tables.items() if k in keep}}


def time_record(inputs: list, log_every: int, repeats: int = 5) -> tuple[float, float]:
    """Best-of-``repeats`` CPU microseconds per ``record()`` call, flushes included:
    ``(training thread, whole process)``."""
    best_thread = best_process = float("inf")
    for r in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            rec = Recorder(Path(tmp) / f"t{r}", log_every=log_every)
            rec.start(inputs[0][1].names)
            rec.record(0, stats=inputs[0][1], **inputs[0][0])  # allocate the buffers
            t0, p0 = time.thread_time(), time.process_time()
            for step, (values, stats) in enumerate(inputs, start=1):
                rec.record(step, stats=stats, **values)
            rec.drain()
            best_thread = min(best_thread, time.thread_time() - t0)
            best_process = min(best_process, time.process_time() - p0)
            rec.close()
    return best_thread / len(inputs) * 1e6, best_process / len(inputs) * 1e6


def time_clip(n: int, repeats: int = 5, calls: int = 500) -> float:
    """CPU microseconds per ``clip_grad_norm_`` call on ``n`` small gradients."""
    params = [torch.nn.Parameter(torch.randn(64)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(64)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(calls):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        best = min(best, time.thread_time() - t0)
    return best / calls * 1e6


def time_lifecycle(tmp: Path, steps: int, n: int) -> tuple[float, float, float, int]:
    """Seconds to start a new run in a fresh and in a grown store, and to close one."""
    fresh = tmp / "life-fresh"
    t0 = time.perf_counter()
    store = RunStore(fresh)
    store.start(_names(n))
    started = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.close()
    closed = time.perf_counter() - t0
    grown = tmp / "life-grown"
    _record_run(grown, _step_inputs(steps, n), 10)
    t0 = time.perf_counter()
    store = RunStore(grown)
    store.start(_names(n))  # quick_check over the whole file
    restarted = time.perf_counter() - t0
    store.close()
    return started, closed, restarted, (grown / "gradguard.db").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for n in (150, 1000):
            sizes = size_report(tmp_path, args.steps, n)
            per_k = {k: v / args.steps * 1000 for k, v in sizes.items()}
            print(
                f"{n} tensors, log_every=50, {args.steps} steps: "
                + ", ".join(f"{k} {v / 1024:.1f} KiB/1k steps" for k, v in per_k.items())
            )
            if n == 1000:
                growing = per_k.get("steps", 0) + per_k.get("tensor_norms", 0)
                fixed = sizes["file"] - sizes.get("steps", 0) - sizes.get("tensor_norms", 0)
                print(
                    f"projected 1M steps x 1000 tensors: {(growing * 1000 + fixed) / 1e6:.0f} MB "
                    f"(steps {per_k.get('steps', 0) * 1000 / 1e6:.0f} MB, "
                    f"tensor_norms {per_k.get('tensor_norms', 0) * 1000 / 1e6:.0f} MB)"
                )
        started, closed, restarted, size = time_lifecycle(tmp_path, 20 * args.steps, 150)
        print(
            f"run store: start a run {started * 1e3:.1f} ms (new file), "
            f"{restarted * 1e3:.1f} ms in a {size / 1e6:.1f} MB store (quick_check); "
            f"close {closed * 1e3:.1f} ms"
        )
    clip = time_clip(150)
    clean = _step_inputs(args.steps, 150)
    for log_every in (1, 50):
        thread, process = time_record(clean, log_every)
        print(
            f"record(), 150 tensors, log_every={log_every}: {thread:.1f} us/step on the "
            f"training thread ({thread / clip:.3f}x clip_grad_norm_ on 150 grads, "
            f"{clip:.0f} us), {process:.1f} us/step with the writer thread"
        )
    thread, process = time_record(_step_inputs(args.steps, 150, nan_every=50), 50)
    print(
        f"record(), 150 tensors, log_every=50, a NaN step in every interval: {thread:.1f} "
        f"us/step on the training thread, {process:.1f} with the writer thread "
        "(the non-finite step's norms follow in one more copy per interval)"
    )


if __name__ == "__main__":
    main()
