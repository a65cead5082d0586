"""The reading half of :class:`~gradguard.record.store.RunStore`: runs, meta, steps, norms, events.

Every query names its run; every failure (a damaged page, a hand-edited cell, a short
snapshot blob, bad JSON) is a :class:`StoreError` naming the file and what to do.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..schema import STEP_COLUMNS, Event
from . import _db, _migrate, _runs
from ._db import StoreError
from ._runs import RunInfo

_NO_RUN = -1  # matches no row: the store holds no run yet


class StoreReader:
    """Read methods over ``self._conn`` for the run ``self._run``."""

    path: Path
    _conn: Any
    _run: int | None
    _version: int
    _layout: _migrate.Layout
    _lock: threading.RLock

    def _reader(self) -> Any:
        if self._conn is None:
            raise StoreError(f"run store {_db.label(self.path)} is closed")
        return self._conn

    def _query(self, what: str, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock, _db.errors(self.path, what):
            return self._reader().execute(sql, tuple(args)).fetchall()

    def _store_meta(self) -> dict[str, Any]:
        with self._lock:
            return _db.read_meta(self._reader(), self.path)

    def runs(self) -> list[RunInfo]:
        """Every run in the store, oldest first, with its step count."""
        return self._runs()

    def info(self) -> RunInfo | None:
        """The selected run's :class:`RunInfo` (``None`` when the store has no run)."""
        return self._selected(count=True)

    def _runs(self, only: int | None = None, count: bool = True) -> list[RunInfo]:
        meta = self._store_meta()
        with self._lock, _db.errors(self.path, "reading the runs"):
            return _runs.list_runs(self._reader(), self.path, self._version, meta, only, count)

    def _selected(self, count: bool = False) -> RunInfo | None:
        """The selected run's row alone (other runs' rows are not even decoded)."""
        if self._run is None:
            return None
        found = self._runs(only=self._run, count=count)
        return found[0] if found else None

    def meta(self) -> dict[str, Any]:
        """The store's meta merged with the selected run's fields.

        Keys: ``schema_version``, ``created`` (the store's), ``run``, ``started``, ``ended``,
        ``status``, ``pid``, ``host``, ``resumed``, ``config``, ``names``, ``shapes`` and the
        versions (``gradguard_version``, ``torch_version``, ``python_version``).
        """
        meta = self._store_meta()
        info = self._selected()
        if info is None:
            return {**meta, "run": None, "config": {}, "names": [], "shapes": None}
        return {
            **meta,
            **info.versions,
            "run": info.run,
            "started": info.started,
            "ended": info.ended,
            "status": info.status,
            "pid": info.pid,
            "host": info.host,
            "resumed": info.resumed,
            "config": info.config,
            "names": list(info.names),
            "shapes": info.shapes,
        }

    def names(self) -> tuple[str, ...]:
        """Parameter names, aligned with the columns of :meth:`tensor_norms`."""
        info = self._selected()
        return info.names if info is not None else ()

    def _run_id(self) -> int:
        return self._run if self._run is not None else _NO_RUN

    def steps(self, last: int | None = None) -> dict[str, Any]:
        """Per-step columns as numpy arrays keyed ``'step'`` and each of ``STEP_COLUMNS``.

        ``step`` and ``reason`` are int64, ``clipped``/``skipped`` bool, the rest float64
        (NaN where not recorded). ``last=n`` reads only the latest ``n`` steps (a live view
        of a long run reads what it shows, not the whole table).
        """
        import numpy as np

        columns = f"step, {', '.join(STEP_COLUMNS)}"
        sql = f"SELECT {columns} FROM {self._layout.steps} WHERE run = ?"
        if last is None:
            rows = self._query("reading steps", sql + " ORDER BY step", (self._run_id(),))
        else:
            sql += " ORDER BY step DESC LIMIT ?"
            rows = self._query("reading steps", sql, (self._run_id(), max(int(last), 0)))[::-1]
        with _db.errors(self.path, "reading steps"):
            table = np.array(rows, dtype=np.float64).reshape(len(rows), len(STEP_COLUMNS) + 1)
            out: dict[str, Any] = {"step": np.array([r[0] for r in rows], dtype=np.int64)}
        for j, c in enumerate(STEP_COLUMNS, start=1):
            col = table[:, j]  # NULL became NaN
            if c == "reason":
                codes = np.nan_to_num(col, nan=0.0)
                if np.any(np.abs(codes) > 255) or np.any(codes != np.round(codes)):
                    raise StoreError(
                        f"{_db.label(self.path)}: steps.reason holds values that are not skip "
                        f"reason codes; {_db.DAMAGED}"
                    )
                out[c] = codes.astype(np.int64)
            elif c in _db.INT_COLUMNS:
                out[c] = np.nan_to_num(col, nan=0.0) != 0
            else:
                out[c] = col
        return out

    def tensor_norms(self, extra: bool | None = None) -> tuple[Any, tuple[str, ...], Any]:
        """``(steps, names, norms)``: snapshot steps, names, a ``(steps, names)`` float32 array.

        ``extra=None`` returns every snapshot; ``False`` only the scheduled ones (every
        ``tensor_every`` steps); ``True`` only those taken off schedule at steps whose
        total norm was non-finite (where the health rules locate the origin).
        """
        import numpy as np

        names = self.names()
        sql = f"SELECT step, norms FROM {self._layout.tensor_norms} WHERE run = ?"
        args: tuple[Any, ...] = (self._run_id(),)
        if extra is not None:
            sql, args = sql + " AND extra = ?", (*args, int(bool(extra)))
        rows = self._query("reading tensor norms", sql + " ORDER BY step", args)
        norms = np.empty((len(rows), len(names)), dtype=np.float32)
        with _db.errors(self.path, "reading tensor norms"):
            steps = np.array([r[0] for r in rows], dtype=np.int64)
            for i, (step, blob) in enumerate(rows):
                if not isinstance(blob, bytes) or len(blob) != 4 * len(names):
                    size = len(blob) if isinstance(blob, (bytes, str)) else type(blob).__name__
                    raise StoreError(
                        f"{_db.label(self.path)}: the snapshot at step {step} holds {size} bytes, "
                        f"not {4 * len(names)} for {len(names)} names; {_db.DAMAGED}"
                    )
                norms[i] = np.frombuffer(blob, dtype="<f4")
        return steps, names, norms

    def events(self, kind: str | None = None, last: int | None = None) -> list[Event]:
        """Recorded events in step order; only those of ``kind``, or the latest ``last``."""
        sql = (
            f"SELECT id, step, kind, message, data, end_step, key, ongoing "
            f"FROM {self._layout.events} WHERE run = ?"
        )
        args: tuple[Any, ...] = (self._run_id(),)
        if kind is not None:
            sql, args = sql + " AND kind = ?", (*args, kind)
        if last is None:
            rows = self._query("reading events", sql + " ORDER BY step, id", args)
        else:
            sql += " ORDER BY step DESC, id DESC LIMIT ?"
            rows = self._query("reading events", sql, (*args, max(int(last), 0)))[::-1]
        out = []
        for id_, step, kind_, message, data, end_step, key, ongoing in rows:
            with _db.errors(self.path, f"reading event {id_}"):
                payload = json.loads(data)
                if not isinstance(payload, dict):
                    raise ValueError("its data is not a JSON object")
                out.append(
                    Event(
                        int(step),
                        str(kind_),
                        str(message),
                        payload,
                        None if end_step is None else int(end_step),
                        None if key is None else str(key),
                        bool(ongoing),
                    )
                )
        return out

    def to_pandas(self) -> Any:
        """The steps table as a ``pandas.DataFrame`` indexed by step."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError(
                "RunStore.to_pandas needs pandas: pip install 'gradguard[pandas]'"
            ) from e
        return pd.DataFrame(self.steps()).set_index("step")
