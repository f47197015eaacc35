"""The device manager: storage pools follow their disks, whatever way the disks come and go.

One rule drives everything: **reconcile** what udev says is plugged in with what we have
mounted. Start-up (coldplug), every udev event, a periodic rescan (udev events can be lost:
a monitor's buffer overflows) and `device init` all call the same `reconcile`, so an event
seen twice, or late, changes nothing.

- A pool device present and not mounted: check its filesystem, mount it (`nosuid,nodev,
  noexec`) under `$PICCOLO_RUN_DIR/pools/<pool-id>`, check the marker, then attach its
  volumes whose intent is mounted (while unlocked, with the role the registry grants).
  Only pools this device knows (made or adopted by `device init`, remembered, or named by a
  volume's journal) are mounted by themselves: another box's pool is listed as `foreign`
  until `device init` adopts it. A stranger's disk is never mounted just for being plugged
  in.
- A mounted pool whose device is gone, is another instance (a re-plug that happened
  between two looks), or whose mount vanished: end its volumes' mounts (journal: error,
  needs_repair, "device removed"), unmount the filesystem lazily, guard the mountpoint.
- A pool ejected by the operator stays unmounted while that same disk stays plugged in.

Every pool seen is remembered in `devices/pools.json` so `device list` names it while its
disk is away.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyudev
import trio

from ctl.devices import blockdev, fs, health, marker
from ctl.devices.blockdev import BlockDevice
from ctl.devices.health import Thresholds
from ctl.devices.monitor import watch
from ctl.errors import Busy, Conflict, CtlError, Failed, InvalidInput, NotFound
from ctl.events import EventBus, utc_now
from ctl.paths import Paths
from ctl.volumes import mountinfo, mountpoint
from ctl.volumes.manager import VolumeManager
from piccolofs.atomic import write_atomic

log = logging.getLogger("ctl.devices")

RESCAN_INTERVAL = 30.0
HEALTH_INTERVAL = 300.0
REMOVED = "device removed"
# "arriving": being checked and mounted, without holding up other disks' events;
# "leaving": its volumes are being ended (removal, eject); no volume may attach meanwhile;
# "foreign": a pool this device does not know is plugged in; `device init` adopts it.
STATES = ("mounted", "arriving", "leaving", "absent", "ejected", "error", "foreign")
COLDPLUG_WAIT = 60.0  # start-up waits this long for the pools present to be mounted


@dataclass(eq=False)
class Pool:
    id: str
    label: str = ""
    fs_type: str = ""
    state: str = "absent"
    error: str = ""
    device: BlockDevice | None = None  # the disk it is mounted from
    last_device: dict[str, Any] = field(default_factory=dict)
    last_seen: str = ""
    # The plugged-in instance (DISKSEQ) that was ejected, or whose mount failed: left
    # alone until it leaves, so that events about it do not mount it again and again.
    left_alone: str | None = None
    health: dict[str, Any] | None = None
    held_by_drain: str | None = None  # after a lazy eject: the node, until it is let go
    arriving: BlockDevice | None = None  # the disk being mounted (state "arriving")
    arrived: trio.Event = field(default_factory=trio.Event)
    # One arrival at a time per pool: a disk that left mid-check and came back waits for
    # the first arrival to finish (and undo its mount) before its own starts.
    arrival_lock: trio.Lock = field(default_factory=trio.Lock)

    def remembered(self) -> dict[str, Any]:
        return {"label": self.label, "fs_type": self.fs_type, "last_seen": self.last_seen,
                "last_device": self.last_device}


class DeviceManager:
    def __init__(self, paths: Paths, volumes: VolumeManager, bus: EventBus,
                 health_interval: float = HEALTH_INTERVAL,
                 rescan_interval: float = RESCAN_INTERVAL,
                 thresholds: Thresholds | None = None) -> None:
        self.paths = paths
        self.volumes = volumes
        self.bus = bus
        self.health_interval = health_interval
        self.rescan_interval = rescan_interval
        self.thresholds = thresholds or Thresholds()
        self._pools: dict[str, Pool] = {}
        self._foreign: dict[str, BlockDevice] = {}  # other boxes' pools, plugged in here
        self._lock = trio.Lock()
        self._health_now = trio.Event()
        self.hotplug = "starting"  # or "udev", or why hotplug is not available
        self.reconciles = 0  # completed passes: a client can wait for the next one
        self._nursery: trio.Nursery | None = None  # where arrivals run
        volumes.pools = self
        self._load()

    # ---------------------------------------------------------------------------------
    # the Pools protocol of ctl.volumes
    # ---------------------------------------------------------------------------------
    def where(self, pool_id: str) -> Path | None:
        pool = self._pools.get(pool_id)
        if pool is None or pool.state != "mounted":
            return None
        where = self.paths.pool_mount(pool_id)
        return where if mountinfo.is_mounted(where) else None

    def name(self, pool_id: str) -> str:
        pool = self._pools.get(pool_id)
        return f"{pool.label} ({pool_id})" if pool is not None and pool.label else pool_id

    # ---------------------------------------------------------------------------------
    # lifecycle
    # ---------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Coldplug, then follow udev until cancelled; pools are unmounted on the way out
        (their volumes were detached before)."""
        self._remember_known()
        await self._sweep()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._reconcile_safely()
                with trio.move_on_after(COLDPLUG_WAIT):  # a long fsck goes on after start
                    for pool in builtins.list(self._pools.values()):
                        if pool.state == "arriving":
                            await pool.arrived.wait()
                nursery.start_soon(self._follow_udev)
                nursery.start_soon(self._rescan)
                nursery.start_soon(self._watch_health)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                for m in mountinfo.under(self.paths.pools_dir):
                    try:  # written back and let go of before the daemon says it stopped
                        await fs.unmount(Path(m.mountpoint), lazy=False)
                    except CtlError as exc:
                        log.warning("%s; unmounting it lazily", exc.message)
                        await self._unmount_quietly(Path(m.mountpoint))

    async def _follow_udev(self) -> None:
        async with contextlib.aclosing(watch(pyudev.Context(), on_ready=self._udev_ready)
                                       ) as batches:
            async for batch in batches:
                if batch is None:
                    log.warning("udev events were lost; rescanning every block device")
                await self._reconcile_safely()

    def _udev_ready(self) -> None:
        self.hotplug = "udev" if blockdev.udev_running() else \
            "udev is not running: pools are found by the periodic rescan"
        if self.hotplug != "udev":
            log.warning("%s", self.hotplug)

    async def _rescan(self) -> None:
        while True:
            await trio.sleep(self.rescan_interval)
            await self._reconcile_safely()

    async def _reconcile_safely(self) -> None:
        """A pass that fails (a disk answering errors, a full state dir) is logged and the
        next event or rescan tries again: it never ends the daemon."""
        try:
            await self.reconcile()
        except Exception:
            log.exception("reconciling storage pools failed; trying again at the next event")

    async def _sweep(self) -> None:
        """Pool mounts an earlier daemon left: unmounted, so each is mounted afresh (and
        checked) by the coldplug that follows. The volumes' own sweep has ended whatever
        mount process used them."""
        for m in mountinfo.under(self.paths.pools_dir):
            log.warning("unmounting the pool %s left mounted at %s", m.source, m.mountpoint)
            try:
                await fs.unmount(Path(m.mountpoint), lazy=True)
            except Failed as exc:
                log.error("%s", exc.message)

    # ---------------------------------------------------------------------------------
    # reconcile
    # ---------------------------------------------------------------------------------
    async def reconcile(self) -> None:
        async with self._lock:
            try:
                await self._reconcile()
            finally:
                self.reconciles += 1

    async def _reconcile(self) -> None:
        # A context per pass: libudev contexts must not be shared between threads.
        devices = await trio.to_thread.run_sync(lambda: blockdev.scan(pyudev.Context()))
        carriers: dict[str, list[BlockDevice]] = {}
        self._remember_known()
        foreign: dict[str, BlockDevice] = {}
        for found in devices:
            if not found.is_pool:
                continue
            if found.pool_id in self._pools:
                carriers.setdefault(found.pool_id, []).append(found)
            else:
                foreign.setdefault(found.pool_id, found)
        for pool_id in sorted(foreign.keys() - self._foreign.keys()):
            log.info("a pool this device does not know is plugged in: %s on %s (device init "
                     "adopts it)", pool_id, foreign[pool_id].node)
        self._foreign = foreign
        present: dict[str, BlockDevice] = {}
        for pool_id, devs in carriers.items():
            known = self._pools.get(pool_id)
            mine = [d for d in devs if known is not None and known.device is not None
                    and d.instance == known.device.instance and d.node == known.device.node]
            if mine:
                present[pool_id] = mine[0]  # a clone plugged in beside it changes nothing
            elif len(devs) == 1:
                present[pool_id] = devs[0]
            elif known is None or known.error != _clones(devs):
                pool = self._pools.setdefault(pool_id, Pool(pool_id))
                pool.state, pool.error = "error", _clones(devs)
                log.error("pool %s: %s", pool_id, pool.error)
                self._publish("added", pool, devs[0])
        mounts = mountinfo.mounts()
        for pool in builtins.list(self._pools.values()):
            dev = present.get(pool.id)
            if pool.state == "mounted":
                assert pool.device is not None
                gone = (dev is None or dev.instance != pool.device.instance
                        or dev.node != pool.device.node)
                lost_mount = str(self.paths.pool_mount(pool.id)) not in mounts
                if gone or lost_mount:
                    await self._lose(pool, REMOVED if gone else
                                     "the pool's filesystem was unmounted behind the daemon")
                elif dev is not None and dev.size_bytes != pool.device.size_bytes:
                    pool.device = dev
                    self._publish("changed", pool)
            elif pool.state == "arriving":
                if dev is None or pool.arriving is None or \
                        dev.instance != pool.arriving.instance:
                    pool.state, pool.arriving = "absent", None  # its arrival is undone
            elif pool.left_alone is not None and (dev is None
                                                  or dev.instance != pool.left_alone):
                pool.left_alone = None  # that disk left: the next one is a new plug
                if pool.state == "ejected":
                    pool.state = "absent"
        for pool_id, plugged in sorted(present.items()):
            known = self._pools.get(pool_id)
            if known is not None and (known.state in ("mounted", "arriving", "leaving")
                                      or known.left_alone == plugged.instance):
                continue
            pool = self._pools.setdefault(pool_id, Pool(pool_id))
            pool.state, pool.arriving, pool.arrived = "arriving", plugged, trio.Event()
            assert self._nursery is not None
            self._nursery.start_soon(self._arrive, pool, plugged)
        for pool_id, known in self._pools.items():
            if pool_id not in carriers and known.state == "error":
                known.state = "absent"  # the disk in error left

    async def _arrive(self, pool: Pool, dev: BlockDevice) -> None:
        """Check and mount a disk that appeared, then attach its volumes. The slow part (a
        filesystem check may take minutes) runs without the manager's lock, so another
        disk's removal is handled meanwhile; if this disk leaves before it is done, the
        reconcile marks it absent and the mount is undone here."""
        arrived = pool.arrived
        try:
            async with pool.arrival_lock:
                await self._mount_arrival(pool, dev)
        except Exception:
            log.exception("pool %s on %s: mounting it failed", pool.id, dev.node)
            async with self._lock:
                if pool.state == "arriving" and pool.arriving is dev:
                    pool.state, pool.error, pool.arriving = "error", "internal error", None
                    pool.left_alone = dev.instance
        finally:
            arrived.set()
        if pool.state == "mounted" and pool.device is dev:
            try:
                failed = await self.volumes.pool_back(pool.id)
            except Exception:
                log.exception("pool %s: re-attaching its volumes failed", pool.id)
                return
            if failed:
                log.error("pool %s: volumes not re-attached: %s", pool.id, ", ".join(failed))

    async def _mount_arrival(self, pool: Pool, dev: BlockDevice) -> None:
        where = self.paths.pool_mount(pool.id)
        mounted = False
        problem: str | None = None
        mark: marker.Marker | None = None
        try:
            if mountinfo.is_mounted(where):
                await fs.unmount(where, lazy=True)
            await trio.to_thread.run_sync(_bare, where)
            await fs.check(dev.fs_type, dev.node)
            await fs.mount(dev.fs_type, dev.node, where)
            mounted = True
            mark = await trio.to_thread.run_sync(marker.read, where, dev.fs_uuid,
                                                 abandon_on_cancel=True)
        except (CtlError, marker.MarkerError, OSError) as exc:
            problem = exc.message if isinstance(exc, CtlError) else str(exc)
        except BaseException:  # cancelled (shutdown): nothing half-mounted stays
            with trio.CancelScope(shield=True):
                if mounted:
                    await self._unmount_quietly(where)
            raise
        async with self._lock:
            if pool.state != "arriving" or pool.arriving is not dev:
                log.warning("pool %s: %s left while it was being mounted", pool.id, dev.node)
                if mounted and _mounted_from(where, dev):
                    await self._unmount_quietly(where)
                return
            pool.arriving = None
            if problem is not None or mark is None:
                log.error("pool %s on %s: %s", pool.id, dev.node, problem)
                if mounted:
                    await self._unmount_quietly(where)
                pool.state, pool.error, pool.left_alone = "error", problem or "", dev.instance
                pool.device = None
                pool.last_device = dev.describe()
                self._publish("added", pool, dev)
                return
            pool.label, pool.fs_type = mark.label, mark.fs_type
            pool.state, pool.error, pool.device, pool.left_alone = "mounted", "", dev, None
            pool.held_by_drain = None
            pool.last_device, pool.last_seen = dev.describe(), utc_now()
            try:
                await trio.to_thread.run_sync(self._save)
            except OSError as exc:  # the pool is mounted all the same; remembered next time
                log.warning("cannot record the pool in %s: %s", self.paths.pools_file, exc)
            log.info("pool %s (%s) mounted from %s", pool.label, pool.id, dev.node)
            self._publish("added", pool)
            self._health_now.set()

    async def _lose(self, pool: Pool, cause: str) -> None:
        pool.state = "leaving"  # from here on no volume of it attaches
        dev = pool.device
        try:
            ended = await self.volumes.pool_lost(pool.id, cause)
            log.warning("pool %s: %s; volumes ended: %s", pool.id, cause,
                        ", ".join(ended) or "none")
        finally:  # whatever failed, the dead disk's mount goes and the pool can come back
            with trio.CancelScope(shield=True):
                await self._unmount_quietly(self.paths.pool_mount(pool.id))
            pool.state, pool.error, pool.device = "absent", cause, None
            self._publish("removed", pool, dev)

    async def _unmount_quietly(self, where: Path) -> None:
        try:
            await fs.unmount(where, lazy=True)
        except Failed as exc:
            log.error("%s", exc.message)
        await trio.to_thread.run_sync(_bare, where)

    async def _release(self, pool: Pool, lazy: bool) -> None:
        """Unmount a pool whose volumes are detached."""
        where = self.paths.pool_mount(pool.id)
        try:
            await fs.unmount(where, lazy=lazy)
        except Failed as exc:
            if "busy" in exc.message.lower():
                raise Busy(f"pool {self.name(pool.id)}: {exc.message}; eject with lazy to "
                           "detach it anyway") from None
            raise
        await trio.to_thread.run_sync(_bare, where)

    # ---------------------------------------------------------------------------------
    # operator actions
    # ---------------------------------------------------------------------------------
    async def init(self, node: str, label: str, fs_type: str, erase: bool) -> dict[str, Any]:
        """Make `node` a pool, or adopt the pool already on it. Refuses a device in use or
        holding / or the state dir, always; one holding data (a partition table, a
        filesystem) unless `erase`."""
        if not marker.LABEL.fullmatch(label):
            raise InvalidInput("label must be 1-12 of a-z 0-9 . _ - (starting with a "
                               "letter or digit)")
        if fs_type not in marker.FS_TYPES:
            raise InvalidInput(f"fs must be one of {', '.join(marker.FS_TYPES)}")
        if not shutil.which(f"mkfs.{fs_type}"):
            raise Failed(f"mkfs.{fs_type} is not installed on this machine")
        async with self._lock:
            dev = await self._lookup(node)
            ours = [p for p in self._pools.values() if p.state == "mounted"
                    and p.device is not None and p.device.devnum == dev.devnum]
            if ours:
                return self.show(ours[0].id)  # already a pool of this daemon: as it is
            coming = [p for p in self._pools.values() if p.state == "arriving"
                      and p.arriving is not None and p.arriving.devnum == dev.devnum]
        if coming:  # being mounted right now: its result is the answer
            with trio.move_on_after(fs.CHECK_TIMEOUT + fs.MOUNT_TIMEOUT):
                await coming[0].arrived.wait()
            return self.show(coming[0].id)
        async with self._lock:
            refusals = await trio.to_thread.run_sync(
                lambda: blockdev.in_use(dev) + blockdev.holds_system(dev, self.paths.state))
            if refusals:
                raise Conflict(f"{node}: {'; '.join(refusals)}; nothing was changed")
            try:
                found = await trio.to_thread.run_sync(blockdev.signatures, dev.node)
            except OSError as exc:
                raise Failed(str(exc)) from None
            pool_id = await self._adoptable(dev, found)
            if pool_id is not None:
                self._pools.setdefault(pool_id, Pool(pool_id))  # known from now on
            if pool_id is None:
                if found and not erase:
                    what = ", ".join(f"{s.get('type')}" + (f" '{s['label']}'" if s.get("label")
                                                           else "") for s in found)
                    raise Conflict(f"{node} holds {what}; nothing was changed: pass --yes "
                                   "(yes=true) to erase it")
                # The device checked must be the one formatted: a disk swapped in under
                # the same name meanwhile is refused.
                again = await self._lookup(node)
                if (again.devnum, again.instance) != (dev.devnum, dev.instance):
                    raise Conflict(f"{node} changed while it was checked; nothing was changed")
                pool_id = marker.new_pool_id()
                await fs.make(fs_type, dev.node, pool_id, label)
                await self._write_marker(dev.node, marker.Marker.new(pool_id, label, fs_type))
                self._pools.setdefault(pool_id, Pool(pool_id))
                log.info("pool %s (%s) made on %s", label, pool_id, dev.node)
            if blockdev.udev_running():
                await fs.settle(dev.node)
            known = self._pools.get(pool_id)
            if known is not None and known.state != "mounted":
                known.left_alone = None  # asked for by name: mount it again
            await self._reconcile()
        pool = self._pools.get(pool_id)
        if pool is not None and pool.state == "arriving":
            with trio.move_on_after(fs.CHECK_TIMEOUT + fs.MOUNT_TIMEOUT):
                await pool.arrived.wait()
        result = self.show(pool_id)
        if result["state"] != "mounted":
            raise Failed(f"{node}: the pool {pool_id} was made but cannot be used: "
                         f"{result['error'] or result['state']}")
        return result

    async def _lookup(self, node: str) -> BlockDevice:
        try:
            return await trio.to_thread.run_sync(
                lambda: blockdev.lookup(pyudev.Context(), node))
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None

    async def _adoptable(self, dev: BlockDevice, found: list[dict[str, Any]]) -> str | None:
        """The pool id, when the device holds exactly one pool filesystem with its marker.
        A pool that cannot be read is never taken for foreign data: refused, even with
        --yes (its volumes would be lost), so erasing it is a deliberate act elsewhere."""
        pool_sigs = [s for s in found if marker.is_pool_uuid(str(s.get("uuid")))]
        if not pool_sigs:
            return None
        fs_uuid = str(pool_sigs[0]["uuid"]).lower()
        if len(found) != 1 or found[0].get("type") not in marker.FS_TYPES:
            raise Conflict(f"{dev.node} holds Piccolo pool {fs_uuid} beside other data; "
                           "nothing was changed")
        where = self.paths.pools_dir / f".probe-{secrets.token_hex(4)}"
        try:
            await trio.to_thread.run_sync(lambda: where.mkdir(mode=0o700, parents=True))
            await fs.mount(str(found[0]["type"]), dev.node, where)
            try:
                await trio.to_thread.run_sync(marker.read, where, fs_uuid)
            finally:
                await fs.unmount(where, lazy=False)
        except (CtlError, marker.MarkerError) as exc:
            why = exc.message if isinstance(exc, CtlError) else str(exc)
            raise Conflict(f"{dev.node} holds Piccolo pool {fs_uuid}, which cannot be adopted "
                           f"({why}); it is not erased, even with --yes: its volumes would "
                           "be lost (erase it by hand, e.g. wipefs -a, if that is meant)"
                           ) from None
        finally:
            await trio.to_thread.run_sync(_remove_dir, where)
        return fs_uuid

    async def _write_marker(self, node: str, mark: marker.Marker) -> None:
        where = self.paths.pools_dir / f".init-{secrets.token_hex(4)}"
        await trio.to_thread.run_sync(lambda: where.mkdir(mode=0o700, parents=True))
        try:
            await fs.mount(mark.fs_type, node, where)
            try:
                await trio.to_thread.run_sync(_prepare_root, where, mark)
            finally:
                await fs.unmount(where, lazy=False)
        finally:
            await trio.to_thread.run_sync(_remove_dir, where)

    async def eject(self, ident: str, lazy: bool) -> dict[str, Any]:
        """Detach the pool's volumes (intent kept: they come back with the disk), unmount
        its filesystem; then the disk is safe to pull. Busy (409) while files are open,
        unless `lazy`; a busy eject changes nothing."""
        async with self._lock:
            pool = self._resolve(ident)
            if pool.state != "mounted":
                raise Conflict(f"pool {self.name(pool.id)} is not mounted ({pool.state})")
            dev = pool.device
            assert dev is not None
            pool.state = "leaving"  # no volume of it attaches from here on
            done: list[str] = []
            try:
                for vid in self.volumes.on_pool(pool.id):
                    # Every one, attached or not: detach takes the volume's lock, so an
                    # attach under way finishes first and is undone, never left behind.
                    was = self.volumes.is_attached(vid)
                    info = await self.volumes.detach(vid, lazy=lazy, keep_intent=True)
                    if was or info["pid"] is not None:
                        done.append(vid)
                await self._release(pool, lazy)
            except BaseException:
                pool.state = "mounted"
                with trio.CancelScope(shield=True):
                    await self.volumes.pool_back(pool.id)
                raise
            pool.state, pool.error, pool.device = "ejected", "", None
            pool.left_alone = dev.instance
            # A lazy eject leaves files open on it: the disk is free only once they close.
            free = await trio.to_thread.run_sync(_released, dev.node)
            pool.held_by_drain = None if free else dev.node
            log.info("pool %s ejected; volumes detached: %s%s", pool.id,
                     ", ".join(done) or "none", "" if free else "; still in use")
            self._publish("removed", pool, dev)
        return {**self.show(pool.id), "detached": done, "safe_to_remove": free}

    # ---------------------------------------------------------------------------------
    # views
    # ---------------------------------------------------------------------------------
    def _resolve(self, ident: str) -> Pool:
        """A pool by id, label or current device name."""
        if ident in self._pools:
            return self._pools[ident]
        for pool_id, dev in self._foreign.items():
            if ident in (pool_id, dev.name, dev.node):
                return Pool(pool_id, dev.fs_label, dev.fs_type, state="foreign",
                            last_device=dev.describe())
        hits = [p for p in self._pools.values()
                if ident == p.label or (p.device is not None
                                        and ident in (p.device.name, p.device.node))]
        if len(hits) > 1:
            raise Conflict(f"{ident!r} names {len(hits)} pools: use the pool id")
        if not hits:
            raise NotFound(f"no pool {ident!r}")
        return hits[0]

    def resolve(self, ident: str) -> str:
        return self._resolve(ident).id

    def show(self, ident: str) -> dict[str, Any]:
        pool = self._resolve(ident)
        mounted = pool.state in ("mounted", "leaving")
        if pool.held_by_drain is not None and _released(pool.held_by_drain):
            pool.held_by_drain = None
        device = pool.device.describe() if pool.device is not None else pool.last_device
        return {"id": pool.id, "label": pool.label or None, "fs_type": pool.fs_type or None,
                "state": pool.state, "error": pool.error or None,
                "mountpoint": str(self.paths.pool_mount(pool.id)) if mounted else None,
                "device": device or None,
                "present": pool.device is not None or pool.state in ("arriving", "foreign"),
                "volumes": self.volumes.on_pool(pool.id), "health": pool.health,
                "safe_to_remove": not mounted and pool.held_by_drain is None,
                "last_seen": pool.last_seen or None}

    def list(self) -> builtins.list[dict[str, Any]]:
        self._remember_known()
        known = [self.show(p) for p in sorted(self._pools)]
        return known + [self.show(p) for p in sorted(self._foreign) if p not in self._pools]

    def summary(self) -> dict[str, str]:
        """Pool id -> its state, or its health where it is mounted and judged."""
        out = {}
        for pid, pool in sorted(self._pools.items()):
            status = pool.state
            if pool.state == "mounted" and pool.health is not None:
                status = pool.health["status"]
            out[pid] = status
        return out

    def _remember_known(self) -> None:
        """Pools named by a volume's journal are known even if never seen here (an import
        brought them): listed as absent."""
        for pid in self.volumes.pools_named():
            if pid not in self._pools:
                self._pools[pid] = Pool(pid)

    def _load(self) -> None:
        if not self.paths.pools_file.exists():
            return
        try:
            data = json.loads(self.paths.pools_file.read_bytes())
            known = data["pools"]
            assert isinstance(known, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
            log.error("%s is unusable (%s); pools are listed once seen again",
                      self.paths.pools_file, exc)
            return
        for pid, rec in known.items():
            if not isinstance(rec, dict) or not marker.POOL_ID.fullmatch(str(pid)):
                continue
            pool = self._pools.setdefault(pid, Pool(pid))
            pool.label = str(rec.get("label") or "")
            pool.fs_type = str(rec.get("fs_type") or "")
            pool.last_seen = str(rec.get("last_seen") or "")
            last = rec.get("last_device")
            pool.last_device = last if isinstance(last, dict) else {}

    def _save(self) -> None:
        body = {"pools": {pid: p.remembered() for pid, p in sorted(self._pools.items())
                          if p.last_seen}}
        self.paths.devices_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.paths.pools_file, (json.dumps(body, indent=1) + "\n").encode(),
                     0o600)

    def _publish(self, action: str, pool: Pool, dev: BlockDevice | None = None) -> None:
        dev = dev or pool.device
        d = dev.describe() if dev is not None else pool.last_device
        self.bus.publish("device_event", {
            "id": pool.id, "pool": pool.label or None, "action": action, "state": pool.state,
            "device": d.get("node"), "model": d.get("model") or None,
            "serial": d.get("serial") or None, "size_bytes": d.get("size_bytes"),
            **({"error": pool.error} if pool.error else {})})

    # ---------------------------------------------------------------------------------
    # health
    # ---------------------------------------------------------------------------------
    async def _watch_health(self) -> None:
        while True:
            with trio.move_on_after(self.health_interval):
                await self._health_now.wait()
            self._health_now = trio.Event()
            try:
                await self.check_health()
            except Exception:
                log.exception("reading the pools' health failed; trying again later")

    async def check_health(self) -> None:
        for pool in builtins.list(self._pools.values()):
            dev, where = pool.device, self.where(pool.id)
            if dev is None or where is None:
                continue
            reading = await health.assess(dev, where, self.thresholds)
            if pool.device is not dev:
                continue  # it left meanwhile
            before = pool.health["status"] if pool.health else None
            pool.health = reading
            if reading["status"] != before:
                if reading["status"] != "ok":
                    log.warning("pool %s is %s: %s", pool.id, reading["status"],
                                "; ".join(reading["reasons"]))
                self.bus.publish("device_health", {"id": pool.id, "pool": pool.label or None,
                                                   "device": dev.node, **reading})


def _bare(where: Path) -> None:
    """The pool's mountpoint, empty and refusing writes while nothing is mounted on it:
    ciphertext meant for the disk never lands on the root filesystem."""
    if mountinfo.is_mounted(where):
        return
    try:
        mountpoint.guard(where)
    except OSError as exc:
        log.warning("pool mountpoint %s cannot refuse writes: %s", where, exc)


def _mounted_from(where: Path, dev: BlockDevice) -> bool:
    """What is mounted at `where` is this disk's filesystem (not a later arrival's)."""
    m = mountinfo.find(where)
    return m is not None and os.path.realpath(m.source) == os.path.realpath(dev.node)


def _released(node: str) -> bool:
    """Nothing holds the device any more (no filesystem, even lazily detached): an
    exclusive open succeeds only then."""
    try:
        fd = os.open(node, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _clones(devs: list[BlockDevice]) -> str:
    return (f"{len(devs)} disks carry this pool ({', '.join(d.node for d in devs)}): a "
            "copy? none is mounted until one is unplugged")


def _prepare_root(root: Path, mark: marker.Marker) -> None:
    os.chmod(root, 0o700)
    (root / "ciphertext").mkdir(mode=0o700, exist_ok=True)
    marker.write(root, mark)


def _remove_dir(where: Path) -> None:
    if mountinfo.is_mounted(where):
        return
    with contextlib.suppress(OSError):
        where.rmdir()
