"""The volume manager: ensure, attach, detach and role changes, journaled and published.

Each volume has a lock that serialises its transitions. Every transition is written to the
journal first (atomically) and then published as `volume_state_changed` with exactly the
journal record. Mount processes are children supervised in the manager's nursery: a child
that dies is noticed at once, journaled as an error, its stale mount cleaned, and — while
the intent is `mounted` — re-attached with exponential back-off.

`observed_state=mounted` means: our mount process runs and mountinfo shows its FUSE mount of
the volume's cipher dir at the mountpoint. A watcher compares the two every few seconds, and
`info` reports what it finds, so a mount that vanished is never reported as mounted. A
mountpoint with nothing on it refuses every write (ctl.volumes.mountpoint). Nothing here
stats a mountpoint: a dead FUSE mount would hang the daemon (ctl.volumes.mountinfo).
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import trio

from ctl import roles
from ctl.errors import (
    Busy,
    Conflict,
    CtlError,
    Failed,
    InvalidInput,
    Locked,
    NotFound,
    NotLeader,
    PoolAbsent,
    StateCorrupt,
)
from ctl.events import EventBus
from ctl.keys.manager import KeyManager
from ctl.paths import BOOTSTRAP, CONTROL, Paths
from ctl.roles import Fence
from ctl.volumes import journal, mountinfo, mountpoint
from ctl.volumes.child import MountChild
from ctl.volumes.journal import JournalRecord
from ctl.volumes.metadata import (
    CLASSES,
    CLUSTER_MODES,
    FOLLOWER_POLICIES,
    MetadataCorrupted,
    VolumeMeta,
    new_passphrase,
)
from piccolofs.atomic import fsync_dir, write_atomic
from piccolofs.backing.tree import CipherDirError, conf_path, init_tree, load_config
from piccolofs.format.config import InitOptions
from piccolofs.format.errors import FormatError

log = logging.getLogger("ctl.volumes")

VOLUME_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
RETRY_DELAYS = (0.5, 1, 2, 4, 8, 16, 30, 60)
WATCH_INTERVAL = 2.0
FSCK_MAX_LINES = 1000
CORE = (BOOTSTRAP, CONTROL)  # attached and detached by unlock and lock, not by operators


@dataclass(eq=False)
class Volume:
    id: str
    record: JournalRecord
    child: MountChild | None = None
    draining: MountChild | None = None
    expected_exit: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)
    retry: trio.CancelScope | None = None
    # Set when the journal was corrupt: the intent is unknown until an operator (or, for
    # the core volumes, unlock) states it; until then nothing acts on a guessed one.
    intent_lost: str | None = None
    guard_error: str | None = None
    fence: Fence | None = None  # the leadership term this node holds, when clustered
    pool_meta: VolumeMeta | None = None  # a pool volume's key file, once read


def _message(exc: BaseException) -> str:
    return exc.message if isinstance(exc, CtlError) else str(exc) or type(exc).__name__


class Pools(Protocol):
    """Where storage pools are (ctl.devices): volumes on a pool follow its disk."""

    def where(self, pool_id: str) -> Path | None:
        """The pool's filesystem, mounted and checked; None while its disk is away."""

    def name(self, pool_id: str) -> str:
        """How to name the pool to a person (its label, else its id)."""



class VolumeManager:
    def __init__(self, paths: Paths, keys: KeyManager, bus: EventBus,
                 registry: roles.LeadershipRegistry, scrypt_log_n: int = 16) -> None:
        self.paths = paths
        self.keys = keys
        self.bus = bus
        self.registry = registry
        self.scrypt_log_n = scrypt_log_n
        self._vols: dict[str, Volume] = {}
        self._nursery: trio.Nursery | None = None
        self.pools: Pools | None = None

    # ---------------------------------------------------------------------------------
    # lifecycle
    # ---------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Own the mount children; follow leadership changes. Runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._load()
            self.registry.on_renewal(self.renew)
            sub = self.bus.subscribe(["leadership_role_changed"])
            nursery.start_soon(self._follow_roles, sub)
            nursery.start_soon(self._watch)
            task_status.started()

    def _load(self) -> None:
        """Read every journal. A bad one flags its volume and is kept aside; it never stops
        the daemon nor the other volumes."""
        if not self.paths.journal_dir.exists():
            return
        for entry in sorted(self.paths.journal_dir.iterdir()):
            if not VOLUME_ID.fullmatch(entry.name) or not entry.is_dir():
                continue
            path = self.paths.journal(entry.name)
            vol = Volume(entry.name, JournalRecord())
            try:
                vol.record = journal.read(path) or JournalRecord()
                if not path.exists() and journal.kept_aside(path):
                    self._lose_intent(vol, f"its journal was corrupt and kept as "
                                           f"{journal.kept_aside(path)[-1].name}")
            except journal.CorruptJournal as exc:
                try:
                    aside = journal.set_aside(path)
                    self._lose_intent(vol, f"{exc}; kept as {aside.name}")
                except OSError as err:
                    self._lose_intent(vol, f"{exc}; cannot keep it aside: {err.strerror}")
            self._vols[entry.name] = vol

    def _lose_intent(self, vol: Volume, why: str) -> None:
        vol.intent_lost = (f"{why}; the volume's intent is unknown: attach or detach it to "
                           "set it")
        log.error("volume %s: %s", vol.id, vol.intent_lost)
        vol.record = vol.record.transition(observed="unmounted", cause=vol.intent_lost)
        self.bus.publish("volume_state_changed", {"id": vol.id, **vol.record.to_json()})

    def _get(self, volume_id: str) -> Volume:
        vol = self._vols.get(volume_id)
        if vol is None:
            if not VOLUME_ID.fullmatch(volume_id) or not self.paths.cipher(volume_id).exists():
                raise NotFound(f"no volume {volume_id!r}")
            vol = self._vols[volume_id] = Volume(volume_id, JournalRecord())
        return vol

    def _journal(self, vol: Volume, **change: Any) -> None:
        """Record a transition. While the intent is lost only a stated one is written: the
        missing journal (beside the kept-aside copy) is what says so across restarts."""
        if vol.intent_lost is not None:
            if change.get("desired") is None:
                change["cause"] = change.get("cause") or vol.intent_lost
                vol.record = vol.record.transition(**change)
                self.bus.publish("volume_state_changed",
                                 {"id": vol.id, **vol.record.to_json()})
                return
            vol.intent_lost = None
        vol.record = vol.record.transition(**change)
        journal.write(self.paths.journal(vol.id), vol.record)
        self.bus.publish("volume_state_changed", {"id": vol.id, **vol.record.to_json()})

    # ---------------------------------------------------------------------------------
    # where a volume lives: under the state dir, or on a storage pool
    # ---------------------------------------------------------------------------------
    def cipher_dir(self, volume_id: str) -> Path:
        vol = self._vols.get(volume_id)
        if vol is None or not vol.record.pool:
            return self.paths.cipher(volume_id)
        return self.paths.pool_cipher(vol.record.pool, volume_id)

    def _meta_path(self, volume_id: str) -> Path:
        return self.cipher_dir(volume_id) / "piccolo.volume.json"

    def pool_absent(self, volume_id: str) -> str | None:
        """Why the volume's pool cannot be reached now, or None (present, or no pool)."""
        vol = self._vols.get(volume_id)
        pool = vol.record.pool if vol is not None else ""
        if not pool:
            return None
        if self.pools is not None and self.pools.where(pool) is not None:
            return None
        name = self.pools.name(pool) if self.pools is not None else pool
        return f"volume {volume_id} is on pool {name}, which is not present"

    def pools_named(self) -> set[str]:
        """Every pool a volume's journal names (read from memory: no disk is touched)."""
        return {v.record.pool for v in self._vols.values() if v.record.pool}

    def on_pool(self, pool_id: str) -> builtins.list[str]:
        return sorted(v.id for v in self._vols.values() if v.record.pool == pool_id)

    async def pool_lost(self, pool_id: str, cause: str) -> builtins.list[str]:
        """The pool's disk went away: end its volumes' mounts at once (their backing is
        gone, so a drain would only serve errors), journal the loss, stop retrying until
        the pool is back. Returns the volumes that were attached."""
        ended = []
        for vid in self.on_pool(pool_id):
            vol = self._vols.get(vid)
            if vol is None:
                continue
            try:  # one volume's failure (a full state dir) never spares the others' mounts
                async with vol.lock:
                    self._cancel_retry(vol)
                    child, vol.child = vol.child, None
                    for proc in (child, vol.draining):
                        if proc is not None:
                            vol.expected_exit = True
                            await proc.kill()
                    vol.draining = None
                    if child is not None:
                        ended.append(vid)
                    await self._unmounted(vol)
                    if child is not None or vol.record.desired_state == "mounted":
                        self._journal(vol, observed="error", cause=cause)
            except Exception as exc:
                log.error("volume %s: ending it after its pool left failed: %s", vid,
                          _message(exc))
        return ended

    async def pool_back(self, pool_id: str) -> builtins.list[str]:
        """The pool is mounted again: re-attach its volumes whose intent is mounted (while
        unlocked; unlock does it otherwise). Returns those that failed."""
        if self.keys.locked:
            return []
        failed = []
        for vid in self.on_pool(pool_id):
            vol = self._vols.get(vid)
            if vol is None:
                continue
            if vol.intent_lost is not None or vol.record.desired_state != "mounted" \
                    or vol.child is not None:
                continue
            try:
                await self.attach(vid, self._resume_role(vol))
            except Exception as exc:
                failed.append(vid)
                log.error("volume %s: re-attach on pool %s failed: %s", vid, pool_id,
                          _message(exc))
                async with vol.lock:
                    if vol.child is None and self.pool_absent(vid) is None:
                        self._schedule_retry(vol)  # e.g. an earlier mount still drains
        return failed

    def _meta(self, vol: Volume) -> VolumeMeta:
        absent = self.pool_absent(vol.id)
        if absent is not None:
            raise PoolAbsent(absent)
        if vol.pool_meta is not None:
            return vol.pool_meta
        try:
            meta = VolumeMeta.parse(self._meta_path(vol.id).read_bytes())
            if vol.record.pool:
                # Read once: a dying disk must not be touched (or hang the loop) again
                # each time someone asks how the volume is.
                vol.pool_meta = meta
            return meta
        except FileNotFoundError:
            if self.cipher_dir(vol.id).exists():
                raise Failed(f"volume {vol.id} has a cipher dir but no piccolo.volume.json: "
                             "its key is missing") from None
            raise NotFound(f"no volume {vol.id!r}") from None
        except MetadataCorrupted as exc:
            raise Failed(f"volume {vol.id}: {exc}") from None
        except OSError as exc:
            raise Failed(f"volume {vol.id}: its key file cannot be read: "
                         f"{exc.strerror or exc}") from None

    def _problem(self, vol: Volume, mounts: dict[str, mountinfo.Mount] | None = None
                 ) -> str | None:
        """Why an attached volume is not really mounted, or None when it is."""
        child = vol.child
        if child is None:
            return None
        if child.exited.is_set():
            return f"mount process exited (code {child.returncode})"
        return child.problem(mounts)

    def info(self, volume_id: str, mounts: dict[str, mountinfo.Mount] | None = None
             ) -> dict[str, Any]:
        vol = self._get(volume_id)
        try:
            meta: VolumeMeta | None = self._meta(vol)
        except (Failed, NotFound, PoolAbsent):
            meta = None
        child = vol.child
        record = vol.record.to_json()
        problem = self._problem(vol, mounts)
        if problem is not None:  # reality wins over the journal until the watcher acts
            record.update(observed_state="error", needs_repair=True, last_error=problem)
        return {
            "id": vol.id,
            "class": meta.volume_class if meta else None,
            "cluster_mode": meta.cluster_mode if meta else None,
            "follower_policy": meta.follower_policy if meta else None,
            "cipher_dir": str(self.cipher_dir(vol.id)),
            "pool": vol.record.pool or None,
            "mountpoint": str(self.paths.mount(vol.id)),
            "attached": child is not None,
            "pid": child.pid if child else None,
            "read_only": child.read_only if child else None,
            "mountpoint_guarded": vol.guard_error is None,
            "token": vol.fence.token if vol.fence else None,
            **dict(zip(("leader_node", "term"), self.registry.leader(vol.id), strict=True)),
            **record,
        }

    def list(self) -> builtins.list[dict[str, Any]]:
        ids = set(self._vols)
        if self.paths.ciphertext_dir.exists():
            ids |= {p.name for p in self.paths.ciphertext_dir.iterdir()
                    if p.is_dir() and VOLUME_ID.fullmatch(p.name)}
        mounts = mountinfo.mounts()
        return [self.info(i, mounts) for i in sorted(ids)]

    @contextlib.asynccontextmanager
    async def exporting(self, volume_id: str) -> AsyncIterator[MountChild | None]:
        """Hold the volume's transitions while an export copies it. Yields its mount process
        when it is mounted writable (which then records and holds mutations), else None:
        then nothing can change the cipher dir until the block ends."""
        vol = self._get(volume_id)
        async with vol.lock:
            child = vol.child
            writable = (child is not None and not child.read_only
                        and not child.exited.is_set())
            yield child if writable else None

    async def fsck(self, volume_id: str) -> dict[str, Any]:
        """`piccolofs fsck` of the volume's ciphertext — every name, xattr, symlink and block
        authenticated — in a child given the key over a pipe. Read-only; while the volume
        serves writers, a file written meanwhile may be reported (check it detached or
        idle, e.g. after a restore)."""
        vol = self._get(volume_id)
        async with vol.lock:
            passphrase = self._meta(vol).unseal(self.keys.sdek())
            pass_r, pass_w = os.pipe()
            try:
                os.write(pass_w, bytes(passphrase) + b"\n")  # a pipe buffer holds it
            finally:
                passphrase[:] = bytes(len(passphrase))
                os.close(pass_w)
            cmd = [sys.executable, "-m", "piccolofs", "fsck", "--passfd", str(pass_r), "--",
                   str(self.cipher_dir(volume_id))]
            try:
                res = await trio.run_process(cmd, pass_fds=(pass_r,), capture_stdout=True,
                                             capture_stderr=True, check=False, cwd="/",
                                             stdin=subprocess.DEVNULL)
            finally:
                os.close(pass_r)
        problems = res.stdout.decode(errors="replace").splitlines()
        summary = res.stderr.decode(errors="replace").strip().splitlines()
        return {"id": volume_id, "ok": res.returncode == 0 and not problems,
                "problems": problems[:FSCK_MAX_LINES], "problem_count": len(problems),
                "summary": summary[-1] if summary else f"exit status {res.returncode}"}

    def reload(self) -> None:
        """Read the journals anew (the state dir was replaced by an import). Only with
        nothing attached; a draining mount process keeps its supervisor."""
        if self.attached():
            raise Conflict("volumes are still attached")
        for vol in self._vols.values():
            self._cancel_retry(vol)
        self._vols = {}
        self._load()

    def attached(self) -> builtins.list[str]:
        """Volumes mounted by a process of ours (not counting lazily detached ones that
        still serve files held open: they are no longer reachable by path)."""
        return sorted(v.id for v in self._vols.values() if v.child is not None)

    def is_attached(self, volume_id: str) -> bool:
        vol = self._vols.get(volume_id)
        return vol is not None and vol.child is not None

    def mounted(self, volume_id: str) -> bool:
        """Attached, and mountinfo shows our mount there: safe to use the mountpoint."""
        vol = self._vols.get(volume_id)
        return vol is not None and vol.child is not None and self._problem(vol) is None

    # ---------------------------------------------------------------------------------
    # ensure
    # ---------------------------------------------------------------------------------
    async def ensure(self, volume_id: str, volume_class: str = "application",
                     cluster_mode: str = "stateful",
                     follower_policy: str = "read_only",
                     pool: str | None = None) -> dict[str, Any]:
        """Create the volume if it does not exist. Idempotent; never re-initialises, never
        moves a volume. With `pool` its cipher dir goes on that storage pool."""
        if not isinstance(volume_id, str) or not VOLUME_ID.fullmatch(volume_id):
            raise InvalidInput("volume id must match [a-z0-9][a-z0-9._-]{0,62}")
        if volume_class not in CLASSES:
            raise InvalidInput(f"class must be one of {', '.join(CLASSES)}")
        if cluster_mode not in CLUSTER_MODES:
            raise InvalidInput(f"cluster_mode must be one of {', '.join(CLUSTER_MODES)}")
        if follower_policy not in FOLLOWER_POLICIES:
            raise InvalidInput(f"follower_policy must be one of {', '.join(FOLLOWER_POLICIES)}")
        vol = self._vols.get(volume_id) or Volume(volume_id, JournalRecord())
        async with vol.lock:
            self._vols.setdefault(volume_id, vol)
            here = vol.record.pool or None
            exists = here is not None or self.paths.cipher(volume_id).exists()
            if pool is not None and exists and pool != here:
                where = f"pool {self.pools.name(here) if self.pools else here}" if here \
                    else "the state dir"
                raise Conflict(f"volume {volume_id} already exists on {where}; volumes are "
                               "never moved")
            fresh = pool is not None and not exists
            if pool is not None and fresh:
                if self.pools is None or self.pools.where(pool) is None:
                    raise PoolAbsent(f"pool {pool} is not present")
                # The journal names the pool first: a crash before the volume is made
                # leaves an intent that the next ensure completes, never a stray tree.
                vol.record = replace(vol.record, pool=pool)
                self._journal(vol)
            if not self._meta_path(volume_id).exists():
                if self.cipher_dir(volume_id).exists():
                    self._meta(vol)  # raises the precise "key is missing" error
                absent = self.pool_absent(volume_id)
                if absent is not None:
                    raise PoolAbsent(absent)
                try:
                    await self._create(volume_id, volume_class, cluster_mode, follower_policy)
                except BaseException:
                    if fresh:  # nothing was made: no volume is left behind in the list
                        self._forget(vol)
                    raise
            if vol.child is None:
                await self._unmounted(vol)
            if not self.paths.journal(volume_id).exists() and vol.intent_lost is None:
                self._journal(vol)
        return self.info(volume_id)

    def _forget(self, vol: Volume) -> None:
        """Drop a volume whose creation failed before anything existed but its journal."""
        path = self.paths.journal(vol.id)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(OSError):
            path.parent.rmdir()
        self._vols.pop(vol.id, None)

    async def _create(self, volume_id: str, volume_class: str, cluster_mode: str,
                      follower_policy: str) -> None:
        """Initialise in a staging dir, seal the key beside it, then rename into place:
        a crash at any point leaves either nothing or a complete volume with its key."""
        sdek = self.keys.sdek()
        target = self.cipher_dir(volume_id)
        parent = target.parent
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in parent.glob(f".{volume_id}.init-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = parent / f".{volume_id}.init-{secrets.token_hex(4)}"
        passphrase = new_passphrase()
        try:
            await trio.to_thread.run_sync(
                init_tree, str(staging), passphrase, InitOptions(scrypt_log_n=self.scrypt_log_n))
            meta = VolumeMeta.seal(sdek, passphrase, volume_class, cluster_mode,
                                   follower_policy)
            write_atomic(staging / "piccolo.volume.json", meta.to_json(), 0o600)
            fsync_dir(staging)
            os.rename(staging, target)
            fsync_dir(parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("volume %s created (%s)", volume_id, volume_class)

    # ---------------------------------------------------------------------------------
    # attach / detach / role
    # ---------------------------------------------------------------------------------
    def _granted(self, volume_id: str, role: str) -> Volume:
        """The volume, if `role` is valid and (for leader) granted by the registry."""
        if role not in roles.ROLES:
            raise InvalidInput(f"role must be one of {', '.join(roles.ROLES)}")
        vol = self._get(volume_id)
        if role == roles.LEADER and not self.registry.may_lead(volume_id):
            raise NotLeader(f"leadership not granted for volume {volume_id}")
        return vol

    def _resume_role(self, vol: Volume) -> str:
        """The role to re-attach with: the journaled one, demoted if no longer granted."""
        role = vol.record.role if vol.record.role in roles.ROLES else roles.LEADER
        if role == roles.LEADER and not self.registry.may_lead(vol.id):
            role = roles.FOLLOWER
        return role

    async def attach(self, volume_id: str, role: str, passphrase: bytes | None = None
                     ) -> dict[str, Any]:
        """Mount with `role`; idempotent, and flips the gate live if already mounted.
        `passphrase` is the volume's own, when it comes from elsewhere than the SDEK (the
        TPM, for the bootstrap volume while locked). A leader's mount is fenced with the
        registry's current term (token and write lease) when leadership comes from a
        cluster."""
        vol = self._granted(volume_id, role)
        if volume_id == BOOTSTRAP and role != roles.LEADER:
            raise Conflict("the bootstrap volume is always attached as leader")
        async with vol.lock:
            self._cancel_retry(vol)
            await self._attach_locked(vol, role, passphrase)
        return self.info(volume_id)

    async def _attach_locked(self, vol: Volume, role: str, given: bytes | None = None
                             ) -> None:
        meta = self._meta(vol)
        problem = self._problem(vol)
        if problem is not None:
            await self._lost(vol, problem)
        if vol.id not in CORE and meta.cluster_mode == "stateful" and not self.keys.locked:
            self.registry.track(vol.id)  # serving it (even detached as a follower): a candidate
        vol.fence = None
        if role == roles.LEADER:
            # Checked again under the volume's lock: the term may have ended while we
            # waited for it, and a leader's mount in a cluster never runs unfenced.
            vol.fence = self.registry.fence(vol.id)
            if not self.registry.may_lead(vol.id) or \
                    (self.registry.fenced and vol.id not in CORE and vol.fence is None):
                raise NotLeader(f"leadership not granted for volume {vol.id}")
        if vol.child is not None:
            child_token = vol.child.fence.token if vol.child.fence else None
            if vol.child.read_only != (role == roles.FOLLOWER) or \
                    (vol.fence is not None and child_token != vol.fence.token):
                await vol.child.set_role(role, vol.fence)
            r = vol.record
            if (r.desired_state, r.observed_state, r.role) != ("mounted", "mounted", role) \
                    or r.needs_repair:
                self._journal(vol, desired="mounted", observed="mounted", role=role)
            return
        if role == roles.FOLLOWER and meta.follower_policy == "detached":
            self._journal(vol, desired="mounted", observed="unmounted", role=role)
            return
        if vol.draining is not None and vol.draining.draining:
            raise Busy(f"volume {vol.id}: the previous mount still serves open files; "
                       "attach again once they are closed")
        cipher = self.cipher_dir(vol.id)
        try:  # off the event loop: on a pool, this is the first read of a disk that may hang
            await trio.to_thread.run_sync(load_config, str(cipher), abandon_on_cancel=True)
        except (FormatError, CipherDirError) as exc:
            self._journal(vol, desired="mounted", observed="error", role=role, cause=str(exc))
            raise StateCorrupt(conf_path(str(cipher)), str(exc)) from None
        except OSError as exc:
            cause = f"{conf_path(str(cipher))} cannot be read: {exc.strerror or exc}"
            self._journal(vol, desired="mounted", observed="error", role=role, cause=cause)
            raise Failed(f"volume {vol.id}: {cause}") from None
        try:
            passphrase = bytearray(given) if given is not None else meta.unseal(self.keys.sdek())
        except MetadataCorrupted as exc:
            self._journal(vol, desired="mounted", observed="error", role=role, cause=str(exc))
            raise StateCorrupt(self._meta_path(vol.id), str(exc)) from None
        await self._unmounted(vol)
        if given is None and self.keys.locked:  # locked meanwhile: nothing mounts now
            passphrase[:] = bytes(len(passphrase))
            raise Locked("locked: unlock first")
        self._journal(vol, desired="mounted", observed="pending", role=role)
        child = MountChild(vol.id, cipher, self.paths.mount(vol.id),
                           read_only=role == roles.FOLLOWER,
                           on_event=lambda msg: self._child_event(vol, msg),
                           fence=vol.fence if role == roles.LEADER else None)
        vol.child, vol.expected_exit = child, False
        assert self._nursery is not None
        try:
            await self._nursery.start(self._supervise, vol, child, bytes(passphrase))
        except BaseException as exc:
            # Whatever went wrong (the child's own error, a timeout, cancellation), the
            # volume is not mounted and must not say so.
            vol.child = None
            self._journal(vol, observed="error", cause=_message(exc))
            with trio.CancelScope(shield=True):
                await self._unmounted(vol)
            raise
        finally:
            passphrase[:] = bytes(len(passphrase))
        self._journal(vol, observed="mounted", role=role)

    def _child_event(self, vol: Volume, msg: dict[str, Any]) -> None:
        if msg.get("event") == "integrity":
            log.warning("volume %s: integrity failure inode %s block %s", vol.id,
                        msg.get("inode"), msg.get("block"))
        elif msg.get("event") == "lease_expired" and vol.child is not None:
            # The mount stopped writing by its own clock: it is a follower now, whatever
            # the registry will say.
            log.warning("volume %s: the write lease of term %s ran out; read-only", vol.id,
                        msg.get("token"))
            vol.child.read_only, vol.child.fence, vol.fence = True, None, None
            assert self._nursery is not None
            self._nursery.start_soon(self._note_demotion, vol)

    async def _note_demotion(self, vol: Volume) -> None:
        """Journal the demotion. If the term is in fact still held (an extension arrived
        too late), promote again with the term's current lease: leadership must not stay
        with a node whose mount cannot write."""
        async with vol.lock:
            if vol.child is not None and vol.record.role != roles.FOLLOWER:
                self._journal(vol, role=roles.FOLLOWER)
            if vol.child is not None and self.registry.may_lead(vol.id) \
                    and not self.keys.locked:
                try:
                    await self._attach_locked(vol, roles.LEADER)
                except CtlError as exc:
                    log.warning("volume %s: re-promotion failed: %s", vol.id, exc.message)

    async def renew(self, volume_id: str, fence: Fence) -> bool:
        """Extend a leader's write lease after a renewal of its term; False when the
        mount refuses (its lease already ran out, or another term)."""
        vol = self._vols.get(volume_id)
        child = vol.child if vol is not None else None
        fence = self.registry.fence(volume_id) or fence  # the term as it stands right now
        if vol is None or child is None or child.read_only or vol.fence is None \
                or vol.fence.token != fence.token or not self.registry.may_lead(volume_id):
            return False
        try:
            await child.extend_lease(fence)
        except Failed as exc:
            log.warning("volume %s: lease not renewed: %s", volume_id, exc.message)
            return False
        vol.fence = fence
        return True

    async def _supervise(self, vol: Volume, child: MountChild, passphrase: bytes, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
        code = await child.run(passphrase, task_status=task_status)
        if vol.child is not child or vol.expected_exit:
            return
        async with vol.lock:
            if vol.child is not child:
                return
            vol.child = None
            log.error("volume %s: mount process %s exited unexpectedly (code %s)", vol.id,
                      child.pid, code)
            # Journaled in the step that drops the child: once it is gone, only the
            # journal speaks for the volume, and it must not say mounted meanwhile.
            self._journal(vol, observed="error",
                          cause=f"mount process exited unexpectedly (code {code})")
            await self._unmounted(vol)
            if vol.record.desired_state == "mounted":
                self._schedule_retry(vol)

    async def _lost(self, vol: Volume, problem: str) -> None:
        """The mount went away (or was replaced) under a live child: let the child finish
        serving what it still holds (read-only), clear the path, and re-attach if that is the
        intent."""
        child = vol.child
        log.error("volume %s: %s", vol.id, problem)
        vol.child = None
        self._journal(vol, observed="error", cause=problem)  # as in _supervise: at once
        if child is not None and child.draining:
            # It may go on serving files opened before the loss, but never writing beside
            # the mount that replaces it: fence it read-only, or end it.
            try:
                await child.set_role(roles.FOLLOWER)
            except Failed:
                await child.kill()
        await self._unmounted(vol)
        if vol.record.desired_state == "mounted":
            self._schedule_retry(vol)

    async def _watch(self) -> None:
        """Compare every attached volume with mountinfo, every WATCH_INTERVAL seconds."""
        while True:
            await trio.sleep(WATCH_INTERVAL)
            mounts = mountinfo.mounts()
            for vol in builtins.list(self._vols.values()):
                child = vol.child
                if child is None or child.exited.is_set() or vol.lock.locked():
                    continue  # dead children are the supervisor's; busy ones re-check
                if child.problem(mounts) is None:
                    continue
                async with vol.lock:
                    problem = self._problem(vol)
                    if problem is not None and vol.child is child:
                        await self._lost(vol, problem)

    def _schedule_retry(self, vol: Volume) -> None:
        assert self._nursery is not None
        self._cancel_retry(vol)
        scope = trio.CancelScope()
        vol.retry = scope
        self._nursery.start_soon(self._retry, vol, scope)

    def _cancel_retry(self, vol: Volume) -> None:
        if vol.retry is not None:
            vol.retry.cancel()
            vol.retry = None

    async def _retry(self, vol: Volume, scope: trio.CancelScope) -> None:
        with scope:
            for delay in (*RETRY_DELAYS, *[RETRY_DELAYS[-1]] * 1000):
                await trio.sleep(delay)
                async with vol.lock:
                    if vol.retry is not scope or vol.child is not None \
                            or vol.record.desired_state != "mounted":
                        return
                    if self.keys.locked:
                        self._journal(vol, observed="pending", cause="locked")
                        return
                    if self.pool_absent(vol.id) is not None:
                        vol.retry = None
                        return  # the pool's return re-attaches it (pool_back)
                    try:
                        await self._attach_locked(vol, self._resume_role(vol))
                        vol.retry = None
                        return
                    except Exception as exc:
                        log.warning("volume %s: re-attach failed: %s", vol.id, exc)

    async def _unmounted(self, vol: Volume) -> None:
        """Make the mountpoint bare and guarded: a stale mount there is ended (its FUSE
        connection aborted first, so nothing can hang on it) and detached."""
        mnt = self.paths.mount(vol.id)
        await clear_mount(mnt)
        try:
            stray = await trio.to_thread.run_sync(mountpoint.guard, mnt)
            vol.guard_error = None
        except OSError as exc:
            if vol.guard_error is None:
                log.warning("volume %s: the mountpoint cannot refuse writes while unmounted: "
                            "%s", vol.id, exc)
            vol.guard_error = str(exc)
            return
        if stray:
            log.warning("volume %s: %d entries were written into the bare mountpoint %s "
                        "before it was guarded; they are hidden while mounted", vol.id,
                        len(stray), mnt)

    async def sweep(self) -> None:
        """At start: no mount under mounts/ is ours yet. End and detach every one (the
        previous daemon's orphans, dead or alive) and guard every mountpoint."""
        for m in mountinfo.under(self.paths.mounts_dir):
            log.warning("clearing a mount left at %s (%s)", m.mountpoint, m.fstype)
            await clear_mount(Path(m.mountpoint))
        if self.paths.mounts_dir.exists():
            # scandir's file types come from readdir: no stat of a (possibly dead) mount.
            with os.scandir(self.paths.mounts_dir) as entries:
                names = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
            for name in names:
                if VOLUME_ID.fullmatch(name) and not mountinfo.is_mounted(self.paths.mount(name)):
                    await self._unmounted(self._vols.get(name) or Volume(name, JournalRecord()))

    async def detach(self, volume_id: str, lazy: bool = False,
                     keep_intent: bool = False, candidate: bool = False) -> dict[str, Any]:
        """Unmount. Busy (409) if files are open, unless `lazy`. With `keep_intent` the
        desired state stays as it was (lock, shutdown), otherwise it becomes unmounted."""
        vol = self._get(volume_id)
        if volume_id in CORE and not keep_intent:
            raise Conflict(f"the {volume_id} volume is attached at unlock and detached at "
                           "lock: lock instead")
        async with vol.lock:
            self._cancel_retry(vol)
            desired = vol.record.desired_state if keep_intent else "unmounted"
            child = vol.child
            if not candidate:  # a follower detached by its policy still campaigns
                self.registry.untrack(vol.id)
            if child is None:
                await self._unmounted(vol)
                r = vol.record
                if (r.desired_state, r.observed_state) != (desired, "unmounted") \
                        or r.needs_repair:
                    self._journal(vol, desired=desired, observed="unmounted")
                return self.info(volume_id)
            vol.expected_exit = True
            try:
                await child.unmount(lazy)
            except BaseException:
                vol.expected_exit = False
                raise
            vol.child = None
            vol.draining = child if child.draining else None
            await self._unmounted(vol)
            self._journal(vol, desired=desired, observed="unmounted")
        return self.info(volume_id)

    async def set_role(self, volume_id: str, role: str) -> dict[str, Any]:
        """Change a volume's role: live on a mounted volume, recorded otherwise."""
        if volume_id in CORE:
            raise Conflict(f"the {volume_id} volume's role follows the leadership registry")
        vol = self._granted(volume_id, role)
        if vol.record.desired_state == "mounted":
            return await self.attach(volume_id, role)
        async with vol.lock:
            if vol.record.role != role:
                self._journal(vol, role=role)
        return self.info(volume_id)

    async def _follow_roles(self, sub: Any) -> None:
        async for event in sub:
            resource, role = event.data.get("resource"), event.data.get("role")
            vol = self._vols.get(resource) if isinstance(resource, str) else None
            if vol is None or vol.record.desired_state != "mounted" or vol.intent_lost \
                    or self.keys.locked:
                continue  # a locked node serves nothing: there is nothing to flip
            if role == roles.FOLLOWER and vol.child is None:
                continue  # not mounted (detached, being locked): nothing to demote
            try:
                if role == roles.FOLLOWER:
                    meta = self._meta(vol)
                    if meta.follower_policy == "detached":
                        await self.detach(vol.id, lazy=True, keep_intent=True, candidate=True)
                        async with vol.lock:
                            self._journal(vol, role=roles.FOLLOWER)
                    else:
                        await self.attach(vol.id, roles.FOLLOWER)
                elif role == roles.LEADER and not self.keys.locked:
                    await self.attach(vol.id, roles.LEADER)
            except Exception as exc:
                log.error("volume %s: role change to %s failed: %s", vol.id, role, exc)

    # ---------------------------------------------------------------------------------
    # reconcile, shutdown
    # ---------------------------------------------------------------------------------
    async def reconcile(self, only: set[str] | None = None) -> builtins.list[str]:
        """Bring every volume's reality in line with its journal; returns the volumes it
        could not fix. One broken volume never stops the others."""
        problems = []
        for vid in sorted(self._vols):
            if only is not None and vid not in only:
                continue
            vol = self._vols[vid]
            if vol.intent_lost is not None:
                problems.append(vid)
                continue
            try:
                await self._reconcile_one(vol)
            except Exception as exc:
                problems.append(vid)
                log.error("volume %s: reconcile failed: %s", vid, exc)
                async with vol.lock:
                    if vol.child is None:
                        self._journal(vol, observed="error", cause=str(exc))
        return problems

    async def _reconcile_one(self, vol: Volume) -> None:
        r = vol.record
        if vol.child is None:
            # Anything mounted there is not ours (we cannot supervise it): clear it.
            await self._unmounted(vol)
        if r.desired_state == "mounted":
            if vol.child is not None:
                if r.observed_state != "mounted" or r.needs_repair:
                    async with vol.lock:
                        self._journal(vol, observed="mounted")
                return
            if self.keys.locked:
                if r.observed_state != "pending" or r.last_error != "locked":
                    async with vol.lock:
                        self._journal(vol, observed="pending", cause="locked")
                return
            await self.attach(vol.id, self._resume_role(vol))
        elif vol.id not in CORE:  # core volumes come and go with unlock and lock
            await self.detach(vol.id, lazy=True)

    async def detach_all(self, keep: frozenset[str] = frozenset(), lazy: bool = True) -> None:
        for vid in sorted(self._vols, reverse=True):
            if vid in keep or self._vols[vid].child is None:
                continue
            try:
                await self.detach(vid, lazy=lazy, keep_intent=True)
            except Exception as exc:
                log.error("volume %s: detach failed: %s", vid, exc)


async def clear_mount(mnt: Path) -> None:
    """Detach whatever is mounted at `mnt`, never waiting on it: a FUSE mount's connection
    is aborted first, so a dead or frozen mount process cannot hang us."""
    m = mountinfo.find(mnt)
    if m is None:
        return
    if m.is_fuse:
        await trio.to_thread.run_sync(mountinfo.abort, m)
    await trio.run_process(["fusermount3" if m.is_fuse else "umount", "-uz" if m.is_fuse
                            else "-l", str(mnt)], check=False, capture_stdout=True,
                           capture_stderr=True)
    if mountinfo.is_mounted(mnt):
        raise Failed(f"{mnt}: cannot detach the {m.fstype} mount there")
