"""Schema versions: read a v1 store as one run, migrate v1 to v2 in place.

A v1 store (gradguard 0.x before run identity) holds one run with its names, shapes
and config in ``meta``. Readers see it as run 1 without touching the file; the first
writer to open it migrates it in one transaction (nothing is dropped before its rows
are copied, so a crash mid-way leaves the v1 store as it was).
"""

from __future__ import annotations

import datetime as _dt
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..schema import STEP_COLUMNS
from . import _db

_VERSION_KEYS = ("gradguard_version", "torch_version", "python_version")


@dataclass(frozen=True)
class Layout:
    """Table expressions that give every schema version the v2 columns."""

    steps: str
    tensor_norms: str
    events: str


V2 = Layout("steps", "tensor_norms", "events")
V1 = Layout(
    steps=f"(SELECT 1 AS run, step, {', '.join(STEP_COLUMNS)} FROM steps)",
    tensor_norms="(SELECT 1 AS run, step, 0 AS extra, norms FROM tensor_norms)",
    events=(
        "(SELECT id, 1 AS run, step, NULL AS end_step, NULL AS key, 0 AS ongoing, kind, "
        "message, data FROM events)"
    ),
)


def layout(version: int) -> Layout:
    return V1 if version == 1 else V2


def v1_run_row(meta: dict[str, Any]) -> dict[str, Any]:
    """The one run of a v1 store, as the columns of a v2 ``runs`` row (decoded)."""
    return {
        "run": 1,
        "started": meta.get("created") or "",
        "ended": None,
        "status": "closed",
        "pid": None,
        "host": None,
        "resumed": [meta["resumed"]] if isinstance(meta.get("resumed"), str) else [],
        "config": meta.get("config") if isinstance(meta.get("config"), dict) else {},
        "names": meta.get("names") or [],
        "shapes": meta.get("shapes"),
        "versions": {k: meta[k] for k in _VERSION_KEYS if k in meta},
    }


def migrate_v1(conn: sqlite3.Connection, path: Path) -> None:
    """Rewrite a v1 store as v2 in place, in one transaction (a no-op if another
    writer migrated it first)."""
    with _db.errors(path, "migrating the store from schema v1 to v2"), _db.transaction(conn):
        meta = _db.read_meta(conn, path)
        if meta["schema_version"] == 1:
            _copy_v1(conn, meta)


def _copy_v1(conn: sqlite3.Connection, meta: dict[str, Any]) -> None:
    for table in ("steps", "tensor_norms", "events"):
        conn.execute(f"ALTER TABLE {table} RENAME TO v1_{table}")
    conn.execute("DROP INDEX IF EXISTS events_step")
    for statement in _db.DDL.split(";"):
        if statement.strip() and "TABLE meta" not in statement:
            conn.execute(statement)
    run = v1_run_row(meta)
    conn.execute(
        "INSERT INTO runs (run, started, ended, status, pid, host, resumed, config, names, "
        "shapes, versions) VALUES (?, ?, NULL, 'closed', NULL, NULL, ?, ?, ?, ?, ?)",
        (
            1,
            run["started"],
            json.dumps(run["resumed"]),
            json.dumps(run["config"]),
            json.dumps(run["names"]),
            json.dumps(run["shapes"]),
            json.dumps(run["versions"]),
        ),
    )
    cols = ", ".join(STEP_COLUMNS)
    conn.execute(f"INSERT INTO steps (run, step, {cols}) SELECT 1, step, {cols} FROM v1_steps")
    conn.execute(
        "INSERT INTO tensor_norms (run, step, extra, norms) SELECT 1, step, 0, norms "
        "FROM v1_tensor_norms"
    )
    conn.execute(
        "INSERT INTO events (id, run, step, end_step, key, ongoing, kind, message, data) "
        "SELECT id, 1, step, NULL, NULL, 0, kind, message, data FROM v1_events"
    )
    for table in ("steps", "tensor_norms", "events"):
        conn.execute(f"DROP TABLE v1_{table}")
    per_run = ("config", "names", "shapes", "resumed", *_VERSION_KEYS)
    conn.executemany("DELETE FROM meta WHERE key = ?", [(k,) for k in per_run])
    now = _dt.datetime.now(_dt.timezone.utc).isoformat()
    conn.executemany(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
        [
            ("schema_version", json.dumps(_db.SCHEMA_VERSION)),
            ("format", json.dumps(_db.FORMAT)),
            ("migrated_from_v1", json.dumps(now)),
        ],
    )
