"""Exports: a device's keyset and volumes as one deterministic PCV bundle, taken live.

Nothing is locked and nothing is decrypted. Each volume is captured in turn, point in time:

- its ciphertext is copied into the spool (a temp file beside the destination) while the
  volume stays in use; its mount process records which backing paths it mutates meanwhile;
- the mount process then holds every mutation (writers wait, they never fail), what changed
  is copied again (ctl.bundles.snapshot), and the hold is released. The hold lasts as long
  as the changes take to copy, and is reported per volume in `export_result`;
- the control volume is captured with the control store held and its WAL checkpointed into
  the database (TRUNCATE), so the bundle carries one consistent `control.db` and no WAL.

Then the bundle is assembled beside the destination — manifest first, entries sorted — from
the spool, synced and renamed into place, with a `.sha256` sidecar. Its bytes depend on the
exported state alone (names, ciphertext, modes, owners and times), so two exports of an
unchanged device are identical. A crash leaves at most temp files, which the next export
removes; never a partial bundle under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ctl.bundles import format as fmt
from ctl.bundles.hashing import Hasher
from ctl.bundles.jobs import Job, Jobs, Runner, crash_point
from ctl.bundles.snapshot import Blob, SnapshotError, Spool, TreeCopy
from ctl.errors import Conflict, CtlError, Failed, InvalidInput, Locked, NotInitialized
from ctl.events import EventBus, utc_now
from ctl.keys.manager import KeyManager
from ctl.paths import BOOTSTRAP, CONTROL, Paths
from ctl.store.store import ControlStore
from ctl.volumes.manager import VolumeManager
from piccolofs.atomic import fsync_dir, write_atomic

log = logging.getLogger("ctl.bundles.export")

CORE = (BOOTSTRAP, CONTROL)
HISTORY_KEEP = 256
PATH_TIMEOUT = 10.0
TEMP_NAME = re.compile(r"\.(spool|part)-[0-9a-f]{16}$")


def device_id(paths: Paths) -> str:
    """This device's id (made once, kept in the state dir): the source named in bundles."""
    path = paths.state / "device-id"
    try:
        text = path.read_text().strip()
        if text:
            return text[:128]
    except FileNotFoundError:
        pass
    text = secrets.token_hex(16)
    write_atomic(path, (text + "\n").encode(), 0o600)
    return text


@dataclass
class Plan:
    kind: str
    volumes: list[str]
    dest: Path
    client: str


class Exporter(Runner):
    def __init__(self, paths: Paths, keys: KeyManager, volumes: VolumeManager,
                 store: ControlStore, bus: EventBus, jobs: Jobs,
                 tpm_info: Callable[[], dict[str, Any] | None] = lambda: None,
                 import_pending: Callable[[], object] = lambda: None) -> None:
        self.paths = paths
        self.keys = keys
        self.volumes = volumes
        self.store = store
        self.bus = bus
        self.jobs = jobs
        self.tpm_info = tpm_info
        self.import_pending = import_pending

    # -- starting ------------------------------------------------------------------------
    async def plan(self, kind: str, volume_ids: Sequence[str], output: str | None,
                   client: str) -> Plan:
        """Check a request before anything starts; every refusal is one clear error."""
        if kind not in fmt.KINDS:
            raise InvalidInput(f"kind must be one of {', '.join(fmt.KINDS)}")
        if not self.keys.initialized:
            raise NotInitialized("not set up: there is nothing to export yet")
        if self.keys.locked:
            raise Locked("locked: an export needs the device unlocked (it signs the bundle)")
        if self.jobs.running is not None:
            running = self.jobs.running
            raise Conflict(f"an {running.type} is already running (job {running.id})")
        if self.import_pending():
            raise Conflict("an import is staged: unlock it or abort it before exporting")
        if not self.store.healthy:
            raise Conflict(f"the control store is not healthy ({self.store.health['message']})"
                           ": repair it before exporting")
        known = {v["id"] for v in self.volumes.list()}
        if kind == "control":
            if volume_ids:
                raise InvalidInput("a control export carries bootstrap and control only; "
                                   "use kind full to add volumes")
            chosen = list(CORE)
        else:
            apps = sorted(known - set(CORE))
            wanted = sorted(set(volume_ids)) if volume_ids else apps
            missing = [v for v in wanted if v not in known]
            if missing:
                raise InvalidInput(f"no such volume: {', '.join(missing)}")
            chosen = list(CORE) + [v for v in wanted if v not in CORE]
        for vid in CORE:
            if vid not in known:
                raise Conflict(f"volume {vid} does not exist yet")
        away = [why for v in chosen if (why := self.volumes.pool_absent(v)) is not None]
        if away:
            raise Conflict("; ".join(away) + ": plug its disk in, or name the volumes to "
                           "export with --volume")
        try:  # a path on a dead or hostile mount must not hang the daemon
            with trio.fail_after(PATH_TIMEOUT):
                dest = await trio.to_thread.run_sync(self._destination, kind, output,
                                                     abandon_on_cancel=True)
        except trio.TooSlowError:
            raise Failed(f"{output} did not answer within {PATH_TIMEOUT:.0f} s") from None
        return Plan(kind, chosen, dest, client)

    def _destination(self, kind: str, output: str | None) -> Path:
        if output is None:
            folder = self.paths.exports_dir / kind
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            dest = folder / f"{kind}-{stamp}.pcv"
            if dest.exists():
                dest = folder / f"{kind}-{stamp}-{secrets.token_hex(3)}.pcv"
            return dest
        dest = Path(output)
        if not dest.is_absolute():
            raise InvalidInput("output must be an absolute path")
        dest = dest.parent.resolve() / dest.name
        if not dest.parent.is_dir():
            raise InvalidInput(f"output directory {dest.parent} does not exist")
        pools = [p / "ciphertext" for p in self.paths.pools_dir.glob("*")]
        for inside in (self.paths.mounts_dir, self.paths.ciphertext_dir, self.paths.crypto_dir,
                       *pools):
            if dest.is_relative_to(inside):
                raise InvalidInput(f"output may not be under {inside}: an export holds the "
                                   "volumes it reads, and would wait for itself")
        for taken in (dest, Path(f"{dest}.sha256")):
            if taken.exists() or taken.is_symlink():
                raise Conflict(f"{taken} exists: an export never overwrites a file")
        return dest

    def start(self, plan: Plan) -> Job:
        job = self.jobs.begin(Job("export", plan.kind, plan.client))
        job.result["path"] = str(plan.dest)
        self.spawn(self._run, job, plan)
        return job

    # -- the run -------------------------------------------------------------------------
    async def _run(self, job: Job, plan: Plan) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.jobs.report, job)
            try:
                result = await self._export(job, plan)
            except fmt.BundleError as exc:  # a tree the format cannot describe
                self._failed(job, plan, "unexportable", exc.message)
            except CtlError as exc:
                self._failed(job, plan, exc.code, exc.message)
            except SnapshotError as exc:
                self._failed(job, plan, "unexportable", str(exc))
            except OSError as exc:
                code = "no_space" if exc.errno == 28 else "io_error"
                self._failed(job, plan, code, f"{exc.strerror or exc}"
                             + (f": {exc.filename}" if exc.filename else ""))
            except Exception as exc:
                log.exception("export %s failed", job.id)
                self._failed(job, plan, "internal", f"internal error: {type(exc).__name__}")
            else:
                self.jobs.finish(job, result=result)
                self.bus.publish("export_result", {"id": job.id, "status": "ok", **result})
                self.bus.publish("audit", {"kind": "export", "client": plan.client,
                                           "deferred": True, "at": result["finished_at"],
                                           "id": job.id, "export_kind": plan.kind,
                                           "path": result["path"], "sha256": result["sha256"],
                                           "size": result["size"]})

    def _failed(self, job: Job, plan: Plan, code: str, message: str) -> None:
        log.error("export %s failed: %s", job.id, message)
        error = {"code": code, "message": message}
        self.jobs.finish(job, error=error)
        self.bus.publish("export_result", {"id": job.id, "status": "failed",
                                           "kind": plan.kind, "error": error})
        self.bus.publish("audit", {"kind": "export_failed", "client": plan.client,
                                   "deferred": True, "at": utc_now(), "id": job.id,
                                   "export_kind": plan.kind, "error": message})

    async def _export(self, job: Job, plan: Plan) -> dict[str, Any]:
        dest = plan.dest
        await trio.to_thread.run_sync(_remove_stale_temps, dest)
        job.total_bytes, job.total_files = await trio.to_thread.run_sync(
            _estimate, [self.volumes.cipher_dir(v) for v in plan.volumes])
        spool = await trio.to_thread.run_sync(Spool, f"{dest}.spool-{job.id}",
                                              lambda: job.cancelled)
        try:
            keyset = await trio.to_thread.run_sync(self._copy_keyset, spool, job)
            trees: list[tuple[str, TreeCopy]] = []
            holds: dict[str, dict[str, Any]] = {}
            store_state: dict[str, Any] | None = None
            for vid in plan.volumes:
                job.phase = f"copying {vid}"
                tree = TreeCopy(str(self.volumes.cipher_dir(vid)), spool, job.add)
                if vid == CONTROL:
                    async with self.store.quiesced() as store_state:
                        holds[vid] = await self._capture(vid, tree)
                else:
                    holds[vid] = await self._capture(vid, tree)
                trees.append((vid, tree))
            job.phase = "writing"
            crash_point("export.copied")
            if job.cancelled:
                raise Failed(f"cancelled: {job.cancelled}")
            entries: list[tuple[fmt.Entry, Blob | None]] = [keyset]
            for vid, tree in sorted(trees):
                entries.extend(_entries(vid, tree))
            source = await trio.to_thread.run_sync(device_id, self.paths)
            manifest = fmt.Manifest(
                kind=plan.kind, source_device=source,
                store=fmt.StoreRef(int(store_state["revision"]), str(store_state["checksum"]))
                if store_state else None,
                volumes=[self._intent(v) for v in sorted(plan.volumes)],
                tpm=_tpm_policy(self.tpm_info()), entries=[e for e, _ in entries])
            body = manifest.to_bytes()
            sig = fmt.sign(self.keys.sdek(), body)
            size, digest = await trio.to_thread.run_sync(
                _assemble, dest, job.id, spool, body, sig, entries, job)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(spool.close)  # unlinking gigabytes takes time
        finished = utc_now()
        result = {"path": str(dest), "kind": plan.kind, "size": size, "sha256": digest,
                  "volumes": plan.volumes, "files": len(entries),
                  "store_revision": manifest.store.revision if manifest.store else None,
                  "source_device": manifest.source_device,
                  "hold_ms": {v: h.get("held_ms", 0) for v, h in holds.items()},
                  "writes_held": sum(int(h.get("waited", 0)) for h in holds.values()),
                  "recopied": {v: h.get("recopied", 0) for v, h in holds.items()},
                  "skipped": {vid: len(tree.skipped) for vid, tree in trees if tree.skipped},
                  "started_at": job.started_at, "finished_at": finished}
        await trio.to_thread.run_sync(self._remember, result)
        return result

    def _copy_keyset(self, spool: Spool, job: Job) -> tuple[fmt.Entry, Blob | None]:
        fd = os.open(self.paths.keyset, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            offset, size, digest = spool.append(fd, lambda n: job.add(n))
        finally:
            os.close(fd)
        blob = Blob(offset, size, digest, (st.st_ino, size, st.st_mtime_ns, st.st_ctime_ns),
                    0o600, st.st_uid, st.st_gid, st.st_mtime_ns, {})
        entry = fmt.Entry(path="crypto/keyset.json", type="file", mode=0o600, uid=st.st_uid,
                          gid=st.st_gid, mtime_ns=st.st_mtime_ns, size=size, sha256=digest)
        return entry, blob

    def _intent(self, vid: str) -> fmt.Volume:
        info = self.volumes.info(vid)
        desired = info.get("desired_state")
        return fmt.Volume(vid, info.get("class") or "application",
                          info.get("cluster_mode") or "stateful",
                          info.get("follower_policy") or "read_only",
                          desired if desired in fmt.DESIRED_STATES else "unmounted")

    async def _capture(self, vid: str, tree: TreeCopy) -> dict[str, Any]:
        """Copy one volume point in time; returns what its hold cost."""
        async with self.volumes.exporting(vid) as child:
            if child is None:  # not mounted for writing: nothing changes it meanwhile
                await trio.to_thread.run_sync(tree.walk)
                return {"held_ms": 0, "waited": 0, "recopied": 0}
            await child.capture_begin()
            held = False
            try:
                await trio.to_thread.run_sync(tree.walk)
                await child.capture_hold()
                held = True
                paths, overflow = await child.capture_dirty()
                dirty = None if overflow else [p.decode("utf-8", "replace") for p in paths]
                await trio.to_thread.run_sync(tree.refresh, dirty)
            finally:
                with trio.CancelScope(shield=True):
                    try:
                        released = await child.capture_release()
                    except CtlError as exc:
                        if held:
                            raise Failed(f"volume {vid}: the capture was lost: "
                                         f"{exc.message}") from None
                        released = {}
            if released.get("expired"):
                raise Failed(f"volume {vid}: the hold ran out before the changes were "
                             "copied; try again when the volume is less busy")
            tree.close_blobs_orphaned()
            return {"held_ms": released.get("held_ms", 0), "waited": released.get("waited", 0),
                    "recopied": tree.recopied}

    # -- history -------------------------------------------------------------------------
    @property
    def _history_path(self) -> Path:
        return self.paths.exports_dir / "history.json"

    def history(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self._history_path.read_bytes())
        except (FileNotFoundError, ValueError):
            return []
        return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []

    def _remember(self, result: dict[str, Any]) -> None:
        keep = [*self.history(), {k: result[k] for k in (
            "path", "kind", "size", "sha256", "store_revision", "volumes", "source_device",
            "started_at", "finished_at")}][-HISTORY_KEEP:]
        self.paths.exports_dir.mkdir(mode=0o700, exist_ok=True)
        write_atomic(self._history_path, json.dumps(keep, indent=1).encode() + b"\n", 0o600)


# -- pure helpers (worker threads) ---------------------------------------------------------
def _remove_stale_temps(dest: Path) -> None:
    """Temp files that a crashed export left in this folder (no export runs meanwhile)."""
    for p in dest.parent.iterdir():
        if TEMP_NAME.search(p.name) and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()


def _estimate(roots: list[Path]) -> tuple[int, int]:
    total = files = 0
    for root in roots:
        for dirpath, _dirs, names in os.walk(root):
            for n in names:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, n)).st_size
                files += 1
    return total, files


def _publish(tmp: Path, dest: Path) -> None:
    """Give the finished bundle its name — whole, and never over a file that appeared
    meanwhile: a hard link where the filesystem has them, else a rename after a check (a
    FAT or exFAT backup drive)."""
    try:
        os.link(tmp, dest)
    except OSError as exc:
        if exc.errno in (errno.EEXIST,):
            tmp.unlink()
            raise Conflict(f"{dest} appeared meanwhile: an export never overwrites a file") \
                from None
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV,
                             errno.ENOSYS):
            tmp.unlink()
            raise
        if dest.exists() or dest.is_symlink():
            tmp.unlink()
            raise Conflict(f"{dest} appeared meanwhile: an export never overwrites a file") \
                from None
        os.rename(tmp, dest)
        return
    tmp.unlink()


def _tpm_policy(info: dict[str, Any] | None) -> fmt.TpmPolicy | None:
    return None if info is None else fmt.TpmPolicy(tuple(info["pcrs"]), bool(info["pin"]))


def _order(rel: str) -> list[str]:
    return rel.split("/") if rel else []


def _entries(vid: str, tree: TreeCopy) -> list[tuple[fmt.Entry, Blob | None]]:
    """The volume's entries in bundle order; the first name of an inode carries its data,
    the later ones are hard links to it."""
    prefix = f"volumes/{vid}/data"
    out: list[tuple[fmt.Entry, Blob | None]] = []
    first: dict[tuple[int, int], str] = {}
    for rel in sorted(tree.nodes, key=_order):
        node = tree.nodes[rel]
        path = f"{prefix}/{rel}" if rel else prefix
        if node.kind == "dir":
            out.append((fmt.Entry(path=path, type="dir", mode=node.mode, uid=node.uid,
                                  gid=node.gid, mtime_ns=node.mtime_ns,
                                  xattrs=node.xattrs), None))
        elif node.kind == "symlink":
            out.append((fmt.Entry(path=path, type="symlink", mode=0o777, uid=node.uid,
                                  gid=node.gid, mtime_ns=node.mtime_ns,
                                  target=node.target), None))
        else:
            blob = tree.blobs[node.key]
            if node.key in first:
                out.append((fmt.Entry(path=path, type="hardlink", mode=blob.mode,
                                      uid=blob.uid, gid=blob.gid, mtime_ns=blob.mtime_ns,
                                      target=first[node.key]), None))
            else:
                first[node.key] = path
                out.append((fmt.Entry(path=path, type="file", mode=blob.mode, uid=blob.uid,
                                      gid=blob.gid, mtime_ns=blob.mtime_ns, size=blob.size,
                                      sha256=blob.sha256, xattrs=blob.xattrs), blob))
    return out


def _assemble(dest: Path, job_id: str, spool: Spool, manifest: bytes, sig: bytes,
              entries: list[tuple[fmt.Entry, Blob | None]], job: Job) -> tuple[int, str]:
    """Write the bundle beside `dest`, sync it, rename it into place; (size, sha256)."""
    tmp = dest.parent / f"{dest.name}.part-{job_id}"
    hasher = Hasher()  # the whole bundle's SHA-256, alongside the copy
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except BaseException:
        hasher.close()
        raise
    offset = 0

    def put(data: bytes | bytearray, n: int = -1) -> None:
        nonlocal offset
        size = len(data) if n < 0 else n
        with memoryview(data) as view:
            done = 0
            while done < size:
                done += os.write(fd, view[done:size])
        if n >= 0:
            assert isinstance(data, bytearray)
            hasher.feed_buffer(data, n)  # a pool buffer: back to the pool once hashed
        else:
            hasher.feed(bytes(data))
        offset += size

    try:
        for name, data in ((fmt.MANIFEST_NAME, manifest), (fmt.HMAC_NAME, sig)):
            put(fmt.member_header(name, len(data)))
            put(data)
            put(fmt.pad(len(data)))
        job.bytes = 0
        for entry, blob in entries:
            put(fmt.entry_header(entry))
            if blob is not None:
                pos, left = blob.offset, blob.size
                while left:
                    if job.cancelled:
                        raise Failed(f"cancelled: {job.cancelled}")
                    buf = hasher.buffer()
                    with memoryview(buf) as view:
                        n = os.preadv(spool.fd, [view[:min(left, len(buf))]], pos)
                    if n <= 0:
                        hasher.give_back(buf)
                        raise OSError(5, "the export spool ended early", spool.path)
                    put(buf, n)
                    pos += n
                    left -= n
                    job.add(n)
                put(fmt.pad(blob.size))
        put(fmt.end_of_archive(offset))
        digest = hasher.digest()
        os.fsync(fd)
        crash_point("export.assembled")
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        hasher.close()
    os.close(fd)
    _publish(tmp, dest)
    fsync_dir(dest.parent)
    sidecar = fmt.sidecar_line(digest, dest.name).encode()
    write_atomic(Path(f"{dest}.sha256"), sidecar, 0o600)
    return offset, digest
