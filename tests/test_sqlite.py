"""SQLite in WAL mode on the mount: the control store will live there."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from piccolofs.backing.syscalls import fsync_is_free
from tests.mounts import PiccoloMount, fsck_piccolofs, init_piccolofs


def _open(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    db.execute("PRAGMA synchronous=FULL")
    return db


def _writer(path: str, worker: int, rows: int) -> None:
    db = _open(Path(path))
    for i in range(0, rows, 50):
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO t(worker, n, payload) VALUES (?, ?, randomblob(300))",
                       [(worker, j) for j in range(i, i + 50)])
        db.execute("COMMIT")
    db.close()


@pytest.fixture(params=["disk", "memory"])
def store_volume(request: pytest.FixtureRequest, tmp_path: Path,
                 passfile: Path) -> Iterator[PiccoloMount]:
    """A tree on the test's directory, and one on a fresh tmpfs (where fsync runs inline)."""
    store = tmp_path / "store"
    store.mkdir()
    memory = request.param == "memory"
    if memory:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0700", "tmpfs",
                        str(store)], check=True, timeout=30)
    try:
        cipher = store / "cipher"
        init_piccolofs(cipher, passfile)
        if memory:
            fd = os.open(cipher, os.O_PATH)
            try:
                assert fsync_is_free(fd)
            finally:
                os.close(fd)
        with PiccoloMount(cipher, tmp_path / "mnt", passfile) as m:
            yield m
        res = fsck_piccolofs(cipher, passfile)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        if memory:
            subprocess.run(["umount", "-l", str(store)], check=False, timeout=30)


def test_sqlite_wal_workload(store_volume: PiccoloMount) -> None:
    volume = store_volume
    path = volume.mnt / "control.db"
    db = _open(path)
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, worker INT, n INT, payload BLOB)")
    db.execute("CREATE INDEX t_worker ON t(worker, n)")
    procs = [multiprocessing.get_context("spawn").Process(target=_writer,
                                                           args=(str(path), w, 1000))
             for w in range(3)]
    for p in procs:
        p.start()
    # concurrent reader through the shared-memory WAL index (mmap of control.db-shm)
    seen = 0
    while any(p.is_alive() for p in procs):
        seen = max(seen, db.execute("SELECT count(*) FROM t").fetchone()[0])
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 3000
    db.execute("UPDATE t SET payload = zeroblob(10) WHERE n % 7 = 0")
    db.execute("DELETE FROM t WHERE n % 11 = 0")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    expected = db.execute("SELECT worker, n, length(payload) FROM t ORDER BY id").fetchall()
    db.close()
    volume.stop()
    volume.start()
    db = _open(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT worker, n, length(payload) FROM t ORDER BY id").fetchall() == \
        expected
    db.close()
