"""``gradguard export``: a run's steps table (or snapshot norms) as CSV, JSON Lines or Parquet."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .record.store import RunStore, is_database
from .schema import STEP_COLUMNS

FORMATS = ("csv", "jsonl", "parquet")


class ExportError(RuntimeError):
    """An export cannot be written (a missing optional dependency, a bad target)."""


def _cell(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def table(
    run_dir: str | os.PathLike[str], tensors: bool = False, run: int | str | None = None
) -> tuple[list[str], Iterator]:
    """Column names and row iterator: steps, or ``(step, name, norm)`` snapshot rows."""
    with RunStore.open(run_dir, run=run) as store:
        if tensors:
            steps, names, norms = store.tensor_norms()
            header = ["step", "name", "norm"]

            def rows_t() -> Iterator[list[object]]:
                for i, step in enumerate(steps.tolist()):
                    for name, v in zip(names, norms[i].tolist()):
                        yield [step, name, v]

            return header, rows_t()
        data = store.steps()
    header = ["step", *STEP_COLUMNS]
    cols = [data[c].astype(np.int64) if data[c].dtype == bool else data[c] for c in header]

    def rows() -> Iterator[list[object]]:
        lists = [c.tolist() for c in cols]
        yield from (list(r) for r in zip(*lists))

    return header, rows()


def export(
    run_dir: str | os.PathLike[str],
    fmt: str,
    out: str | None = None,
    tensors: bool = False,
    run: int | str | None = None,
) -> str:
    """Write the export of ``run`` (default the latest); return where it went (``"-"`` for
    stdout). Never writes over the store itself."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "parquet":
        try:
            import pandas as pd
            import pyarrow  # noqa: F401
        except ImportError:
            raise ExportError(
                "--format parquet needs pandas and pyarrow: pip install 'gradguard[parquet]' "
                "(or pip install pandas pyarrow)"
            ) from None
    header, rows = table(run_dir, tensors, run)
    if out is None:
        base = Path(run_dir)
        base = base.parent if base.is_file() else base
        out = os.fspath(base / f"{'tensors' if tensors else 'steps'}.{fmt}")
    if out != "-" and is_database(out):
        raise ExportError(f"--out {out!r} is a database (a run store); choose another file")
    if fmt == "parquet":
        if out == "-":
            raise ExportError("--format parquet cannot be written to stdout; give --out FILE")
        frame = pd.DataFrame([list(r) for r in rows], columns=header)
        frame.to_parquet(out, index=False)
        return out
    handle: io.TextIOBase
    handle = sys.stdout if out == "-" else open(out, "w", newline="", encoding="utf-8")  # noqa: SIM115
    try:
        if fmt == "csv":
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows([_cell(v) if v is not None else "" for v in r] for r in rows)
        else:
            for r in rows:
                handle.write(json.dumps(dict(zip(header, map(_cell, r)))) + "\n")
    finally:
        if handle is not sys.stdout:
            handle.close()
    return out
