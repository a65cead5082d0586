"""SQLite plumbing of the run store: atomic creation, connections, validation, errors.

Writers and readers meet here. A store file is created whole (tables and meta written
in a temporary file, then linked into place), so a reader never sees a half-made one.
A writer checks the file first (SQLite header, ``PRAGMA quick_check``, gradguard
tables and columns) and refuses anything else before writing a byte. Readers open
``mode=ro``; where that needs a write (a WAL-mode file whose directory the reader
cannot write), they fall back to ``immutable=1`` when no write-ahead log holds data.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..schema import STEP_COLUMNS

SCHEMA_VERSION = 2
FORMAT = "gradguard run store"
SQLITE_MAGIC = b"SQLite format 3\x00"
INT_COLUMNS = frozenset({"clipped", "skipped", "reason"})
TIMEOUT_S = 30.0

_STEP_DEFS = ", ".join(f"{c} {'INTEGER' if c in INT_COLUMNS else 'REAL'}" for c in STEP_COLUMNS)

#: schema v2 (see the module docstring of :mod:`gradguard.record.store`)
DDL = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    run INTEGER PRIMARY KEY AUTOINCREMENT,
    started TEXT NOT NULL, ended TEXT, status TEXT NOT NULL,
    pid INTEGER, host TEXT, resumed TEXT NOT NULL DEFAULT '[]',
    config TEXT NOT NULL, names TEXT NOT NULL, shapes TEXT, versions TEXT NOT NULL
);
CREATE TABLE steps (
    run INTEGER NOT NULL, step INTEGER NOT NULL, {_STEP_DEFS}, PRIMARY KEY (run, step)
) WITHOUT ROWID;
CREATE TABLE tensor_norms (
    run INTEGER NOT NULL, step INTEGER NOT NULL, extra INTEGER NOT NULL DEFAULT 0,
    norms BLOB NOT NULL, PRIMARY KEY (run, step)
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run INTEGER NOT NULL,
    step INTEGER NOT NULL, end_step INTEGER, key TEXT, ongoing INTEGER NOT NULL DEFAULT 0,
    kind TEXT NOT NULL, message TEXT NOT NULL, data TEXT NOT NULL, UNIQUE (run, key)
);
CREATE INDEX events_run_step ON events (run, step);
"""

#: columns each version's tables must have (a superset is accepted)
REQUIRED: dict[int, dict[str, frozenset[str]]] = {
    1: {
        "meta": frozenset({"key", "value"}),
        "steps": frozenset({"step", *STEP_COLUMNS}),
        "tensor_norms": frozenset({"step", "norms"}),
        "events": frozenset({"id", "step", "kind", "message", "data"}),
    },
    2: {
        "meta": frozenset({"key", "value"}),
        "runs": frozenset(
            {"run", "started", "ended", "status", "pid", "host", "resumed", "config"}
            | {"names", "shapes", "versions"}
        ),
        "steps": frozenset({"run", "step", *STEP_COLUMNS}),
        "tensor_norms": frozenset({"run", "step", "extra", "norms"}),
        "events": frozenset(
            {"id", "run", "step", "end_step", "key", "ongoing", "kind", "message", "data"}
        ),
    },
}


class StoreError(RuntimeError):
    """A run store cannot be opened, read or written: the message names the file and
    says what to do (missing, damaged, foreign, too new, not writable)."""


DAMAGED = (
    "the file is damaged or was edited by hand; restore it from a copy, or record the "
    "run again into a new directory"
)


def label(path: Path) -> str:
    return repr(str(path))


@contextlib.contextmanager
def errors(path: Path, what: str) -> Iterator[None]:
    """Turn sqlite3/decoding errors raised while doing ``what`` into a StoreError."""
    try:
        yield
    except StoreError:
        raise
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            raise StoreError(
                f"{label(path)}: {what} failed: {e} (another process held the store for "
                f"{TIMEOUT_S:.0f} s); try again"
            ) from e
        raise StoreError(f"{label(path)}: {what} failed: {e}; {DAMAGED}") from e
    except sqlite3.Error as e:
        raise StoreError(f"{label(path)}: {what} failed: {e}; {DAMAGED}") from e
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as e:
        raise StoreError(
            f"{label(path)}: {what} failed ({type(e).__name__}: {e}); {DAMAGED}"
        ) from e


def check_header(path: Path) -> None:
    """Raise StoreError unless ``path`` is a non-empty file starting with SQLite's magic."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except IsADirectoryError:
        raise StoreError(f"{label(path)} is a directory, not a gradguard run store") from None
    except OSError as e:
        raise StoreError(
            f"cannot read run store {label(path)}: {e.strerror or e}; check its permissions"
        ) from e
    if not head:
        raise StoreError(f"{label(path)} is empty: not a gradguard run store")
    if head != SQLITE_MAGIC:
        raise StoreError(f"{label(path)} is not a gradguard run store (not an SQLite file)")


def read_meta(conn: sqlite3.Connection, path: Path) -> dict[str, Any]:
    """Validate the tables of a v1 or v2 store and return its meta, JSON-decoded."""
    with errors(path, "reading the store's tables"):
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables:
            raise StoreError(f"{label(path)} is an SQLite file but not a gradguard run store")
        rows = conn.execute("SELECT key, value FROM meta").fetchall()
    meta: dict[str, Any] = {}
    for key, value in rows:
        try:
            meta[str(key)] = json.loads(value)
        except (TypeError, ValueError) as e:
            raise StoreError(
                f"{label(path)}: meta entry {key!r} is not valid JSON; {DAMAGED}"
            ) from e
    version = meta.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise StoreError(f"{label(path)} is an SQLite file but not a gradguard run store")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{label(path)} has schema_version {version}, newer than this gradguard "
            f"supports ({SCHEMA_VERSION}): upgrade gradguard to read it"
        )
    required = REQUIRED.get(version)
    if required is None:
        raise StoreError(f"{label(path)} has an unknown schema_version {version}; {DAMAGED}")
    with errors(path, "reading the store's tables"):
        for table, columns in required.items():
            have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            if not have:
                raise StoreError(
                    f"{label(path)} is not a healthy gradguard run store (table {table!r} "
                    f"is missing); {DAMAGED}"
                )
            if not columns <= have:
                missing = ", ".join(sorted(columns - have))
                raise StoreError(
                    f"{label(path)} is not a healthy gradguard run store (table {table!r} "
                    f"lacks {missing}); {DAMAGED}"
                )
    return meta


def quick_check(conn: sqlite3.Connection, path: Path) -> None:
    """``PRAGMA quick_check`` (~0.25 s per 100 MB): refuse a structurally damaged file."""
    with errors(path, "checking the store"):
        result = conn.execute("PRAGMA quick_check").fetchall()
    if result != [("ok",)]:
        detail = "; ".join(str(r[0]) for r in result[:2])
        raise StoreError(f"{label(path)} is damaged ({detail}); {DAMAGED}")


def create(path: Path, meta: dict[str, Any]) -> None:
    """Create the store at ``path`` whole, or leave an existing one alone.

    Tables and meta are written to a temporary file in the same directory, which is
    then hard-linked into place (atomic, never replacing a file another process made
    meanwhile). Where hard links are not supported, it is renamed into place when
    ``path`` is still absent.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            with transaction(conn):
                for statement in DDL.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [(k, json.dumps(v)) for k, v in meta.items()],
                )
        finally:
            conn.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another writer created it first: use theirs
        except OSError:  # no hard links on this file system
            if not path.exists():
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on any error) on an autocommit connection."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def connect_writer(path: Path) -> sqlite3.Connection:
    """An autocommit connection (transactions are explicit, see :func:`transaction`)."""
    try:
        return sqlite3.connect(
            path, timeout=TIMEOUT_S, check_same_thread=False, isolation_level=None
        )
    except sqlite3.Error as e:
        raise StoreError(f"cannot open run store {label(path)} for writing: {e}") from e


def _probed(conn: sqlite3.Connection, path: Path) -> sqlite3.Connection:
    """``conn`` once its schema reads; schema text that is not UTF-8 (a flipped byte) is a
    damaged store, not an internal error."""
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except UnicodeDecodeError as e:
        conn.close()
        raise StoreError(
            f"{label(path)} is not a readable gradguard run store ({e}); {DAMAGED}"
        ) from e
    return conn


def connect_reader(path: Path) -> sqlite3.Connection:
    """A read-only connection that writes nothing next to the file.

    ``mode=ro`` first; a WAL-mode file in a directory the reader cannot write (a
    read-only mount, another user's run) needs ``-shm``, so then the file is opened
    ``immutable=1``: exact for a cleanly closed store, refused when its write-ahead
    log still holds data that only a writable copy can replay.
    """
    uri = path.resolve().as_uri()
    try:
        conn = sqlite3.connect(
            f"{uri}?mode=ro", uri=True, timeout=TIMEOUT_S, check_same_thread=False
        )
        return _probed(conn, path)
    except sqlite3.DatabaseError as e:
        with contextlib.suppress(Exception):
            conn.close()
        text = str(e)
        if "readonly" not in text and "unable to open" not in text:
            raise StoreError(f"{label(path)} is not a readable gradguard run store: {e}") from e
        wal = path.with_name(path.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise StoreError(
                f"{label(path)} was not closed cleanly and its write-ahead log cannot be read "
                "from here (the directory is not writable): copy the run directory to a "
                "writable place and read the copy"
            ) from e
    try:
        conn = sqlite3.connect(
            f"{uri}?mode=ro&immutable=1", uri=True, timeout=TIMEOUT_S, check_same_thread=False
        )
        return _probed(conn, path)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open run store {label(path)}: {e}") from e


def settle(conn: sqlite3.Connection) -> None:
    """At a clean close: leave a plain rollback-journal file when no one else has it
    open (no ``-wal``/``-shm`` beside it, readable from a read-only place). With another
    connection open, the log is at least checkpointed and emptied when it can be (a
    reader elsewhere then opens the file ``immutable``). Never waits."""
    try:
        conn.execute("PRAGMA busy_timeout=0")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()  # an idle reader allows it
        conn.execute("PRAGMA journal_mode=DELETE").fetchone()
    except sqlite3.Error:
        pass  # another connection has it open; the last writer to close settles it
