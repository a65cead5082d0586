"""Runs inside a store: open a new one, resume one explicitly, list them."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _db
from ._migrate import v1_run_row

#: runs this process is writing now, as (resolved store path, run id)
_OPEN: set[tuple[str, int]] = set()
_OPEN_LOCK = threading.Lock()

_COLUMNS = (
    "run",
    "started",
    "ended",
    "status",
    "pid",
    "host",
    "resumed",
    "config",
    "names",
    "shapes",
    "versions",
)
_JSON = frozenset({"resumed", "config", "names", "shapes", "versions"})


@dataclass(frozen=True)
class RunInfo:
    """One run of a store, as :meth:`RunStore.runs` lists it.

    ``status`` is ``"running"`` while its writer is open, ``"closed"`` after a clean
    close, and ``"interrupted"`` when the writer's process on this host is gone without
    closing it (killed, crashed); a run written from another host that was never closed
    reads ``"running"``.
    """

    run: int
    started: str
    ended: str | None
    status: str
    pid: int | None
    host: str | None
    config: dict[str, Any]
    names: tuple[str, ...]
    shapes: list[list[int]] | None
    versions: dict[str, str]
    resumed: list[str] = field(default_factory=list)
    steps: int = 0  #: steps recorded
    last_step: int | None = None  #: the latest recorded step


def check_resume(resume: object) -> int | str | None:
    """``None``, ``"latest"`` or a run id (int >= 1, numpy ints accepted)."""
    if resume is None or resume == "latest":
        return resume  # type: ignore[return-value]
    if not isinstance(resume, (bool, str)) and hasattr(resume, "__index__"):
        value = int(resume.__index__())  # type: ignore[attr-defined]
        if value >= 1:
            return value
    raise ValueError(f"resume must be None, 'latest' or a run id (an int >= 1), got {resume!r}")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def versions() -> dict[str, str]:
    from .._version import __version__ as gradguard_version

    try:
        import torch

        torch_version = str(torch.__version__)
    except ImportError:  # host front-ends without torch
        torch_version = "none"
    return {
        "gradguard_version": gradguard_version,
        "torch_version": torch_version,
        "python_version": platform.python_version(),
    }


def _alive(pid: int | None, host: str | None, key: tuple[str, int]) -> bool:
    """Whether a run's writer process is known to be running (on this host)."""
    if pid is None or host != socket.gethostname():
        return False
    if pid == os.getpid():
        with _OPEN_LOCK:
            return key in _OPEN
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def begin(
    conn: sqlite3.Connection,
    path: Path,
    resume: int | str | None,
    names: Sequence[str],
    config: dict,
    shapes: Sequence[Sequence[int]] | None,
) -> tuple[int, bool]:
    """Open a new run, or reopen ``resume``; returns ``(run id, resumed)``."""
    pid, host, stamp = os.getpid(), socket.gethostname(), now()
    with _db.errors(path, "starting a run"), _db.transaction(conn):
        target = _resume_target(conn, path, resume)
        if target is None:
            cur = conn.execute(
                "INSERT INTO runs (started, ended, status, pid, host, resumed, config, names, "
                "shapes, versions) VALUES (?, NULL, 'running', ?, ?, '[]', ?, ?, ?, ?)",
                (
                    stamp,
                    pid,
                    host,
                    json.dumps(config, default=repr),
                    json.dumps(list(names)),
                    json.dumps([list(s) for s in shapes] if shapes is not None else None),
                    json.dumps(versions()),
                ),
            )
            run, resumed = int(cur.lastrowid), False
        else:
            run, resumed = _reopen(conn, path, target, names, pid, host, stamp), True
    with _OPEN_LOCK:
        _OPEN.add((str(path.resolve()), run))
    return run, resumed


def end(conn: sqlite3.Connection, path: Path, run: int) -> None:
    """Mark ``run`` cleanly closed."""
    with _OPEN_LOCK:
        _OPEN.discard((str(path.resolve()), run))
    with _db.errors(path, "closing the run"), _db.transaction(conn):
        conn.execute("UPDATE runs SET status = 'closed', ended = ? WHERE run = ?", (now(), run))


def _resume_target(conn: sqlite3.Connection, path: Path, resume: int | str | None) -> int | None:
    if resume is None:
        return None
    if resume == "latest":
        row = conn.execute("SELECT max(run) FROM runs").fetchone()
        return None if row[0] is None else int(row[0])  # nothing to resume: a new run
    exists = conn.execute("SELECT 1 FROM runs WHERE run = ?", (resume,)).fetchone()
    if exists is None:
        known = [r[0] for r in conn.execute("SELECT run FROM runs ORDER BY run")]
        raise no_such_run(path, resume, known)
    return int(resume)


def no_such_run(path: Path, run: object, known: list[int]) -> _db.StoreError:
    """The error for a run id that the store does not hold."""
    have = ", ".join(map(str, known)) if known else "none"
    return _db.StoreError(
        f"{_db.label(path)} has no run {run!r} (runs: {have}); pass one of them, or 'latest'"
    )


def _reopen(
    conn: sqlite3.Connection,
    path: Path,
    run: int,
    names: Sequence[str],
    pid: int,
    host: str,
    stamp: str,
) -> int:
    row = conn.execute(
        "SELECT status, pid, host, names, resumed FROM runs WHERE run = ?", (run,)
    ).fetchone()
    status, old_pid, old_host, old_names, resumed = row
    key = (str(path.resolve()), run)
    if status == "running" and _alive(old_pid, old_host, key):
        raise _db.StoreError(
            f"{_db.label(path)}: run {run} is being written by process {old_pid} on "
            f"{old_host}; stop that process first, or record into a new run (resume=None)"
        )
    stored = tuple(json.loads(old_names) or ())
    if stored and names and stored != tuple(names):
        raise _db.StoreError(
            f"{_db.label(path)}: run {run} has different parameter names than this model; "
            "resume it with the same model, or record a new run (resume=None)"
        )
    history = json.loads(resumed or "[]")
    conn.execute(
        "UPDATE runs SET status = 'running', ended = NULL, pid = ?, host = ?, resumed = ? "
        "WHERE run = ?",
        (pid, host, json.dumps([*history, stamp]), run),
    )
    return run


def list_runs(
    conn: sqlite3.Connection,
    path: Path,
    version: int,
    meta: dict[str, Any],
    only: int | None = None,
    count: bool = True,
) -> list[RunInfo]:
    """The store's runs (or only run ``only``), oldest first; ``count`` fills in their
    step counts (a scan of their steps)."""
    where, args = ("WHERE run = ?", (only,)) if only is not None else ("", ())
    if version == 1:
        rows = [v1_run_row(meta)] if only in (None, 1) else []
        sql = "SELECT 1, count(*), max(step) FROM steps"
    else:
        sql = f"SELECT {', '.join(_COLUMNS)} FROM runs {where} ORDER BY run"
        rows = [_decode(dict(zip(_COLUMNS, r)), path) for r in conn.execute(sql, args)]
        sql = f"SELECT run, count(*), max(step) FROM steps {where} GROUP BY run"
    counts = conn.execute(sql, args if version != 1 else ()).fetchall() if count else []
    by_run = {int(r): (int(n), m) for r, n, m in counts if n}
    resolved = str(path.resolve())
    out = []
    for row in rows:
        n, last = by_run.get(row["run"], (0, None))
        status = row["status"]
        local = row["host"] == socket.gethostname()
        if (
            status == "running"
            and local
            and not _alive(row["pid"], row["host"], (resolved, row["run"]))
        ):
            status = "interrupted"
        out.append(
            RunInfo(
                run=int(row["run"]),
                started=str(row["started"]),
                ended=row["ended"],
                status=str(status),
                pid=row["pid"],
                host=row["host"],
                config=row["config"] if isinstance(row["config"], dict) else {},
                names=tuple(str(n) for n in row["names"] or ()),
                shapes=row["shapes"],
                versions=row["versions"] if isinstance(row["versions"], dict) else {},
                resumed=list(row["resumed"] or []),
                steps=n,
                last_step=None if last is None else int(last),
            )
        )
    return out


def _decode(row: dict[str, Any], path: Path) -> dict[str, Any]:
    for key in _JSON:
        value = row[key]
        try:
            row[key] = json.loads(value) if value is not None else None
        except (TypeError, ValueError) as e:
            raise _db.StoreError(
                f"{_db.label(path)}: run {row['run']}'s {key} is not valid JSON; {_db.DAMAGED}"
            ) from e
    if not isinstance(row["run"], int) or (
        row["names"] is not None and not isinstance(row["names"], list)
    ):
        raise _db.StoreError(f"{_db.label(path)}: the runs table is malformed; {_db.DAMAGED}")
    return row
