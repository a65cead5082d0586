"""Store files: clean close, read-only places, atomic creation, refusing what is not ours."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pytest

from gradguard.cli import main
from gradguard.record import Recorder, RunStore, StoreError
from tests.record.fake_steps import NAMES, env, run_steps


def _record(path, steps: int = 12) -> None:
    with Recorder(path, log_every=4, tensor_every=2) as rec:
        rec.start(NAMES)
        run_steps(rec, range(steps))


def _siblings(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _readonly(directory, code: str) -> subprocess.CompletedProcess:
    """Run ``python -c code`` where ``directory`` cannot be written: a read-only bind
    mount (as root, in a user namespace) or a mode-555 directory (as a plain user)."""
    command = [sys.executable, "-c", code]
    if os.geteuid() != 0:
        os.chmod(directory, 0o555)
        try:
            return subprocess.run(command, capture_output=True, text=True, env=env(), timeout=240)
        finally:
            os.chmod(directory, 0o755)
    probe = ["unshare", "-rm", "true"]
    if shutil.which("unshare") is None or subprocess.run(probe, capture_output=True).returncode:
        pytest.skip("root without user namespaces: cannot make a read-only place")
    d = str(directory)
    script = f'mount --bind {d} {d} && mount -o remount,bind,ro {d} && exec "$@"'
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", *command],
        capture_output=True,
        text=True,
        env=env(),
        timeout=240,
    )


READ = (
    "import sys; from gradguard.record import RunStore; from gradguard.cli import main; "
    "s = RunStore.open({path!r}); print(len(s.steps()['step']), len(s.tensor_norms()[0])); "
    "s.close(); sys.stdout.flush(); "
    "print('export', main(['export', {path!r}, '--format', 'csv', '--out', '-']) == 0); "
    "print('watch', main(['watch', {path!r}, '--once']) == 0)"
)


def test_a_closed_store_is_one_plain_file_and_readers_leave_nothing(tmp_path, capsys):
    _record(tmp_path)
    assert _siblings(tmp_path) == ["gradguard.db"]
    header = (tmp_path / "gradguard.db").read_bytes()[18:20]
    assert header == b"\x01\x01"  # rollback journal, not WAL: readable from read-only places
    with RunStore.open(tmp_path) as store:
        store.steps(), store.events(), store.tensor_norms(), store.runs()
    assert main(["export", str(tmp_path), "--format", "jsonl", "--out", "-"]) == 0
    assert main(["watch", str(tmp_path), "--once"]) == 0
    assert main(["runs", str(tmp_path)]) == 0
    assert main(["report", str(tmp_path), "--out", str(tmp_path.parent / "r.html")]) == 0
    capsys.readouterr()
    assert _siblings(tmp_path) == ["gradguard.db"]


def test_a_store_is_readable_where_the_reader_cannot_write(tmp_path):
    run = tmp_path / "run"
    _record(run)
    out = _readonly(run, READ.format(path=str(run)))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "12 6" and "export True" in lines and "watch True" in lines
    assert _siblings(run) == ["gradguard.db"]


def test_a_killed_writers_store_is_readable_from_a_read_only_place(tmp_path):
    run = tmp_path / "run"
    code = (
        "import os, signal, sys, torch; from gradguard.record import Recorder; "
        "rec = Recorder(sys.argv[1], log_every=3); rec.start(['w']); "
        "[rec.record(s, total_norm=torch.tensor(1.0), clipped_norm=1.0, clip_coef=1.0, "
        "threshold=1.0, skipped=False, reason=0) for s in range(9)]; rec.drain(); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    subprocess.run([sys.executable, "-c", code, str(run)], env=env(), timeout=240)
    assert "gradguard.db-wal" in _siblings(run)  # the crash left its log
    out = _readonly(run, READ.format(path=str(run)).split("; s.close()")[0])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "9"


def test_a_reader_opens_an_idle_wal_store_from_a_read_only_place(tmp_path):
    run = tmp_path / "run"
    _record(run)
    conn = sqlite3.connect(run / "gradguard.db")
    conn.execute("PRAGMA journal_mode=WAL")  # as a v1 store, or one whose close could not settle
    conn.close()
    out = _readonly(run, READ.format(path=str(run)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == ["12", "6"]


def test_readers_never_see_a_half_made_store(tmp_path):
    targets = [tmp_path / f"run{i}" for i in range(60)]
    problems: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            for target in targets:
                try:
                    RunStore.open(target).close()
                except StoreError as e:  # absent yet is fine; half-made is not
                    if "does not exist" not in str(e) and "no gradguard run store" not in str(e):
                        problems.append(str(e))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for target in targets:
            RunStore(target).start(NAMES)  # left open: a store being written
    finally:
        done.set()
        reader.join()
    assert problems == []
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_a_foreign_sqlite_file_with_a_meta_table_is_left_alone(tmp_path):
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.execute("CREATE TABLE users (id INTEGER, name TEXT)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match=r"not a healthy gradguard run store.*steps"):
        RunStore(path).start(NAMES)
    with pytest.raises(StoreError, match=str(path)):
        RunStore.open(path).steps()
    assert path.read_bytes() == before and _siblings(tmp_path) == ["app.db"]


def _damage_a_steps_page(path) -> None:
    conn = sqlite3.connect(path)
    page = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'steps'").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    data = bytearray(path.read_bytes())
    data[(page - 1) * size] = 0x55  # not a b-tree page type
    path.write_bytes(bytes(data))


def test_a_damaged_store_is_never_written(tmp_path):
    _record(tmp_path, steps=400)
    path = tmp_path / "gradguard.db"
    _damage_a_steps_page(path)
    before = path.read_bytes()
    with pytest.raises(StoreError, match=r"damaged.*restore it from a copy"):
        RunStore(tmp_path).start(NAMES)
    with pytest.warns(RuntimeWarning, match="RunStore.*damaged"):
        _record(tmp_path)  # a Recorder warns once and training goes on
    assert path.read_bytes() == before and _siblings(tmp_path) == ["gradguard.db"]
    with RunStore.open(tmp_path) as store, pytest.raises(StoreError, match="reading steps"):
        store.steps()


def test_schema_text_that_is_not_utf8_is_a_damaged_store_not_an_internal_error(tmp_path, capsys):
    _record(tmp_path)
    path = tmp_path / "gradguard.db"
    data = bytearray(path.read_bytes())
    at = data.index(b"CREATE TABLE") + 2  # the schema's SQL text, which sqlite3 decodes
    data[at] ^= 0x80  # a flipped high bit: no longer UTF-8
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"not a readable gradguard run store.*damaged"):
        RunStore.open(tmp_path)
    assert main(["runs", str(tmp_path)]) == 2
    assert "internal error" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit, method, words",
    [
        ("UPDATE tensor_norms SET norms = x'0000' WHERE step = 2", "tensor_norms", "2 bytes"),
        ("UPDATE tensor_norms SET norms = 'text' WHERE step = 2", "tensor_norms", "step 2"),
        ("UPDATE steps SET total_norm = 'high' WHERE step = 3", "steps", "reading steps"),
        ("UPDATE steps SET step = 'x' WHERE step = 3", "steps", "reading steps"),
        ("UPDATE events SET data = '{broken' ", "events", "reading event"),
        ("UPDATE events SET data = '[1, 2]' ", "events", "not a JSON object"),
        ("UPDATE runs SET names = 'nope'", "names", "not valid JSON"),
        ("UPDATE runs SET config = '{' ", "meta", "config is not valid JSON"),
        ("UPDATE meta SET value = '{' WHERE key = 'created'", "meta", "'created' is not valid"),
        ("DROP TABLE events", "open", "table 'events' is missing"),
        ("ALTER TABLE steps DROP COLUMN loss", "open", "lacks loss"),
        ("DELETE FROM meta WHERE key = 'schema_version'", "open", "not a gradguard run store"),
    ],
)
def test_every_damage_is_a_store_error_naming_the_file(tmp_path, edit, method, words):
    _record(tmp_path)
    path = tmp_path / "gradguard.db"
    with RunStore.open(tmp_path) as store:
        store.steps()
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO events (run, step, kind, message, data) VALUES (1, 3, 'k', 'm', '{}')"
    )
    conn.execute(edit)
    conn.commit()
    conn.close()
    with pytest.raises(StoreError) as info:
        store = RunStore.open(tmp_path)
        if method != "open":
            getattr(store, method)()
    assert str(path) in str(info.value) and words in str(info.value), info.value
    if method == "open":  # a writer refuses it too (damage inside a run's rows is only
        before = path.read_bytes()  # found by reading them; new runs may still be added)
        with pytest.raises(StoreError, match=words):
            RunStore(tmp_path).start(NAMES)
        assert path.read_bytes() == before


def test_store_errors_for_unusable_paths(tmp_path):
    (tmp_path / "empty.db").write_bytes(b"")
    with pytest.raises(StoreError, match="is empty"):
        RunStore.open(tmp_path / "empty.db")
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StoreError, match="is a directory"):
        RunStore.open(tmp_path / "dir.db")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match=r"cannot create run store.*writable directory"):
        RunStore(blocker / "sub").start(NAMES)
    np.testing.assert_array_equal(RunStore.open(_empty_store(tmp_path)).steps()["step"], [])


def _empty_store(tmp_path):
    store = RunStore(tmp_path / "fresh")
    store.start(NAMES)
    conn = sqlite3.connect(store.path)
    conn.execute("DELETE FROM runs")  # a store whose only run never got its row
    conn.commit()
    conn.close()
    store.close()
    return tmp_path / "fresh"
