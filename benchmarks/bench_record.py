"""Recording cost: store size per 1k steps and time per ``Recorder.record`` call (CPU tensors).

Run: ``PYTHONPATH=src python benchmarks/bench_record.py``. Sizes are of the closed
SQLite file (WAL checkpointed); the 1M x 1000 projection scales a measured run linearly.
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
    def __init__(self, norms: torch.Tensor, names: tuple[str, ...]) -> None:
        self.norms, self.names = norms, names
        self.shapes = tuple(torch.Size([1]) for _ in names)

    def labels(self) -> tuple[str, ...]:
        return self.names


def _names(n: int) -> tuple[str, ...]:
    return tuple(f"transformer.h.{i // 12}.block_param_{i % 12}.weight" for i in range(n))


def _step_inputs(steps: int, n: int) -> list[tuple[dict, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        norms = torch.rand(n, generator=g)
        total = norms.norm()
        coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
        out.append((dict(total_norm=total, clipped_norm=total * coef, clip_coef=coef,
                         threshold=1.0, skipped=torch.tensor(False), reason=torch.tensor(0),
                         loss=torch.rand((), generator=g) + 2.0, lr=3e-4), norms))
    return out


def _record_run(path: Path, steps: int, n: int, log_every: int) -> None:
    names = _names(n)
    rec = Recorder(path, log_every=log_every)
    rec.start(names, [(1,)] * n)
    for step, (values, norms) in enumerate(_step_inputs(steps, n)):
        stats = _Stats(norms, names) if rec.wants_tensor_norms(step) else None
        rec.record(step, stats=stats, **values)
    rec.close()


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
    _record_run(run, steps, n, log_every)
    db = run / "gradguard.db"
    with RunStore.open(run) as store:
        assert len(store.steps()["step"]) == steps
    tables = _table_bytes(db)
    return {"file": db.stat().st_size, **{k: v for k, v in tables.items() if k in
            ("steps", "tensor_norms", "meta", "events")}}


def time_record(steps: int, n: int, log_every: int | None, repeats: int = 3) -> float:
    """Best-of-``repeats`` microseconds per step of the recording work (None: no recording)."""
    names = _names(n)
    inputs = _step_inputs(steps, n)
    best = float("inf")
    for r in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            rec = None
            if log_every is not None:
                rec = Recorder(Path(tmp) / f"t{r}", log_every=log_every)
                rec.start(names, [(1,)] * n)
            t0 = time.perf_counter()
            for step, (values, norms) in enumerate(inputs):
                if rec is not None:
                    stats = _Stats(norms, names) if rec.wants_tensor_norms(step) else None
                    rec.record(step, stats=stats, **values)
            if rec is not None:
                rec.close()
            best = min(best, time.perf_counter() - t0)
    return best / steps * 1e6


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
            print(f"{n} tensors, log_every=50, {args.steps} steps: " + ", ".join(
                f"{k} {v / 1024:.1f} KiB/1k steps" for k, v in per_k.items()))
            if n == 1000:
                growing = per_k.get("steps", 0) + per_k.get("tensor_norms", 0)
                fixed = sizes["file"] - sizes.get("steps", 0) - sizes.get("tensor_norms", 0)
                print(f"projected 1M steps x 1000 tensors: {(growing * 1000 + fixed) / 1e6:.0f} MB "
                      f"(steps {per_k.get('steps', 0) * 1000 / 1e6:.0f} MB, "
                      f"tensor_norms {per_k.get('tensor_norms', 0) * 1000 / 1e6:.0f} MB)")
    base = time_record(args.steps, 150, None)
    for log_every in (1, 50):
        t = time_record(args.steps, 150, log_every)
        print(f"record(), 150 tensors, log_every={log_every}: {t - base:.1f} us/step "
              f"(loop without recording {base:.2f} us/step)")


if __name__ == "__main__":
    main()
