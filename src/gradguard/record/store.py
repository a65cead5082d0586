"""The run store: one SQLite file per run directory, holding every run recorded into it.

Runs. A run directory never loses a run. Each start of a writer (a ``Recorder`` or
``Guard`` with a store, a ``RunStore.start``) opens a NEW run inside the store, with
its own id, start time, pid and host, config, parameter names and shapes; every row is
keyed by its run. Running a script twice, two processes writing at once, or two Guards
in one process give separate runs, written safely side by side. ``resume=<run id>``
(or ``"latest"``) continues a run explicitly, e.g. after loading a checkpoint: the
first steps it records replace that run's rows from that step on (the abandoned
trajectory), and resuming a run whose writer is still alive is refused, naming the
process. Readers (``RunStore.open(path)``, ``report``, ``watch``, ``export``) read
the latest run unless given ``run=``; ``runs()`` lists them all.

Files. Writers use WAL mode (``synchronous=NORMAL``): readers never block a writer,
and each flush is one transaction, so a killed process keeps every flushed interval.
The last writer to close cleanly turns the file back into a plain rollback-journal
file: no ``-wal``/``-shm`` beside it, readable from a read-only directory or mount
and by another user. A store is created whole (built in a temporary file, then
linked into place), so a reader never sees a half-made one. A writer first checks the
file (SQLite header, ``PRAGMA quick_check``, the tables below) and refuses, touching
nothing, anything that is not a healthy gradguard store. Every failure is a
:class:`StoreError` naming the file and what to do.

Schema (``schema_version`` 2; v1 stores, one run with its fields in ``meta``, are
read as run 1 and migrated in place by the first writer that opens them)::

    meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)            -- JSON values:
        schema_version, format ("gradguard run store"), created, [migrated_from_v1]
    runs(run INTEGER PRIMARY KEY AUTOINCREMENT,                -- ids never reused
         started TEXT, ended TEXT, status TEXT,                 -- 'running' | 'closed'
         pid INTEGER, host TEXT, resumed TEXT,                  -- resumed: JSON list of times
         config TEXT, names TEXT, shapes TEXT, versions TEXT)   -- JSON
    steps(run, step, total_norm REAL, clipped_norm REAL, clip_coef REAL, threshold REAL,
          clipped INTEGER, skipped INTEGER, reason INTEGER,     -- 0/1, 0/1, SkipReason code
          loss REAL, lr REAL, loss_scale REAL,                  -- NULL reads back as NaN
          PRIMARY KEY (run, step)) WITHOUT ROWID
    tensor_norms(run, step, extra INTEGER, norms BLOB, PRIMARY KEY (run, step))
        -- little-endian float32, one value per entry of the run's names, in that order;
        -- extra=1: snapshotted off schedule because the step's total norm was non-finite
    events(id INTEGER PRIMARY KEY AUTOINCREMENT, run, step, end_step, key, ongoing,
           kind TEXT, message TEXT, data TEXT,                  -- data: JSON
           UNIQUE (run, key))  -- an event with a key replaces its run's earlier one

SQLite stores a NaN REAL as NULL, so NaN and "not recorded" read back alike (NaN);
infinities are kept. Sizes are measured by ``benchmarks/bench_record.py``.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import os
import sqlite3
import sys
import threading
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..schema import STEP_COLUMNS, Event, HostBatch
from . import _db, _migrate, _runs
from ._db import SCHEMA_VERSION, StoreError
from ._reading import StoreReader
from ._runs import RunInfo

__all__ = [
    "DB_NAME",
    "SCHEMA_VERSION",
    "RunInfo",
    "RunStore",
    "StoreError",
    "is_database",
    "resolve_path",
]

DB_NAME = "gradguard.db"
_INT_COLUMNS = _db.INT_COLUMNS


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """The database file for ``path``: the file itself, or ``<run dir>/gradguard.db``."""
    p = Path(path)
    if p.suffix in (".db", ".sqlite", ".sqlite3") or p.is_file():
        return p
    return p / DB_NAME


def is_database(path: str | os.PathLike[str]) -> bool:
    """Whether writing a file at ``path`` would destroy a database: an existing SQLite file
    (a run store, whatever its name), or the journal, write-ahead log or shared memory
    beside one. Writers of reports and exports refuse such a target."""
    p = Path(path)
    for suffix in ("-wal", "-shm", "-journal"):
        if p.name.endswith(suffix):
            p = p.with_name(p.name[: -len(suffix)])
            break
    try:
        _db.check_header(p)
    except StoreError:  # absent, a directory, unreadable, not SQLite: nothing to destroy
        return False
    return True


def default_run_dir(root: str | os.PathLike[str] = "runs") -> Path:
    """``<root>/<timestamp>``, made unique with a counter if it already exists."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / stamp
    candidate, i = base, 1
    while candidate.exists():
        candidate, i = Path(f"{base}-{i}"), i + 1
    return candidate


def _pack(norms: Sequence[float]) -> bytes:
    a = array("f", norms)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def _cells(column: str, values: Sequence[float]) -> Sequence[float | int | None]:
    """A column's values as bound: integers where the column holds them (NULL for NaN);
    sqlite3 binds a float NaN as NULL itself."""
    if column in _INT_COLUMNS:
        return [int(v) if math.isfinite(v) else None for v in values]
    return values


class RunStore(StoreReader):
    """A run store: a :class:`~gradguard.schema.Sink` when writing, a reader via :meth:`open`.

    ``RunStore(path)`` touches no file until :meth:`start`, which opens a new run (or
    resumes ``resume``: a run id or ``"latest"``). ``path`` is a run directory
    (``<dir>/gradguard.db``) or a ``.db`` file; ``None`` means ``runs/<timestamp>``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        root: str = "runs",
        resume: int | str | None = None,
    ) -> None:
        self.path = resolve_path(path) if path is not None else default_run_dir(root) / DB_NAME
        self.resume = _runs.check_resume(resume)
        self._conn: Any = None
        self._readonly = False
        self._run: int | None = None
        self._layout = _migrate.V2
        self._version = SCHEMA_VERSION
        self._truncate = False  # a resumed run: drop its rows from the first new step on
        self._event_floor = 0  # events with ids up to this predate the resume
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        run = f", run={self._run}" if self._run is not None else ""
        return f"RunStore({str(self.path)!r}{run})"

    @property
    def run(self) -> int | None:
        """The run being written or read (``None`` before :meth:`start`, or in an empty store)."""
        return self._run

    # ----------------------------------------------------------------- writing
    def start(
        self,
        names: Sequence[str],
        config: dict | None = None,
        shapes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Open the store (creating it whole if absent) and begin this writer's run."""
        if self._conn is not None:
            return
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                now = _runs.now()
                _db.create(
                    path, {"schema_version": SCHEMA_VERSION, "format": _db.FORMAT, "created": now}
                )
        except OSError as e:
            raise StoreError(
                f"cannot create run store {_db.label(path)}: {e.strerror or e}; choose a "
                "writable directory"
            ) from e
        except sqlite3.Error as e:
            raise StoreError(f"cannot create run store {_db.label(path)}: {e}") from e
        _db.check_header(path)
        conn = _db.connect_writer(path)
        try:
            version = _db.read_meta(conn, path)["schema_version"]
            _db.quick_check(conn, path)
            if version == 1:
                _migrate.migrate_v1(conn, path)
            with _db.errors(path, "opening the store for writing"):
                conn.execute("PRAGMA journal_mode=WAL").fetchone()
                conn.execute("PRAGMA synchronous=NORMAL")
            run, resumed = _runs.begin(conn, path, self.resume, names, config or {}, shapes)
            if resumed:
                with _db.errors(path, "resuming the run"):
                    row = conn.execute("SELECT max(id) FROM events WHERE run = ?", (run,))
                    self._event_floor = int(row.fetchone()[0] or 0)
        except BaseException:
            conn.close()
            raise
        self._conn, self._run, self._truncate = conn, run, resumed

    def write(self, batch: HostBatch, events: Sequence[Event] = ()) -> None:
        """Write one flushed batch (and ``events``) in a single transaction."""
        conn, run = self._writer()
        columns = [_cells(c, batch.columns[c]) for c in STEP_COLUMNS]
        rows = list(zip(itertools.repeat(run), batch.steps, *columns))
        extra = batch.extra_tensor_steps
        norms = [
            (run, s, int(s in extra), _pack(v))
            for s, v in zip(batch.tensor_steps, batch.tensor_norms)
        ]
        marks = ", ".join("?" * (len(STEP_COLUMNS) + 2))
        with self._lock, _db.errors(self.path, "writing steps"), _db.transaction(conn):
            if self._truncate and (batch.steps or batch.tensor_steps):
                self._drop_abandoned(conn, min(batch.steps or batch.tensor_steps))
            conn.executemany(
                f"INSERT OR REPLACE INTO steps (run, step, {', '.join(STEP_COLUMNS)}) "
                f"VALUES ({marks})",
                rows,
            )
            if norms:
                conn.executemany(
                    "INSERT OR REPLACE INTO tensor_norms (run, step, extra, norms) "
                    "VALUES (?, ?, ?, ?)",
                    norms,
                )
            self._insert_events(conn, run, events)

    def write_events(self, events: Sequence[Event]) -> None:
        """Write events in one transaction; a keyed event replaces its run's earlier one."""
        if not events:
            return
        conn, run = self._writer()
        with self._lock, _db.errors(self.path, "writing events"), _db.transaction(conn):
            self._insert_events(conn, run, events)

    @staticmethod
    def _insert_events(conn: Any, run: int, events: Sequence[Event]) -> None:
        conn.executemany(
            "INSERT INTO events (run, step, end_step, key, ongoing, kind, message, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run, key) DO UPDATE SET "
            "step = excluded.step, end_step = excluded.end_step, ongoing = excluded.ongoing, "
            "kind = excluded.kind, message = excluded.message, data = excluded.data",
            [
                (
                    run,
                    int(e.step),
                    None if e.end_step is None else int(e.end_step),
                    e.key,
                    int(bool(e.ongoing)),
                    e.kind,
                    e.message,
                    json.dumps(e.data, default=repr),
                )
                for e in events
            ],
        )

    def _drop_abandoned(self, conn: Any, first: int) -> None:
        """A resumed run re-records from ``first``: its old rows from there on go."""
        self._truncate = False
        args = (self._run, first)
        conn.execute("DELETE FROM steps WHERE run = ? AND step >= ?", args)
        conn.execute("DELETE FROM tensor_norms WHERE run = ? AND step >= ?", args)
        conn.execute(
            "DELETE FROM events WHERE run = ? AND step >= ? AND id <= ?", (*args, self._event_floor)
        )

    def close(self) -> None:
        """End the run (marked closed) and release the file; safe to call twice."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if not self._readonly and self._run is not None:
                _runs.end(conn, self.path, self._run)
                _db.settle(conn)
        finally:
            conn.close()

    def _writer(self) -> tuple[Any, int]:
        if self._conn is None or self._run is None:
            raise StoreError(f"run store {_db.label(self.path)} is not started (call start first)")
        if self._readonly:
            raise StoreError(f"run store {_db.label(self.path)} was opened read-only")
        return self._conn, self._run

    # ----------------------------------------------------------------- reading
    @classmethod
    def open(cls, path: str | os.PathLike[str], run: int | str | None = None) -> RunStore:
        """Open an existing store (a ``.db`` file or a run directory) for reading.

        Reads run ``run`` (an id from :meth:`runs`), by default the latest. Safe while
        other processes write it, and from a read-only place; writes nothing. Raises
        :class:`StoreError` when the path holds no store, a damaged or foreign file, a
        newer schema, or no such run.
        """
        if not os.path.exists(path):
            raise StoreError(f"{os.fspath(path)!r} does not exist")
        db = resolve_path(path)
        if not db.exists():
            raise StoreError(f"no gradguard run store at {_db.label(db)}")
        _db.check_header(db)
        conn = _db.connect_reader(db)
        store = cls(db)
        store._conn, store._readonly = conn, True
        try:
            version = _db.read_meta(conn, db)["schema_version"]
            store._version, store._layout = version, _migrate.layout(version)
            store._run = store._pick(run)
        except BaseException:
            conn.close()
            raise
        return store

    def _pick(self, run: int | str | None) -> int | None:
        wanted = _runs.check_resume(run)
        with _db.errors(self.path, "reading the runs"):
            if self._version == 1:
                known = [1]
            else:
                known = [
                    int(r[0]) for r in self._reader().execute("SELECT run FROM runs ORDER BY run")
                ]
        if wanted is None or wanted == "latest":
            return known[-1] if known else None
        if wanted not in known:
            raise _runs.no_such_run(self.path, wanted, known)
        return int(wanted)

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
