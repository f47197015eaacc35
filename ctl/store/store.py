"""The control store as the daemon uses it: gated, health-checked, announcing its commits.

- Gate: locked -> every call raises Locked (423); follower -> the database is opened
  read-only and every mutation raises NotLeader (409). The gate follows the
  `lock_state_changed` and `leadership_role_changed` events; it never polls.
- Every commit is announced as `control_store_commit {revision, checksum, role}`.
- Health: `PRAGMA quick_check` at open and every `check_interval` seconds, published as
  `control_health {status, message, checked_at}`; on a leader a failed check triggers a
  repair (VACUUM INTO / recovery, verify, swap), whose outcome is published too.
- All SQLite work runs in a worker thread behind a limiter of one.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from ctl import roles
from ctl.errors import Failed, ImportPending, Locked, NotLeader
from ctl.events import Event, EventBus, utc_now
from ctl.store.db import ControlDB, repair

log = logging.getLogger("ctl.store")

T = TypeVar("T")
RESOURCE = "control"


class ControlStore:
    def __init__(self, db_path: Path, bus: EventBus, registry: roles.LeadershipRegistry,
                 check_interval: float = 300.0, checkpoint_every: float = 60.0) -> None:
        self.db_path = db_path
        self.bus = bus
        self.registry = registry
        self.check_interval = check_interval
        self.checkpoint_every = checkpoint_every
        self.locked = True
        self.role = registry.role(RESOURCE)
        self._db: ControlDB | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._wake_check = trio.Event()
        self._wake_role = trio.Event()
        self._volume_writable = False
        self._volume_mounted = False
        self._volume_error = ""
        self._reopen = False
        self.frozen: str | None = None  # why writes are refused on a leader (an import)
        self.health: dict[str, Any] = {"status": "unknown", "message": "control store locked",
                                       "checked_at": utc_now()}

    # -- plumbing ------------------------------------------------------------------------
    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    @property
    def read_only(self) -> bool:
        return self.role == roles.FOLLOWER or self.frozen is not None

    @property
    def is_open(self) -> bool:
        return self._db is not None

    @property
    def healthy(self) -> bool:
        return bool(self.health["status"] == "ok")

    def _require_open(self) -> ControlDB:
        if self.locked or self._db is None:
            raise Locked("control store locked")
        return self._db

    # -- lifecycle (called by the controller around the control volume) ----------------
    async def open(self) -> None:
        """Open on the mounted control volume: read-write as leader, read-only as follower."""
        read_only = not self.registry.may_lead(RESOURCE)
        self._db = await self._thread(ControlDB, self.db_path, read_only,
                                      self.checkpoint_every)
        self.role = roles.FOLLOWER if read_only else roles.LEADER
        await self.check()

    async def close(self) -> None:
        """TRUNCATE checkpoint and close (before lock, detach or export)."""
        db, self._db = self._db, None
        self._reopen = False
        if db is not None:
            try:
                await self._thread(db.close)
            except sqlite3.Error as exc:
                log.warning("closing control.db: %s", exc)
        self._set_health("unknown", "control store locked")

    def _on_event(self, event: Event) -> None:
        """The gate changes in the same step as the event that changes it."""
        data = event.data
        if event.topic == "lock_state_changed":
            self.locked = bool(data.get("locked"))
            return
        if event.topic == "volume_state_changed":
            if data.get("id") != RESOURCE:
                return
            self._volume_writable = (data.get("role") == roles.LEADER
                                     and data.get("observed_state") == "mounted")
            mounted = data.get("observed_state") == "mounted"
            if mounted != self._volume_mounted:
                self._volume_mounted = mounted
                if not mounted and self._db is not None:
                    self._reopen = True  # the connection's files belong to the lost mount
                self._volume_error = str(data.get("last_error") or "")
                self._wake_check.set()
        elif data.get("resource") == RESOURCE:
            self.role = str(data.get("role"))  # a demotion refuses writes from now on
        else:
            return
        self._wake_role.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        self.bus.listen(["lock_state_changed", "leadership_role_changed",
                         "volume_state_changed"], self._on_event)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._health_loop)
            task_status.started()
            while True:
                await self._wake_role.wait()
                self._wake_role = trio.Event()
                await self._follow_role()

    async def _follow_role(self) -> None:
        """Reopen for the current role. Read-only at once on demotion; read-write on
        promotion only once the control volume itself is writable again. The new
        connection opens before the old one closes, so readers never find no store."""
        old = self._db
        if old is None:
            return
        want_ro = self.role == roles.FOLLOWER
        if old.read_only == want_ro or (not want_ro and not self._volume_writable):
            return
        log.info("control store: role %s, reopening %s", self.role,
                 "read-only" if want_ro else "read-write")
        try:
            self._db = await self._thread(ControlDB, self.db_path, want_ro,
                                          self.checkpoint_every)
        except (sqlite3.Error, OSError) as exc:
            self._set_health("error", f"reopening after role change failed: {exc}")
            return
        try:
            await self._thread(old.close)
        except (sqlite3.Error, OSError) as exc:
            log.warning("closing control.db on role change: %s", exc)

    @contextlib.asynccontextmanager
    async def quiesced(self) -> AsyncIterator[dict[str, Any]]:
        """Hold every store operation while the control volume is copied: the WAL is
        checkpointed into the database (TRUNCATE) first, so the copy is one consistent file
        with nothing in flight. Yields the revision it holds."""
        async with self._limiter:
            db = self._require_open()
            wal = self.db_path.with_name(self.db_path.name + "-wal")

            def settle() -> dict[str, Any]:
                # Only a WAL with frames is checkpointed: truncating an empty one would
                # still touch it, and two exports of an unchanged store must be equal.
                with contextlib.suppress(FileNotFoundError):
                    if wal.stat().st_size > 0:
                        db.checkpoint("TRUNCATE")
                return db.revision()

            yield await trio.to_thread.run_sync(settle)

    # -- reads and writes ----------------------------------------------------------------
    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._require_open()
        return await self._thread(db.read, fn)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T | None:
        """One transaction plus the revision bump; announces the commit. None = no change."""
        db = self._require_open()
        if self.frozen is not None:
            raise ImportPending(f"the control store is read-only: {self.frozen}")
        if self.read_only or db.read_only:
            raise NotLeader("not leader: the control store is read-only on a follower")
        try:
            done = await self._thread(db.write, fn)
        except sqlite3.DatabaseError as exc:
            self._wake_check.set()
            raise Failed(f"control store write failed: {exc}") from None
        if done is None:
            return None
        result, revision, checksum = done
        self.bus.publish("control_store_commit",
                         {"revision": revision, "checksum": checksum, "role": self.role})
        return result  # type: ignore[no-any-return]

    async def status(self) -> dict[str, Any]:
        db = self._require_open()
        info = await self._thread(db.revision)
        return {**info, "role": self.role, "read_only": db.read_only, "health": self.health}

    # -- health --------------------------------------------------------------------------
    def _set_health(self, status: str, message: str) -> None:
        self.health = {"status": status, "message": message, "checked_at": utc_now()}
        self.bus.publish("control_health", self.health)

    async def check(self) -> dict[str, Any]:
        """quick_check now; on a leader, repair what it finds."""
        db = self._db
        if self.locked and db is None:
            self._set_health("unknown", "control store locked")
            return self.health
        assert db is not None
        if not self._volume_mounted:
            # The database may still answer through descriptors it holds, but new files
            # (journal, WAL) cannot be made: health says what is really wrong.
            self._set_health("error", "the control volume is not mounted"
                             + (f": {self._volume_error}" if self._volume_error else ""))
            return self.health
        if self._reopen:
            try:
                db = await self._reopen_on_new_mount(db)
            except (sqlite3.Error, OSError) as exc:
                self._set_health("error", f"reopening on the remounted control volume: {exc}")
                return self.health
        try:
            issues = await self._thread(db.quick_check)
        except sqlite3.Error as exc:
            issues = [f"quick_check failed: {exc}"]
        if not issues:
            self._set_health("ok", "ok")
            return self.health
        message = "; ".join(issues[:5])
        self._set_health("degraded", message)
        log.error("control.db failed quick_check: %s", message)
        if not db.read_only:
            await self._repair(db)
        return self.health

    async def _reopen_on_new_mount(self, old: ControlDB) -> ControlDB:
        """The control volume came back as a new mount: a connection opened on the old one
        would keep writing to files nobody else sees. Open anew, then drop the old one."""
        log.info("control store: the control volume was remounted; reopening")
        self._db = await self._thread(ControlDB, self.db_path, old.read_only,
                                      self.checkpoint_every)
        self._reopen = False
        with contextlib.suppress(sqlite3.Error, OSError):
            await self._thread(old.close)
        return self._db

    async def _repair(self, db: ControlDB) -> None:
        self._db = None
        with contextlib.suppress(sqlite3.Error):
            await self._thread(db.close)
        try:
            outcome = await self._thread(repair, self.db_path)
        except (sqlite3.Error, OSError) as exc:
            self._set_health("error", f"repair failed: {exc}")
            self._db = await self._thread(ControlDB, self.db_path, True, self.checkpoint_every)
            return
        self._db = await self._thread(ControlDB, self.db_path, False, self.checkpoint_every)
        issues = await self._thread(self._db.quick_check)
        if issues:
            self._set_health("error", f"still damaged after repair: {'; '.join(issues[:3])}")
        else:
            self._set_health("ok", f"repaired: {outcome}")
            log.warning("control.db repaired: %s", outcome)

    async def _health_loop(self) -> None:
        while True:
            with trio.move_on_after(self.check_interval):
                await self._wake_check.wait()
            self._wake_check = trio.Event()
            if self._db is not None and not self.locked:
                await self.check()
