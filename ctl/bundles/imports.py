"""Imports: a bundle staged beside the live state, and swapped in only by an unlock that
proves it.

    stage    the bundle is read once, streamed: every entry is checked against the manifest
             (paths, types, sizes, SHA-256) and written under imports/<id>/staged with
             dir-relative, no-follow, exclusive creates. Any fault removes the staging and
             leaves the state dir as it was. On a device already in use (`force`) the control
             volume turns read-only and the store refuses writes until the import ends.
    unlock   the bundle's own keyset opens with the password or recovery key; the manifest's
             HMAC is checked under that SDEK, and every staged volume key must open with it,
             before anything goes live. Then the live state is taken down and swapped:
             crypto/, ciphertext/ and volumes/ move to imports/<id>/previous and the staged
             ones take their place (renames on one filesystem, each step journaled in
             imports/pending.json). The imported state comes up like any unlock.
    finish   the rebuild hooks run (their outcome is in import_result) and the previous state
             is deleted. A failure before that swaps the previous state back.

A crash at any step leaves either the previous state or the imported one in place, never
neither: at start a half-done swap is rolled back, and an import staged or swapped stays
pending until an unlock completes it or `import abort` undoes it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import trio

from ctl.bundles import format as fmt
from ctl.bundles.goenvelope import GoEnvelope, GoTarReader
from ctl.bundles.jobs import Job, Jobs, Runner, crash_point
from ctl.errors import (
    Conflict,
    CtlError,
    Failed,
    ImportPending,
    InvalidInput,
    NotFound,
    StateCorrupt,
)
from ctl.events import EventBus, utc_now
from ctl.keys.keyset import Keyset, KeysetError
from ctl.keys.manager import KeyManager
from ctl.paths import BOOTSTRAP, CONTROL, Paths
from ctl.volumes.journal import JournalRecord
from ctl.volumes.metadata import MetadataCorrupted, VolumeMeta
from piccolofs.atomic import fsync_dir, syncfs, write_atomic

log = logging.getLogger("ctl.bundles.import")

COMPONENTS = ("crypto", "ciphertext", "volumes")
MAX_PENDING = 16 * 1024 * 1024
MAX_KEYSET = 64 * 1024
GO_INTENTS = {BOOTSTRAP: "bootstrap", CONTROL: "control"}


class BundleRejected(CtlError):
    """The bundle is not one we can import; `code` names the fault (bundle_<reason>)."""

    status = 422

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = f"bundle_{reason}"


@dataclass
class Source:
    path: Path | None  # a file on this machine, or
    upload: Any  # a body arriving on the socket (ctl.api.server.Upload)
    keyset: Path | None
    force: bool
    client: str

    @property
    def name(self) -> str:
        return str(self.path) if self.path else "the uploaded bundle"


class _UploadReader:
    """Blocking reads, for the staging thread, of a body the event loop receives."""

    def __init__(self, upload: Any) -> None:
        self.upload = upload
        self.buf = bytearray()
        self.ended = False

    def read(self, n: int = -1) -> bytes:
        while not self.ended and (n < 0 or len(self.buf) < n):
            try:
                chunk = trio.from_thread.run(self.upload.receive)
            except OSError as exc:  # the client left or stalled mid-way
                raise fmt.BundleError("truncated", str(exc)) from None
            if not chunk:
                self.ended = True
            self.buf += chunk
        size = len(self.buf) if n < 0 else min(n, len(self.buf))
        out = bytes(self.buf[:size])
        del self.buf[:size]
        return out


class _Prefixed:
    """A stream whose first bytes were already read (to tell the format)."""

    def __init__(self, head: bytes, rest: Any) -> None:
        self.head = head
        self.rest = rest

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out, self.head = (self.head, b"") if n < 0 else (self.head[:n], self.head[n:])
            return out
        return bytes(self.rest.read(n))


class _HashingReader:
    """Reads through, hashing every byte: the whole-bundle SHA-256, for the sidecar check."""

    def __init__(self, f: BinaryIO, job: Job) -> None:
        self.f = f
        self.job = job
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        self.job.add(len(data))
        return data


class Extractor:
    """Writes checked entries under the staging dir. Every parent is a directory this
    extractor made, every create is exclusive and follows no link, so no entry can reach
    outside the staging dir whatever the bundle says."""

    def __init__(self, staged: Path, job: Job) -> None:
        self.staged = staged
        self.job = job
        self.dirs: set[str] = {"", "crypto", "ciphertext"}
        self.dir_meta: list[tuple[str, int, int, int, int]] = []
        staged.mkdir(mode=0o700)
        (staged / "crypto").mkdir(mode=0o700)
        (staged / "ciphertext").mkdir(mode=0o700)

    def _target(self, rel: str) -> Path:
        if self.job.cancelled:
            raise Failed(f"cancelled: {self.job.cancelled}")
        parent = rel.rpartition("/")[0]
        if parent not in self.dirs:
            raise BundleRejected("unsafe_path", f"{rel}: its parent is not a directory of "
                                                "the bundle")
        return self.staged / rel

    def dir(self, rel: str, mode: int, uid: int, gid: int, mtime_ns: int,
            xattrs: dict[str, str] | None = None) -> None:
        path = self._target(rel)
        os.mkdir(path, 0o700)
        self.dirs.add(rel)
        _set_xattrs(str(path), xattrs)
        self.dir_meta.append((rel, mode, uid, gid, mtime_ns))
        self.job.add(0, 1)

    def file(self, rel: str, mode: int, uid: int, gid: int, mtime_ns: int,
             chunks: Iterable[bytes], xattrs: dict[str, str] | None = None) -> None:
        path = self._target(rel)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            for chunk in chunks:
                if self.job.cancelled:
                    raise Failed(f"cancelled: {self.job.cancelled}")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            _set_xattrs(fd, xattrs)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)
        self.job.add(0, 1)

    def symlink(self, rel: str, target: str, uid: int, gid: int, mtime_ns: int) -> None:
        path = self._target(rel)
        os.symlink(target, path)
        os.chown(path, uid, gid, follow_symlinks=False)
        os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    def hardlink(self, rel: str, target: str) -> None:
        os.link(self.staged / target, self._target(rel), follow_symlinks=False)

    def finish(self) -> None:
        """Directory modes, owners and times last (children change a directory's mtime),
        deepest first; then everything to disk."""
        for rel, mode, uid, gid, mtime_ns in reversed(self.dir_meta):
            path = self.staged / rel
            os.chown(path, uid, gid, follow_symlinks=False)
            os.chmod(path, mode, follow_symlinks=False)
            os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
        syncfs(self.staged)  # everything staged on disk: the state dir's filesystem only




def _set_xattrs(target: int | str, xattrs: dict[str, str] | None) -> None:
    for name, value in (xattrs or {}).items():
        if isinstance(target, int):
            os.setxattr(target, name, base64.b64decode(value))
        else:
            os.setxattr(target, name, base64.b64decode(value), follow_symlinks=False)


def _data_rel(path: str) -> str:
    """volumes/<id>/data[/rest] -> ciphertext/<id>[/rest]; crypto/keyset.json as is."""
    if path.startswith("volumes/"):
        _, vid, _data, *rest = path.split("/")
        return "/".join(["ciphertext", vid, *rest])
    return path


class Importer(Runner):
    def __init__(self, paths: Paths, keys: KeyManager, bus: EventBus, jobs: Jobs) -> None:
        self.paths = paths
        self.keys = keys
        self.bus = bus
        self.jobs = jobs
        self.on_staged: list[Any] = []  # callbacks(pending) once a bundle is staged

    @property
    def root(self) -> Path:
        return self.paths.state / "imports"

    @property
    def _pending_path(self) -> Path:
        return self.root / "pending.json"

    def _work(self, job_id: str) -> Path:
        return self.root / job_id

    # -- the pending import ------------------------------------------------------------
    def pending(self) -> dict[str, Any] | None:
        path = self._pending_path
        try:
            raw = path.read_bytes()[:MAX_PENDING + 1]
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateCorrupt(path, f"cannot be read: {exc.strerror}") from None
        try:
            obj = json.loads(raw)
            if not (isinstance(obj, dict) and isinstance(obj.get("id"), str)
                    and obj.get("phase") in ("staged", "swapping", "swapped")):
                raise ValueError("not a pending import record")
        except ValueError as exc:
            raise StateCorrupt(path, str(exc)) from None
        return obj

    def _set_pending(self, record: dict[str, Any]) -> None:
        write_atomic(self._pending_path, json.dumps(record, indent=1).encode() + b"\n", 0o600)

    def status(self) -> dict[str, Any] | None:
        try:
            pending = self.pending()
        except StateCorrupt as exc:
            return {"phase": "corrupt", "error": exc.message}
        if pending is None:
            return None
        return {k: pending.get(k) for k in ("id", "phase", "kind", "format", "source_device",
                                            "volumes", "store_revision", "staged_at",
                                            "replaces_state")}

    def recover(self) -> None:
        """At start: finish nothing by guessing — roll a half-done swap back, and remove
        stagings that never completed."""
        if not self.root.exists():
            return
        try:
            pending = self.pending()
        except StateCorrupt as exc:
            # Never guess: the work dirs may hold the only copy of the previous state.
            log.error("import record unusable, imports left as they are: %s", exc.message)
            return
        if pending is not None and pending["phase"] == "swapping":
            log.warning("import %s: a swap was interrupted; putting the previous state back",
                        pending["id"])
            self._unswap(pending)
        keep = {pending["id"]} if pending else set()
        for entry in self.root.iterdir():
            if entry.is_dir() and entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)

    # -- staging -------------------------------------------------------------------------
    def plan(self, path: str | None, keyset: str | None, force: bool, client: str,
             upload: Any = None) -> Source:
        if self.jobs.running is not None:
            running = self.jobs.running
            raise Conflict(f"an {running.type} is already running (job {running.id})")
        if self.pending() is not None:
            raise ImportPending("an import is already staged: unlock with its password or "
                                "recovery key, or abort it")
        if self.keys.initialized and not force:
            raise Conflict("this device is already set up: --force replaces its state (kept "
                           "aside until the imported one unlocks)")
        src = None
        if upload is None:
            src = Path(path or "")
            if not src.is_absolute():
                raise InvalidInput("the bundle path must be absolute")
            if not src.is_file():
                raise NotFound(f"no bundle at {src}")
        ks = Path(keyset) if keyset else None
        if ks is not None and not ks.is_file():
            raise NotFound(f"no keyset at {ks}")
        return Source(src, upload, ks, force, client)

    def _remove_work(self, work: Path) -> None:
        """A failed staging leaves the state dir exactly as it was."""
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.root.rmdir()  # only when empty: made by this import

    def start(self, source: Source) -> Job:
        job = self.jobs.begin(Job("import", "bundle", source.client))
        self.spawn(self._stage, job, source)
        return job

    async def _stage(self, job: Job, source: Source) -> None:
        work = self._work(job.id)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.jobs.report, job)
            try:
                self.root.mkdir(mode=0o700, exist_ok=True)
                work.mkdir(mode=0o700)
                if source.path is not None:
                    job.total_bytes = source.path.stat().st_size
                job.phase = "checking"
                info = await trio.to_thread.run_sync(_extract, source, work, job)
                crash_point("import.extracted")
                record = {"id": job.id, "phase": "staged", "staged_at": utc_now(),
                          "replaces_state": self.keys.initialized, "client": source.client,
                          **info}
                await trio.to_thread.run_sync(self._set_pending, record)
                crash_point("import.staged")
            except BaseException as exc:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._remove_work, work)
                error = _error_of(exc)
                if error is None:
                    raise
                self.jobs.finish(job, error=error)
                self.bus.publish("import_result", {"id": job.id, "status": "failed",
                                                   "error": error})
                self.bus.publish("audit", {"kind": "import_refused", "client": source.client,
                                           "id": job.id, "path": source.name,
                                           "error": error["message"]})
                return
            for callback in self.on_staged:
                try:
                    await callback(record)
                except Exception:  # the import stays staged whatever a listener does
                    log.exception("after staging import %s", job.id)
            result = {"status": "staged", **{k: record[k] for k in (
                "kind", "format", "volumes", "source_device", "store_revision")}}
            self.jobs.finish(job, result=result)
            self.bus.publish("import_result", {"id": job.id, **result})
            self.bus.publish("audit", {"kind": "import_staged", "client": source.client,
                                       "id": job.id, "path": source.name,
                                       "bundle_kind": record["kind"]})

    # -- unlock --------------------------------------------------------------------------
    async def open_staged(self, pending: dict[str, Any], password: bytes | None,
                          recovery_key: str | None, client: str) -> bytearray:
        """The imported SDEK, from the bundle's own keyset (the one budget of attempts)."""
        base = self._work(pending["id"])
        where = (base / "staged" if pending["phase"] == "staged" else self.paths.state)
        path = where / "crypto" / "keyset.json"
        try:
            data = await trio.to_thread.run_sync(lambda: path.read_bytes()[:MAX_KEYSET + 1])
        except OSError as exc:
            raise StateCorrupt(path, f"cannot be read: {exc.strerror}") from None
        return await self.keys.open_keyset(path, data, password, recovery_key, client)

    async def verify(self, pending: dict[str, Any], sdek: bytes) -> None:
        """Before anything goes live: the manifest's HMAC under the imported SDEK, and every
        staged volume key opens with it. BundleRejected otherwise."""
        await trio.to_thread.run_sync(_verify, self._work(pending["id"]), pending, sdek)

    async def swap(self, pending: dict[str, Any]) -> dict[str, Any]:
        return await trio.to_thread.run_sync(self._swap, pending)

    def _swap(self, pending: dict[str, Any]) -> dict[str, Any]:
        work = self._work(pending["id"])
        staged, previous = work / "staged", work / "previous"
        pending = {**pending, "phase": "swapping"}
        self._set_pending(pending)
        previous.mkdir(mode=0o700, exist_ok=True)
        for step, name in enumerate(COMPONENTS):
            live = self.paths.state / name
            if live.exists() and not (previous / name).exists():
                os.rename(live, previous / name)
            crash_point(f"import.swap.{step}")
            if (staged / name).exists():
                os.rename(staged / name, live)
            else:
                live.mkdir(mode=0o700, exist_ok=True)
        for d in (self.paths.state, staged, previous):
            fsync_dir(d)
        pending = {**pending, "phase": "swapped"}
        self._set_pending(pending)
        return pending

    async def unswap(self, pending: dict[str, Any]) -> None:
        await trio.to_thread.run_sync(self._unswap, pending)

    def _unswap(self, pending: dict[str, Any]) -> None:
        """Put the previous state back (idempotent: any point of a swap rolls back)."""
        work = self._work(pending["id"])
        staged, previous = work / "staged", work / "previous"
        self._set_pending({**pending, "phase": "swapping"})  # a crash from here rolls back
        staged.mkdir(mode=0o700, exist_ok=True)
        for name in COMPONENTS:
            live, before = self.paths.state / name, previous / name
            if not before.exists():
                continue
            if live.exists():
                if (staged / name).exists():
                    shutil.rmtree(live)
                else:
                    os.rename(live, staged / name)
            os.rename(before, live)
        for d in (self.paths.state, staged, previous):
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(d)
        self._set_pending({**pending, "phase": "staged"})

    async def finish(self, pending: dict[str, Any], hooks: list[dict[str, Any]],
                     client: str) -> None:
        """The imported state is up: forget the previous one and the staging."""
        def clean() -> None:
            self._pending_path.unlink(missing_ok=True)
            fsync_dir(self.root)
            self._remove_work(self._work(pending["id"]))

        await trio.to_thread.run_sync(clean)
        result = {"id": pending["id"], "status": "ok", "kind": pending.get("kind"),
                  "volumes": pending.get("volumes"), "hooks": hooks}
        self.bus.publish("import_result", result)
        self.bus.publish("audit", {"kind": "import_completed", "client": client,
                                   "id": pending["id"], "hooks": hooks})

    async def discard(self, pending: dict[str, Any], status: str, reason: str,
                      client: str) -> None:
        """Drop a staged import (abort, or a bundle that failed its check at unlock)."""
        if pending["phase"] != "staged":
            await self.unswap(pending)

        def clean() -> None:
            self._pending_path.unlink(missing_ok=True)
            self._remove_work(self._work(pending["id"]))

        await trio.to_thread.run_sync(clean)
        self.bus.publish("import_result", {"id": pending["id"], "status": status,
                                           "reason": reason})
        self.bus.publish("audit", {"kind": f"import_{status}", "client": client,
                                   "id": pending["id"], "reason": reason})

    def previous_tpm(self, pending: dict[str, Any]) -> dict[str, Any] | None:
        """The TPM enrolment the replaced state had (PCRs, PIN), if any."""
        path = self._work(pending["id"]) / "previous" / "crypto" / "bootstrap.tpm.json"
        try:
            doc = json.loads(path.read_bytes()[:MAX_PENDING])
            return {"pcrs": list(doc["pcrs"]), "pin": bool(doc["pin"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _error_of(exc: BaseException) -> dict[str, str] | None:
    if isinstance(exc, fmt.BundleError):
        return {"code": f"bundle_{exc.code}", "message": str(exc)}
    if isinstance(exc, CtlError):
        return {"code": exc.code, "message": exc.message}
    if isinstance(exc, OSError):
        if exc.errno == 28:
            return {"code": "bundle_no_space", "message": "no space left for the staged "
                    f"import under {exc.filename or 'the state dir'}; nothing was changed"}
        return {"code": "io_error", "message": f"{exc.strerror or exc}"
                + (f": {exc.filename}" if exc.filename else "")}
    if isinstance(exc, Exception):
        log.exception("import failed")
        return {"code": "internal", "message": f"internal error: {type(exc).__name__}"}
    return None


# -- worker-thread steps -------------------------------------------------------------------
def _extract(source: Source, work: Path, job: Job) -> dict[str, Any]:
    """Check and stage the bundle; returns what the pending record says about it."""
    if source.path is None:
        return _stage(source, _UploadReader(source.upload), None, work, job)
    sidecar = Path(f"{source.path}.sha256")
    expected = None
    if sidecar.is_file():
        expected = fmt.parse_sidecar(sidecar.read_text(errors="replace")[:4096])
    with open(source.path, "rb") as raw:
        return _stage(source, raw, expected, work, job)


def _stage(source: Source, raw: Any, expected: str | None, work: Path,
           job: Job) -> dict[str, Any]:
    f = _HashingReader(raw, job)
    head = f.read(512)
    stream = _Prefixed(head, f)
    extractor = Extractor(work / "staged", job)
    kind = fmt.sniff(head)
    if kind == "bundle":
        if source.keyset is not None:
            raise BundleRejected("unexpected_keyset", "this bundle carries its keyset: "
                                 "--keyset is only for the older envelope format")
        info = _extract_bundle(fmt.Reader(stream), extractor, work)
    elif kind == "go-envelope":
        if source.keyset is None:
            raise BundleRejected("keyset_required", "an envelope from the older daemon "
                                 "carries no keyset: give it with --keyset FILE")
        info = _extract_envelope(stream, source.keyset, extractor)
    else:
        raise fmt.BundleError("not_a_bundle", f"{source.name} is neither a PCV bundle nor "
                              "an envelope of the older daemon")
    while f.read(1 << 20):
        pass  # the sidecar covers every byte of the file
    if expected is not None and f.digest.hexdigest() != expected:
        raise fmt.BundleError("bad_checksum", "the bundle's SHA-256 differs from its .sha256 "
                              "sidecar: it was damaged or replaced")
    extractor.finish()
    _check_staged(work / "staged", info["volumes"])
    return info


def _extract_bundle(reader: fmt.Reader, ex: Extractor, work: Path) -> dict[str, Any]:
    manifest = reader.open()
    write_atomic(work / "manifest.json", reader.manifest_bytes, 0o600)
    write_atomic(work / "manifest.hmac", reader.hmac_bytes, 0o600)
    for entry, chunks in reader.entries():
        rel = _data_rel(entry.path)
        if entry.type == "dir":
            ex.dir(rel, entry.mode, entry.uid, entry.gid, entry.mtime_ns, dict(entry.xattrs))
        elif entry.type == "file":
            assert chunks is not None
            ex.file(rel, entry.mode, entry.uid, entry.gid, entry.mtime_ns, chunks,
                    dict(entry.xattrs))
        elif entry.type == "symlink":
            assert entry.target is not None
            ex.symlink(rel, entry.target, entry.uid, entry.gid, entry.mtime_ns)
        else:
            assert entry.target is not None
            ex.hardlink(rel, _data_rel(entry.target))
    intents = [v.to_json() for v in manifest.volumes]
    _write_journals(ex.staged, intents)
    return {"format": "bundle", "kind": manifest.kind, "source_device": manifest.source_device,
            "volumes": [v.id for v in manifest.volumes], "intents": intents,
            "store_revision": manifest.store.revision if manifest.store else None,
            "tpm": manifest.tpm.to_json() if manifest.tpm else None}


def _extract_envelope(f: Any, keyset: Path, ex: Extractor) -> dict[str, Any]:
    envelope = GoEnvelope(f)
    seen: set[str] = set()
    for vid, rel, kind, mode, _size, mtime, chunks in GoTarReader(envelope):
        path = "/".join(["ciphertext", vid, rel]) if rel else f"ciphertext/{vid}"
        if vid not in seen and rel:
            raise fmt.BundleError("unexpected_entry", f"{path}: before its volume's directory")
        seen.add(vid)
        mtime_ns = int(mtime) * 10**9
        if kind == "dir":
            ex.dir(path, mode, 0, 0, mtime_ns)
        else:
            ex.file(path, mode, 0, 0, mtime_ns, chunks or ())
    data = keyset.read_bytes()[:MAX_KEYSET + 1]
    try:
        Keyset.parse(data)
    except KeysetError as exc:
        raise BundleRejected("bad_keyset", f"{keyset}: not a usable keyset: {exc}") from None
    ex.file("crypto/keyset.json", 0o600, 0, 0, os.stat(keyset).st_mtime_ns, [data])
    intents = [{"id": v, "class": GO_INTENTS[v], "cluster_mode": "stateful",
                "follower_policy": "read_only", "desired_state": "mounted"}
               for v in sorted(seen)]
    if CONTROL not in seen:
        raise fmt.BundleError("unexpected_entry", "the envelope carries no control volume")
    _write_journals(ex.staged, intents)
    return {"format": "go-envelope", "kind": envelope.kind, "source_device": None,
            "volumes": sorted(seen), "intents": intents, "store_revision": None, "tpm": None}


def _write_journals(staged: Path, intents: list[dict[str, Any]]) -> None:
    for intent in intents:
        folder = staged / "volumes" / intent["id"]
        folder.mkdir(mode=0o700, parents=True)
        record = JournalRecord(desired_state=intent["desired_state"])
        write_atomic(folder / "state.json",
                     json.dumps(record.to_json(), indent=1).encode() + b"\n", 0o600)


def _check_staged(staged: Path, volumes: list[str]) -> None:
    """What an unlock will need must be there and well-formed, before we say 'staged'."""
    try:
        Keyset.parse((staged / "crypto" / "keyset.json").read_bytes()[:MAX_KEYSET + 1])
    except (OSError, KeysetError) as exc:
        raise BundleRejected("bad_keyset", f"the bundle's keyset is not usable: {exc}") \
            from None
    for vid in volumes:
        meta = staged / "ciphertext" / vid / "piccolo.volume.json"
        try:
            VolumeMeta.parse(meta.read_bytes()[:MAX_KEYSET])
        except (OSError, MetadataCorrupted) as exc:
            raise BundleRejected("bad_volume", f"volume {vid}: its key file is not usable: "
                                 f"{exc}") from None
        conf = staged / "ciphertext" / vid / "gocryptfs.conf"
        if not conf.is_file() or stat.S_ISLNK(os.lstat(conf).st_mode):
            raise BundleRejected("bad_volume", f"volume {vid}: gocryptfs.conf is missing")


def _verify(work: Path, pending: dict[str, Any], sdek: bytes) -> None:
    if pending.get("format") == "bundle":
        body = (work / "manifest.json").read_bytes()
        sig = (work / "manifest.hmac").read_bytes()
        try:
            fmt.verify(sdek, body, sig)
        except fmt.BundleError as exc:
            raise BundleRejected(exc.code, "the bundle's manifest does not verify under its "
                                 "keyset: it was altered after export; nothing was changed") \
                from None
    base = work / "staged" if pending["phase"] == "staged" else None
    for vid in pending.get("volumes") or []:
        folder = (base / "ciphertext" / vid) if base else None
        if folder is None:
            continue
        try:
            key = VolumeMeta.parse((folder / "piccolo.volume.json").read_bytes()).unseal(sdek)
            key[:] = bytes(len(key))
        except Exception:
            raise BundleRejected("key_mismatch", f"volume {vid}: its key does not open with "
                                 "the bundle's keyset; nothing was changed") from None

