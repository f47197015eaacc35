"""The mount process: one FUSE session serving one cipher directory.

Lifecycle, all owned by one trio nursery:

    pyfuse3.init (kernel mount)  ->  FUSE main loop  ->  FUSE_INIT handled
    ->  "ready" to the parent  ->  serve until unmounted, SIGTERM/SIGINT, "shutdown" or
        the parent gone  ->  pyfuse3.close (unmount only if we ended the session)

The process never touches its own mountpoint (a request to itself could wait for ever), and
once it decides to end it leaves within EXIT_DEADLINE seconds whatever blocks it: a
watchdog thread outside the interpreter dumps the stacks and exits, which closes /dev/fuse
and so fails every request still pending on the mount.

The parent learns of readiness over the control channel (`--ctl-fd`, see
piccolofs.protocol) or a one-shot ready pipe (`--ready-fd`) used by `piccolofs mount`.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import resource
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pyfuse3
import trio

from piccolofs import mountinfo, protocol
from piccolofs.format import gcm_runs
from piccolofs.format.config import Config
from piccolofs.format.volume import VolumeCrypto
from piccolofs.fs.capture import CaptureError
from piccolofs.fs.errors import Counters
from piccolofs.fs.fence import Fence, Refused
from piccolofs.fs.operations import PiccoloOperations
from piccolofs.fs.request_wait import DEFAULT_SPIN_US

log = logging.getLogger("piccolofs.mount")

READY_TIMEOUT = 30.0
EXIT_DEADLINE = 10.0
# Handlers finish without yielding (only fsync waits, in a thread), so a small fixed pool
# of request readers suffices; keeping it warm avoids spawning a task per request. A
# capture's hold parks one worker per waiting mutation, and reads need one left free: the
# extra workers sleep unless a hold (or fsync) needs them.
MIN_TASKS = 4
MAX_TASKS = 64
# The kernel reads ahead of a sequential reader at most this far. Its default for a FUSE
# mount is 128 KiB, so a large read arrives as 128 KiB requests; 1 MiB is the largest
# request the kernel sends (max_pages 256), and sequential reads of large files came out
# 1.3-1.7x faster with it (docs/performance.md).
READ_AHEAD_KIB = 1024


@dataclass
class MountOptions:
    cipher_dir: str
    mountpoint: str
    read_only: bool = False
    allow_other: bool | None = None  # None: when running as root
    timeout: float = 1.0
    ready_fd: int | None = None
    ctl_fd: int | None = None
    debug: bool = False
    spin_us: int = DEFAULT_SPIN_US
    lease: float | None = None  # start as a leader fenced by a write lease of this long
    lease_until: float | None = None  # ... or ending then (time.monotonic, as the parent's)
    token: int = 0
    read_ahead_kib: int = READ_AHEAD_KIB  # 0: the kernel's default


def _fuse_options(opts: MountOptions) -> set[str]:
    options = {
        f"fsname={os.path.abspath(opts.cipher_dir)}",
        "subtype=piccolofs",
        "default_permissions",
    }
    allow_other = os.geteuid() == 0 if opts.allow_other is None else opts.allow_other
    if allow_other:
        options.add("allow_other")
    if opts.debug:
        options.add("debug")
    return options


def _raise_fd_limit() -> None:
    """Use the descriptors we may: the inode fd cache sizes itself from the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_HEAP_BYTES = 16 << 20


def _keep_freed_heap() -> None:
    """Keep request-sized buffers in the heap. Each request of up to 1 MiB allocates a few
    buffers of its size (the request, the backing bytes, the result) and frees them; by
    default glibc hands the freed top of the heap back to the kernel once it passes twice
    its adaptive mmap threshold, so every such request page-faults its buffers in anew
    (about 500 faults per 1 MiB write, measured). Up to 16 MiB of freed heap stay mapped."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, KEEP_HEAP_BYTES // 4)
        libc.mallopt(_M_TRIM_THRESHOLD, KEEP_HEAP_BYTES)
    except (OSError, AttributeError):  # not glibc: its own defaults
        pass


def _set_read_ahead(mountpoint: str, kib: int) -> Path | None:
    """Raise the mount's read-ahead window (see READ_AHEAD_KIB). The kernel sets it when it
    takes FUSE_INIT's reply, as the smaller of its default and what the filesystem asks, so
    only sysfs can raise it, and only root may write there: others keep 128 KiB. The mount
    is found through mountinfo: a stat of the mountpoint would be a request to this very
    process. Returns the window's sysfs file, None where the mount is not found."""
    m = mountinfo.find(mountpoint)
    if m is None or m.fstype != "fuse.piccolofs":
        log.info("read-ahead left at the kernel's default: mountinfo shows %s on %s",
                 m.fstype if m else "nothing", mountpoint)
        return None
    path = Path("/sys/class/bdi", m.bdi, "read_ahead_kb")
    if kib:
        try:
            path.write_text(f"{kib}\n", encoding="ascii")
        except OSError as exc:
            log.info("read-ahead left at the kernel's default: %s: %s", path, exc.strerror)
    return path


def _read_ahead_kib(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return int(path.read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None


class Session:
    """The running mount: operations, control channel, and the reason it ended."""

    def __init__(self, ops: PiccoloOperations, opts: MountOptions) -> None:
        self.ops = ops
        self.opts = opts
        # Resolved before the mount exists: afterwards resolving it would ask this process.
        self.mountpoint = os.path.realpath(opts.mountpoint)
        self._read_ahead_path: Path | None = None  # found once the mount is up
        self.we_ended_it = False
        self._ctl: trio.SocketStream | None = None
        self._send_lock = trio.Lock()
        self._pending: list[dict[str, Any]] = []
        self._wake = trio.Event()
        self.fence = Fence(ops, self.report)
        ops.capture.report = self.report
        if not opts.read_only and (opts.lease or opts.lease_until):
            try:
                self.fence.set_role(True, opts.token, opts.lease_until
                                    or time.monotonic() + (opts.lease or 0))
            except Refused as exc:  # started too late to write at all
                log.warning("starting read-only: %s", exc)
                ops.set_read_only(True)

    # -- control channel -----------------------------------------------------------------
    def report(self, event: dict[str, Any]) -> None:
        """Queue an event for the parent (called from FUSE handlers, must not block)."""
        if self._ctl is not None:
            self._pending.append(event)
            self._wake.set()

    async def _send(self, msg: dict[str, Any]) -> None:
        if self._ctl is None:
            return
        async with self._send_lock:
            try:
                await self._ctl.send_all(protocol.encode(msg))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._ctl = None

    async def _pump_events(self) -> None:
        while self._ctl is not None:
            await self._wake.wait()
            self._wake = trio.Event()
            pending, self._pending = self._pending, []
            for event in pending:
                await self._send(event)

    def stats(self) -> dict[str, Any]:
        proc = psutil.Process()
        cpu = proc.cpu_times()
        return {
            "role": "follower" if self.ops.read_only else "leader",
            "token": self.fence.token,
            "lease_remaining": self.fence.remaining(),
            "inodes": len(self.ops.inodes),
            "handles": len(self.ops._handles),
            "rss": proc.memory_info().rss,
            "cpu_seconds": cpu.user + cpu.system,
            "internal_errors": Counters.internal_errors,
            "integrity_errors": Counters.integrity_errors,
            "read_ahead_kib": _read_ahead_kib(self._read_ahead_path),
            **self.ops.requests.stats(),
            **self.ops.listings,
        }

    async def _handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        protocol.validate_request(msg)
        op = msg["op"]
        try:
            if op == "set_role":
                self.fence.set_role(msg["role"] == protocol.ROLE_LEADER, msg.get("token"),
                                    protocol.lease_end(msg))
                log.info("role set to %s (token %d)", msg["role"], self.fence.token)
                return {"ok": True, "role": msg["role"], "token": self.fence.token,
                        "deadline": self.ops.lease_until}
            if op == "lease":
                until = protocol.lease_end(msg)
                assert until is not None
                return {"ok": True, "deadline": self.fence.extend(msg["token"], until)}
        except Refused as exc:
            return {"ok": False, "error": str(exc)}
        if op == "stats":
            return {"ok": True, **self.stats()}
        if op == "capture":
            try:
                return self._capture(msg)
            except CaptureError as exc:
                return {"ok": False, "error": str(exc)}
        self.terminate()
        return {"ok": True}

    def _capture(self, msg: dict[str, Any]) -> dict[str, Any]:
        capture = self.ops.capture
        action = msg["action"]
        if action == "begin":
            capture.begin()
            log.info("capture: recording changed paths")
            return {"ok": True}
        if action == "hold":
            capture.hold(msg.get("max_s"))
            log.info("capture: holding mutations (%d paths changed)", len(capture.paths))
            return {"ok": True, "dirty_count": len(capture.paths),
                    "overflow": capture.overflow}
        if action == "dirty":
            if not capture.recording:
                raise CaptureError("no capture: begin first")
            paths, after = protocol.dirty_page(capture.paths, msg["from"])
            return {"ok": True, "paths": paths, "next": after, "overflow": capture.overflow}
        held_ms = capture.release()
        log.info("capture: released after %d ms (%d mutations waited)", held_ms,
                 capture.waited)
        return {"ok": True, "held_ms": held_ms, "waited": capture.waited,
                "expired": capture.expired}

    async def _serve_ctl(self) -> None:
        assert self._ctl is not None
        lines = protocol.LineBuffer()
        while True:
            try:
                data = await self._ctl.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                # The parent is gone: a mount nobody supervises must not linger.
                log.warning("control channel closed by the parent; unmounting")
                self._ctl = None
                self.terminate()
                return
            try:
                messages = lines.feed(data)
            except protocol.ProtocolError as exc:
                await self._send({"ok": False, "error": str(exc)})
                continue
            for line in messages:
                reply_id = None
                try:
                    msg = protocol.decode(line)
                    reply_id = msg.get("id")
                    reply = await self._handle(msg)
                except protocol.ProtocolError as exc:
                    reply = {"ok": False, "error": str(exc)}
                await self._send({"reply": reply_id, **reply})

    # -- lifecycle -----------------------------------------------------------------------
    def terminate(self) -> None:
        if not self.we_ended_it:
            faulthandler.dump_traceback_later(EXIT_DEADLINE, exit=True)
        self.we_ended_it = True
        self.ops.capture.close()  # writers held would keep the session from ending
        self.ops.requests.stop()
        pyfuse3.terminate()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                log.info("signal %d: unmounting", signum)
                self.terminate()
                return

    async def _announce_ready(self) -> None:
        with trio.move_on_after(READY_TIMEOUT) as timeout:
            await self.ops.initialized.wait()
        if timeout.cancelled_caught:
            log.error("the kernel sent no FUSE_INIT within %.0f s; unmounting", READY_TIMEOUT)
            self.terminate()
            return
        # The kernel took the FUSE_INIT reply before the init handler's task yielded.
        self._read_ahead_path = _set_read_ahead(self.mountpoint, self.opts.read_ahead_kib)
        if self.opts.ready_fd is not None:
            try:
                os.write(self.opts.ready_fd, b"ready\n")
            finally:
                os.close(self.opts.ready_fd)
                self.opts.ready_fd = None
        await self._send({"event": "ready", "pid": os.getpid(),
                          "role": "follower" if self.ops.read_only else "leader"})
        log.info("mounted %s on %s", self.opts.cipher_dir, self.opts.mountpoint)

    async def run(self) -> None:
        if self.opts.ctl_fd is not None:
            sock = socket.socket(fileno=self.opts.ctl_fd)
            sock.setblocking(False)
            self._ctl = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals)
            nursery.start_soon(self.fence.run)
            nursery.start_soon(self.ops.capture.run)
            if self._ctl is not None:
                nursery.start_soon(self._serve_ctl)
                nursery.start_soon(self._pump_events)
            nursery.start_soon(self._announce_ready)
            await pyfuse3.main(min_tasks=MIN_TASKS, max_tasks=MAX_TASKS)
            nursery.cancel_scope.cancel()


def run(cfg: Config, master_key: bytearray, opts: MountOptions) -> int:
    """Mount and serve until the session ends. Zeroes `master_key` once the keys exist."""
    try:
        volume = VolumeCrypto(cfg, bytes(master_key))
    finally:
        master_key[:] = bytes(len(master_key))
    os.umask(0)
    _raise_fd_limit()
    _keep_freed_heap()
    root_fd = os.open(opts.cipher_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    ops = PiccoloOperations(volume, root_fd, read_only=opts.read_only, timeout=opts.timeout)
    session = Session(ops, opts)
    ops._report = session.report
    if not hasattr(pyfuse3.Operations, "fallocate"):
        log.info("this pyfuse3 has no fallocate or lseek handlers (packaging/pyfuse3 adds "
                 "them): fallocate(2) answers EOPNOTSUPP, SEEK_DATA/SEEK_HOLE see no holes")
    slow = gcm_runs.unavailable_reason()
    if slow and volume.blocks.cipher.name == "AES-256-GCM":
        log.info("content blocks are sealed and opened one by one in Python (%s)", slow)
    pyfuse3.init(ops, opts.mountpoint, _fuse_options(opts))
    ops.requests.install(opts.spin_us)
    try:
        trio.run(session.run)
    except BaseException:
        session.we_ended_it = True
        log.exception("mount process failed")
        raise
    finally:
        pyfuse3.close(unmount=session.we_ended_it)
        ops.close()
        os.close(root_fd)
    return 0


def setup_logging(debug: bool, foreground: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    handler: logging.Handler
    if foreground or not os.path.exists("/dev/log"):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("piccolofs[%(process)d] %(levelname)s %(message)s"))
    else:
        from logging.handlers import SysLogHandler

        handler = SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("piccolofs[%(process)d]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pyfuse3").setLevel(logging.WARNING)
