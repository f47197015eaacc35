"""The SQLite connection and its transactions. Synchronous: the async facade (store.py) calls
it from one worker thread at a time.

- Writable: WAL, synchronous=FULL, busy timeout; migrations on open.
- Read-only (a follower): `mode=ro`, query_only; a fresh connection per read, because a
  follower's data changes underneath it and nothing may be cached.
- Every write is one transaction that also bumps `meta.revision` and stores the checksum of
  the post-write logical snapshot. Nothing is cached in memory: reads go to the database.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ctl.events import utc_now
from ctl.store.checksum import Snapshot
from ctl.store.schema import migrate
from piccolofs.atomic import fsync_dir

BUSY_TIMEOUT_MS = 5000
T = TypeVar("T")


class NoChange(Exception):
    """Raised by a write function whose request changes nothing: no revision is spent."""


def read_snapshot(db: sqlite3.Connection) -> Snapshot:
    auth = db.execute(
        "SELECT initialized, password_hash, password_stale, password_stale_at, "
        "password_ack_at, recovery_stale, recovery_stale_at, recovery_ack_at "
        "FROM auth_state WHERE id = 1").fetchone() or (0, None, 0, "", "", 0, "", "")
    remote = db.execute("SELECT payload FROM remote_config WHERE id = 1").fetchone()
    apps = [bytes(r[0]) if isinstance(r[0], bytes) else str(r[0]).encode()
            for r in db.execute("SELECT payload FROM apps ORDER BY name")]
    has_audit = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit'").fetchone()
    audit_rows = db.execute("SELECT count(*) FROM audit").fetchone()[0] if has_audit else 0
    return Snapshot(
        auth_initialized=bool(auth[0]), password_hash=auth[1] or "",
        password_stale=bool(auth[2]), password_stale_at=auth[3] or "",
        password_ack_at=auth[4] or "", recovery_stale=bool(auth[5]),
        recovery_stale_at=auth[6] or "", recovery_ack_at=auth[7] or "",
        remote=None if remote is None else (remote[0] if isinstance(remote[0], bytes)
                                            else str(remote[0]).encode()),
        apps=apps, audit_rows=audit_rows)


class ControlDB:
    def __init__(self, path: Path, read_only: bool, checkpoint_every: float = 60.0) -> None:
        self.path = path
        self.read_only = read_only
        self.checkpoint_every = checkpoint_every
        self._last_checkpoint = 0.0
        self._db: sqlite3.Connection | None = None
        if read_only:
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist (a follower never creates it)")
            with self._ro() as db:
                db.execute("SELECT revision FROM meta").fetchone()
        else:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                 timeout=BUSY_TIMEOUT_MS / 1000)
            try:  # a database that cannot be opened right is closed now, not when collected
                db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                if db.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
                    raise sqlite3.OperationalError("could not switch control.db to WAL mode")
                db.execute("PRAGMA synchronous = FULL")
                migrate(db)
            except BaseException:
                db.close()
                raise
            self._db = db

    @contextmanager
    def _ro(self) -> Iterator[sqlite3.Connection]:
        # SQLite opens a WAL database read-only only where its -wal and -shm files exist or
        # can be made, and a follower's filesystem refuses to make them. Once the leader
        # has checkpointed and removed them, the main file holds every commit: it is read
        # as immutable (no -shm), as nothing on this side may change it.
        wal = self.path.with_name(self.path.name + "-wal")
        mode = "ro" if wal.exists() else "ro&immutable=1"
        db = sqlite3.connect(f"file:{self.path}?mode={mode}", uri=True, isolation_level=None,
                             check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA query_only = 1")
            yield db
        finally:
            db.close()

    @contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            with self._ro() as db:
                yield db
        else:
            assert self._db is not None
            yield self._db

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self.reader() as db:
            db.execute("BEGIN")
            try:
                return fn(db)
            finally:
                db.execute("ROLLBACK")

    def revision(self) -> dict[str, Any]:
        row = self.read(lambda db: db.execute(
            "SELECT revision, checksum, updated_at FROM meta WHERE id = 1").fetchone())
        version = self.read(lambda db: db.execute("PRAGMA user_version").fetchone()[0])
        return {"revision": row[0], "checksum": row[1], "updated_at": row[2],
                "schema_version": version}

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> tuple[T, int, str] | None:
        """Run `fn` and the revision bump in one transaction. None when fn made no change."""
        if self.read_only or self._db is None:
            raise PermissionError("control store is read-only")
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
            revision = db.execute("SELECT revision FROM meta WHERE id = 1").fetchone()[0] + 1
            checksum = read_snapshot(db).checksum(revision)
            db.execute("UPDATE meta SET revision = ?, checksum = ?, updated_at = ? WHERE id = 1",
                       (revision, checksum, utc_now()))
            db.execute("COMMIT")
        except NoChange:
            db.execute("ROLLBACK")
            return None
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.maybe_checkpoint()
        return result, revision, checksum

    # -- maintenance ---------------------------------------------------------------------
    def maybe_checkpoint(self) -> None:
        now = time.monotonic()
        if now - self._last_checkpoint >= self.checkpoint_every:
            self.checkpoint("PASSIVE")

    def checkpoint(self, mode: str) -> None:
        if self._db is not None and mode in ("PASSIVE", "TRUNCATE", "FULL", "RESTART"):
            self._db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            self._last_checkpoint = time.monotonic()

    def quick_check(self) -> list[str]:
        rows = self.read(lambda db: db.execute("PRAGMA quick_check").fetchall())
        return [str(r[0]) for r in rows if r[0] != "ok"]

    def close(self) -> None:
        if self._db is not None:
            try:
                self.checkpoint("TRUNCATE")
            finally:
                self._db.close()
                self._db = None


def _vacuum_into(path: Path, fresh: Path) -> None:
    src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        src.execute("VACUUM INTO ?", (str(fresh),))
    finally:
        src.close()


def _sqlite_recover(path: Path, fresh: Path) -> None:
    """SQLite's own recovery (the shell's .recover), which reads pages directly."""
    dump = subprocess.run(["sqlite3", str(path), ".recover"], capture_output=True,
                          timeout=600, check=False)
    subprocess.run(["sqlite3", str(fresh)], input=dump.stdout, capture_output=True,
                   timeout=600, check=False)


def _table_copy(path: Path, fresh: Path) -> None:
    """Rebuild from the tables alone: schema from sqlite_master, rows by full scans that
    never touch an index, then indexes and triggers created anew. Damage confined to
    indexes (the common case) loses nothing."""
    src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    dst = sqlite3.connect(fresh, isolation_level=None)
    try:
        objects = src.execute("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL "
                              "AND name NOT LIKE 'sqlite_%'").fetchall()
        dst.execute("BEGIN")
        tables = [(n, q) for t, n, q in objects if t == "table"]
        for _, sql in tables:
            dst.execute(sql)
        for name, _ in [*tables, ("sqlite_sequence", "")]:
            try:
                rows = src.execute(f'SELECT * FROM "{name}" NOT INDEXED').fetchall()
            except sqlite3.OperationalError:
                continue  # no such table (sqlite_sequence without AUTOINCREMENT)
            if rows:
                marks = ", ".join("?" * len(rows[0]))
                if name == "sqlite_sequence":
                    dst.execute("DELETE FROM sqlite_sequence")
                dst.executemany(f'INSERT INTO "{name}" VALUES ({marks})', rows)
        for kind, _, sql in objects:
            if kind in ("index", "trigger", "view"):
                dst.execute(sql)
        version = src.execute("PRAGMA user_version").fetchone()[0]
        dst.execute(f"PRAGMA user_version = {int(version)}")
        dst.execute("COMMIT")
    finally:
        src.close()
        dst.close()


def _usable(fresh: Path) -> str | None:
    """None when the rebuilt file is sound and holds the store; otherwise why not."""
    if not fresh.exists():
        return "nothing was rebuilt"
    check = sqlite3.connect(fresh)
    try:
        verdict = check.execute("PRAGMA integrity_check").fetchone()[0]
        check.execute("SELECT revision FROM meta WHERE id = 1").fetchone()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    finally:
        check.close()
    return None if verdict == "ok" else f"integrity_check: {verdict}"


def repair(path: Path) -> str:
    """Rebuild a damaged database into a fresh file and swap it in; keep the original aside.

    `VACUUM INTO` first; where that fails, SQLite's recovery (.recover), then a rebuild from
    the tables. A copy is used only if it passes integrity_check and holds the store.
    Returns what was done.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    fresh = path.with_name(f"{path.name}.repair-{stamp}")
    failures = []
    for method, rebuild in (("VACUUM INTO", _vacuum_into), ("SQLite recovery", _sqlite_recover),
                            ("a rebuild from the tables", _table_copy)):
        if fresh.exists():
            fresh.unlink()
        try:
            rebuild(path, fresh)
        except (sqlite3.DatabaseError, OSError, subprocess.SubprocessError) as exc:
            failures.append(f"{method}: {exc}")
            continue
        problem = _usable(fresh)
        if problem is None:
            break
        failures.append(f"{method}: {problem}")
    else:
        if fresh.exists():
            fresh.unlink()
        raise sqlite3.DatabaseError("control.db could not be rebuilt (" + "; ".join(failures)
                                    + ")")
    fd = os.open(fresh, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    os.link(path, aside)  # the original stays reachable through every step
    for suffix in ("-wal", "-shm"):  # the old WAL must never be replayed onto the copy
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.rename(side, aside.with_name(aside.name + suffix))
    os.rename(fresh, path)  # atomic swap
    fsync_dir(path.parent)
    return f"rebuilt with {method}; damaged original kept as {aside.name}"
