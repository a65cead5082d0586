"""The run store: one SQLite file per run, written by the Recorder, read by reports and tools.

Layout: ``runs/<name>/gradguard.db`` (``<name>`` defaults to a timestamp). The file is
opened in WAL mode with ``synchronous=NORMAL``, so another process or connection can
read it while training writes, and each flush is one transaction: a run killed at any
moment keeps every flushed interval.

Schema (``schema_version`` 1)::

    meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)       -- JSON values:
        schema_version, created, gradguard_version, torch_version, python_version,
        config, names (list, stored once), shapes (list of lists)
    steps(step INTEGER PRIMARY KEY,
          total_norm REAL, clipped_norm REAL, clip_coef REAL, threshold REAL,
          clipped INTEGER, skipped INTEGER, reason INTEGER,   -- 0/1, 0/1, SkipReason code
          loss REAL, lr REAL, loss_scale REAL)               -- NULL reads back as NaN
    tensor_norms(step INTEGER PRIMARY KEY, norms BLOB NOT NULL)
        -- little-endian float32, one value per entry of meta.names, in that order
    events(id INTEGER PRIMARY KEY AUTOINCREMENT, step INTEGER NOT NULL,
           kind TEXT NOT NULL, message TEXT NOT NULL, data TEXT NOT NULL)  -- data: JSON

SQLite stores a NaN REAL as NULL, so NaN and "not recorded" read back alike (NaN);
infinities are kept. Size at the defaults (measured by ``benchmarks/bench_record.py``):
a steps row takes ~60 bytes (integral REALs such as ``threshold=1.0`` are stored
compactly, NULLs take none), a snapshot of ``n`` tensors ``4n`` bytes plus page slack.
1M steps x 1000 tensors with snapshots every 50 steps: 20k x 4 kB ~ 83 MB of norms
plus ~60 MB of steps, ~145 MB in all; a 150-tensor run takes ~78 kB per 1k steps.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sqlite3
import sys
import threading
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..schema import STEP_COLUMNS, Event, HostBatch

SCHEMA_VERSION = 1
DB_NAME = "gradguard.db"
_SQLITE_MAGIC = b"SQLite format 3\x00"
_INT_COLUMNS = frozenset({"clipped", "skipped", "reason"})

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (
    step INTEGER PRIMARY KEY,
    {", ".join(f"{c} {'INTEGER' if c in _INT_COLUMNS else 'REAL'}" for c in STEP_COLUMNS)}
);
CREATE TABLE IF NOT EXISTS tensor_norms (step INTEGER PRIMARY KEY, norms BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    step INTEGER NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL, data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_step ON events (step);
"""


class StoreError(RuntimeError):
    """A run store cannot be opened or written: missing, corrupt, foreign or too new."""


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """The database file for ``path``: the file itself, or ``<run dir>/gradguard.db``."""
    p = Path(path)
    if p.suffix in (".db", ".sqlite", ".sqlite3") or p.is_file():
        return p
    return p / DB_NAME


def default_run_dir(root: str | os.PathLike[str] = "runs") -> Path:
    """``<root>/<timestamp>``, made unique with a counter if it already exists."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / stamp
    candidate, i = base, 1
    while candidate.exists():
        candidate, i = Path(f"{base}-{i}"), i + 1
    return candidate


def _check_header(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except OSError as e:
        raise StoreError(f"cannot read run store {str(path)!r}: {e}") from e
    if head and head != _SQLITE_MAGIC:
        raise StoreError(f"{str(path)!r} is not a gradguard run store (not an SQLite file)")


def _read_meta(conn: sqlite3.Connection, path: Path) -> dict[str, Any]:
    """Validate a store's tables and return its meta; raise StoreError otherwise."""
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables:
            raise StoreError(f"{str(path)!r} is an SQLite file but not a gradguard run store")
        meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{str(path)!r} is not a readable gradguard run store: {e}") from e
    except ValueError as e:
        raise StoreError(f"{str(path)!r} has a corrupt meta table: {e}") from e
    version = meta.get("schema_version")
    if not isinstance(version, int):
        raise StoreError(f"{str(path)!r} is an SQLite file but not a gradguard run store")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{str(path)!r} has schema_version {version}, newer than this gradguard "
            f"supports ({SCHEMA_VERSION}): upgrade gradguard to read it"
        )
    return meta


def _pack(norms: Sequence[float]) -> bytes:
    a = array("f", norms)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def _cell(column: str, value: float) -> float | int | None:
    if column in _INT_COLUMNS:
        return int(value) if math.isfinite(value) else None
    return value  # sqlite3 binds NaN as NULL


def _versions() -> dict[str, str]:
    import torch

    try:
        from .._version import __version__ as gg_version
    except ImportError:  # pragma: no cover - partial installs
        gg_version = "unknown"
    return {
        "gradguard_version": gg_version,
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
    }


class RunStore:
    """A run's SQLite store: a :class:`Sink` when writing, a reader via :meth:`open`.

    ``RunStore(path)`` touches no file until :meth:`start`; ``path`` is a run directory
    (``<dir>/gradguard.db``) or a ``.db`` file; ``None`` means ``runs/<timestamp>``.
    Starting on an existing store of this run appends to it (same names required);
    an existing file that is not a gradguard store raises :class:`StoreError` and is
    left untouched.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, root: str = "runs") -> None:
        self.path = resolve_path(path) if path is not None else default_run_dir(root) / DB_NAME
        self._conn: sqlite3.Connection | None = None
        self._names: tuple[str, ...] = ()
        self._readonly = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    # ----------------------------------------------------------------- writing
    def start(
        self,
        names: Sequence[str],
        config: dict | None = None,
        shapes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Create (or reopen for appending) the database and write the run's meta."""
        if self._conn is not None:
            return
        names = tuple(names)
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists:
            _check_header(self.path)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        try:
            if exists:
                old = _read_meta(conn, self.path)
                if old.get("names") and names and tuple(old["names"]) != names:
                    raise StoreError(
                        f"{str(self.path)!r} holds a run with different parameter names; "
                        "record this run in a new run directory"
                    )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            meta: dict[str, Any] = {
                "schema_version": SCHEMA_VERSION,
                "config": config or {},
                "names": list(names),
                "shapes": [list(s) for s in shapes] if shapes is not None else None,
                **_versions(),
            }
            with conn:
                conn.executescript(_SCHEMA)
                if not exists:
                    meta["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
                else:
                    meta["resumed"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
                conn.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    [(k, json.dumps(v, default=repr)) for k, v in meta.items()],
                )
        except BaseException:
            conn.close()
            raise
        self._conn, self._names = conn, names

    def write(self, batch: HostBatch) -> None:
        """Write one flushed batch in a single transaction."""
        conn = self._writer()
        cols = [batch.columns[c] for c in STEP_COLUMNS]
        rows = [
            (step, *(_cell(c, col[i]) for c, col in zip(STEP_COLUMNS, cols)))
            for i, step in enumerate(batch.steps)
        ]
        norms = [(s, _pack(v)) for s, v in zip(batch.tensor_steps, batch.tensor_norms)]
        marks = ", ".join("?" * (len(STEP_COLUMNS) + 1))
        with self._lock, conn:
            conn.executemany(
                f"INSERT OR REPLACE INTO steps (step, {', '.join(STEP_COLUMNS)}) VALUES ({marks})",
                rows,
            )
            if norms:
                conn.executemany(
                    "INSERT OR REPLACE INTO tensor_norms (step, norms) VALUES (?, ?)", norms
                )

    def write_events(self, events: Sequence[Event]) -> None:
        """Append events in one transaction."""
        if not events:
            return
        conn = self._writer()
        rows = [(int(e.step), e.kind, e.message, json.dumps(e.data, default=repr)) for e in events]
        with self._lock, conn:
            conn.executemany(
                "INSERT INTO events (step, kind, message, data) VALUES (?, ?, ?, ?)", rows
            )

    def close(self) -> None:
        """Close the connection (the WAL is checkpointed into the main file)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _writer(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"run store {str(self.path)!r} is not started (call start first)")
        if self._readonly:
            raise StoreError(f"run store {str(self.path)!r} was opened read-only")
        return self._conn

    # ----------------------------------------------------------------- reading
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> RunStore:
        """Open an existing store (a ``.db`` file or a run directory) for reading.

        Safe while another process writes it. Raises :class:`StoreError` when the path
        holds no store, a corrupt file, a foreign SQLite database or a newer schema.
        """
        db = resolve_path(path)
        if not db.is_file():
            raise StoreError(f"no gradguard run store at {str(db)!r}")
        _check_header(db)
        uri = db.resolve().as_uri() + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=30.0, check_same_thread=False)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open run store {str(db)!r}: {e}") from e
        try:
            meta = _read_meta(conn, db)
        except BaseException:
            conn.close()
            raise
        store = cls(db)
        store._conn, store._readonly = conn, True
        store._names = tuple(meta.get("names") or ())
        return store

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reader(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"run store {str(self.path)!r} is closed")
        return self._conn

    def meta(self) -> dict[str, Any]:
        """All meta entries, JSON-decoded."""
        return _read_meta(self._reader(), self.path)

    def names(self) -> tuple[str, ...]:
        """Parameter names, aligned with the columns of :meth:`tensor_norms`."""
        return tuple(self.meta().get("names") or ())

    def steps(self, last: int | None = None) -> dict[str, Any]:
        """Per-step columns as numpy arrays keyed ``'step'`` and each of ``STEP_COLUMNS``.

        ``step`` and ``reason`` are int64, ``clipped``/``skipped`` bool, the rest float64
        (NaN where not recorded). ``last=n`` reads only the latest ``n`` steps (a live view
        of a long run reads what it shows, not the whole table).
        """
        np = _numpy()
        columns = f"step, {', '.join(STEP_COLUMNS)}"
        if last is None:
            rows = self._reader().execute(f"SELECT {columns} FROM steps ORDER BY step").fetchall()
        else:
            sql = f"SELECT {columns} FROM steps ORDER BY step DESC LIMIT ?"
            rows = self._reader().execute(sql, (max(int(last), 0),)).fetchall()[::-1]
        table = np.array(rows, dtype=np.float64).reshape(len(rows), len(STEP_COLUMNS) + 1)
        out: dict[str, Any] = {"step": np.array([r[0] for r in rows], dtype=np.int64)}
        for j, c in enumerate(STEP_COLUMNS, start=1):
            col = table[:, j]  # NULL became NaN
            if c == "reason":
                out[c] = np.nan_to_num(col, nan=0.0).astype(np.int64)
            elif c in _INT_COLUMNS:
                out[c] = np.nan_to_num(col, nan=0.0).astype(bool)
            else:
                out[c] = col
        return out

    def tensor_norms(self) -> tuple[Any, tuple[str, ...], Any]:
        """``(steps, names, norms)``: snapshot steps, names, a ``(steps, names)`` float32 array."""
        np = _numpy()
        names = self.names()
        sql = "SELECT step, norms FROM tensor_norms ORDER BY step"
        rows = self._reader().execute(sql).fetchall()
        steps = np.array([r[0] for r in rows], dtype=np.int64)
        norms = np.empty((len(rows), len(names)), dtype=np.float32)
        for i, (_, blob) in enumerate(rows):
            values = np.frombuffer(blob, dtype="<f4")
            if values.size != len(names):
                raise StoreError(
                    f"{str(self.path)!r}: snapshot at step {rows[i][0]} holds {values.size} "
                    f"norms for {len(names)} names"
                )
            norms[i] = values
        return steps, names, norms

    def events(self, kind: str | None = None, last: int | None = None) -> list[Event]:
        """Recorded events in step order; only those of ``kind``, or the latest ``last``."""
        sql = "SELECT step, kind, message, data FROM events"
        args: tuple[Any, ...] = ()
        if kind is not None:
            sql, args = sql + " WHERE kind = ?", (kind,)
        if last is None:
            rows = self._reader().execute(sql + " ORDER BY step, id", args).fetchall()
        else:
            sql += " ORDER BY step DESC, id DESC LIMIT ?"
            rows = self._reader().execute(sql, (*args, max(int(last), 0))).fetchall()[::-1]
        return [Event(s, k, m, json.loads(d)) for s, k, m, d in rows]

    def to_pandas(self) -> Any:
        """The steps table as a ``pandas.DataFrame`` indexed by step."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError(
                "RunStore.to_pandas needs pandas: pip install 'gradguard[pandas]'"
            ) from e
        data = self.steps()
        return pd.DataFrame(data).set_index("step")


def _numpy() -> Any:
    try:
        import numpy
    except ImportError as e:
        raise ImportError("reading a run store needs numpy: pip install numpy") from e
    return numpy
