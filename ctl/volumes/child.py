"""One supervised `piccolofs mount` process and its control channel.

The passphrase goes over a pipe that the child reads once and closes; the control channel is
a socketpair (piccolofs.protocol). `run` is meant for `nursery.start`: it reports started
only once the child says *ready* (the kernel has sent FUSE_INIT) and mountinfo shows the
child's mount of this cipher dir at the mountpoint, then keeps reading the channel and
returns the child's exit code when the process ends, whatever the reason. The child's
stderr is forwarded to the daemon's log; its last error line is what a failed mount says.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from ctl.errors import Busy, Failed
from ctl.roles import Fence
from ctl.volumes import mountinfo
from piccolofs import protocol

log = logging.getLogger("ctl.volumes")

FSTYPE = "fuse.piccolofs"
LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
          "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}
MAX_LINE = 4096
READY_TIMEOUT = 60.0
REQUEST_TIMEOUT = 15.0
EXIT_TIMEOUT = 15.0
DRAIN_GRACE = 2.0


class MountFailed(Failed):
    pass


class MountChild:
    def __init__(self, volume_id: str, cipher: Path, mountpoint: Path, read_only: bool,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 fence: Fence | None = None) -> None:
        self.volume_id = volume_id
        self.fence = fence  # a leader's term: its token and write lease, from the start
        self.cipher = cipher
        self.mountpoint = mountpoint
        self.read_only = read_only
        self.on_event = on_event or (lambda msg: None)
        self.proc: trio.Process | None = None
        self._stream: trio.SocketStream | None = None
        self._pending: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self._next_id = 1
        self._send_lock = trio.Lock()
        self.exited = trio.Event()
        self.returncode: int | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=20)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def run(self, passphrase: bytes, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        parent_sock, child_sock = socket.socketpair()
        try:
            with child_sock:
                await self._spawn(passphrase, child_sock)
        except BaseException:
            parent_sock.close()
            raise
        parent_sock.setblocking(False)
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent_sock))
        lines = protocol.LineBuffer()
        failure: str | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._wait_exit, nursery.cancel_scope)
                failure = "exited before it was ready"
                with trio.move_on_after(READY_TIMEOUT) as timeout:
                    await self._read_until_ready(lines)
                    problem = self.problem()
                    failure = None if problem is None else f"reported ready, but {problem}"
                if timeout.cancelled_caught:
                    failure = f"did not become ready within {READY_TIMEOUT:.0f} s"
                if failure is None:
                    task_status.started()
                    await self._read_loop(lines)
                else:
                    await self.kill()
        finally:
            await self._stream.aclose()
            for event, _ in self._pending.values():
                event.set()
        # Raised here, outside the nursery, so the caller sees MountFailed itself (with the
        # mount process's own last words), never an exception group.
        if failure is not None:
            raise MountFailed(f"volume {self.volume_id}: mount process {failure} "
                              f"(exit code {self.returncode}){self._last_words()}")
        assert self.returncode is not None
        return self.returncode

    async def _spawn(self, passphrase: bytes, child_sock: socket.socket) -> None:
        """Start the child and hand it the passphrase. Every pipe end is closed however this
        ends, and a child that could not be handed its passphrase is killed and reaped."""
        cmd = [sys.executable, "-m", "piccolofs", "mount", "--foreground",
               "--ctl-fd", str(child_sock.fileno())]
        if self.read_only:
            cmd.append("--ro")
        elif self.fence is not None:
            cmd += ["--token", str(self.fence.token), "--lease-until", repr(self.fence.until)]
        pass_r, pass_w = os.pipe()
        try:
            try:
                proc = await trio.lowlevel.open_process(
                    [*cmd, "--passfd", str(pass_r), "--", str(self.cipher),
                     str(self.mountpoint)],
                    pass_fds=(child_sock.fileno(), pass_r), cwd="/",
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE)
            finally:
                os.close(pass_r)
            try:
                os.write(pass_w, passphrase + b"\n")
            except BaseException:
                with trio.CancelScope(shield=True):
                    proc.kill()
                    self.returncode = await proc.wait()
                    assert proc.stderr is not None
                    await trio.aclose_forcefully(proc.stderr)
                self.exited.set()
                raise
        finally:
            os.close(pass_w)
        self.proc = proc

    def problem(self, mounts: dict[str, mountinfo.Mount] | None = None) -> str | None:
        """Why mountinfo does not show our mount of our cipher dir at the mountpoint."""
        path = mountinfo.canonical(self.mountpoint)
        m = (mounts if mounts is not None else mountinfo.mounts()).get(path)
        if m is None:
            return "the mount is gone from the mountpoint"
        if m.fstype != FSTYPE or m.source != str(self.cipher):
            return f"{m.fstype} from {m.source} is mounted at the mountpoint instead"
        return None

    def _last_words(self) -> str:
        """The child's last error line ("piccolofs: ..." or a logged ERROR), else its last."""
        for line in reversed(self.stderr_tail):
            for marker in ("piccolofs: ", " ERROR ", " CRITICAL "):
                if marker in line:
                    return ": " + line.split(marker, 1)[1]
        return f": {self.stderr_tail[-1]}" if self.stderr_tail else ""

    async def _wait_exit(self, scope: trio.CancelScope) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        try:
            await self._pump_stderr(self.proc.stderr)
        finally:
            # Closed here, not whenever the Process is collected: a daemon that remounts
            # all day must not hold a pipe per past child until the garbage collector runs.
            await trio.aclose_forcefully(self.proc.stderr)
        self.returncode = await self.proc.wait()
        self.exited.set()
        scope.cancel()

    async def _pump_stderr(self, stream: trio.abc.ReceiveStream) -> None:
        """Forward the child's log lines to ours and keep the last few for error messages.
        Ends at EOF, i.e. when the child (and anything holding its stderr) has exited."""
        buf = b""
        while True:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                break
            buf += data
            *done, buf = buf.split(b"\n")
            buf = buf[-MAX_LINE:]
            for raw in done:
                self._child_line(raw)
        if buf:
            self._child_line(buf)

    def _child_line(self, raw: bytes) -> None:
        line = raw[:MAX_LINE].decode(errors="replace").rstrip()
        if not line:
            return
        self.stderr_tail.append(line)
        level = next((lv for name, lv in LEVELS.items() if f" {name} " in line), logging.INFO)
        log.log(level, "volume %s: %s", self.volume_id, line)

    async def _read_until_ready(self, lines: protocol.LineBuffer) -> None:
        """Returns on "ready"; a channel closed before it waits for the exit (which cancels)."""
        assert self._stream is not None
        while True:
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                await trio.sleep_forever()
            try:
                for line in lines.feed(data):
                    msg = protocol.decode(line)
                    if msg.get("event") == "ready":
                        return
                    self._dispatch(msg)
            except protocol.ProtocolError as exc:
                log.warning("volume %s: bad message from mount process: %s",
                            self.volume_id, exc)

    async def _read_loop(self, lines: protocol.LineBuffer) -> None:
        assert self._stream is not None
        while True:
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                await self.exited.wait()
                return
            try:
                for line in lines.feed(data):
                    self._dispatch(protocol.decode(line))
            except protocol.ProtocolError as exc:
                log.warning("volume %s: bad message from mount process: %s",
                            self.volume_id, exc)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "event" in msg:
            self.on_event(msg)
            return
        waiter = self._pending.pop(msg.get("reply"), None)  # type: ignore[arg-type]
        if waiter is not None:
            waiter[1].append(msg)
            waiter[0].set()

    async def request(self, op: str, **kw: Any) -> dict[str, Any]:
        if self._stream is None or self.exited.is_set():
            raise Failed(f"volume {self.volume_id}: mount process is not running")
        rid = self._next_id
        self._next_id += 1
        event: trio.Event = trio.Event()
        box: list[dict[str, Any]] = []
        self._pending[rid] = (event, box)
        try:
            async with self._send_lock:
                await self._stream.send_all(protocol.encode({"op": op, "id": rid, **kw}))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._pending.pop(rid, None)
            raise Failed(f"volume {self.volume_id}: mount process is not running") from None
        with trio.move_on_after(REQUEST_TIMEOUT):
            await event.wait()
        self._pending.pop(rid, None)
        if not box:
            raise Failed(f"volume {self.volume_id}: no answer to {op}")
        if not box[0].get("ok"):
            raise Failed(f"volume {self.volume_id}: {op} failed: {box[0].get('error')}")
        return box[0]

    async def set_role(self, role: str, fence: Fence | None = None) -> None:
        extra = {"token": fence.token, "until": fence.until} if fence is not None else {}
        await self.request("set_role", role=role, **extra)
        self.read_only = role == protocol.ROLE_FOLLOWER
        self.fence = fence if role == protocol.ROLE_LEADER else None

    async def extend_lease(self, fence: Fence) -> None:
        """Renew the write lease of the current term (refused after it ran out)."""
        await self.request("lease", token=fence.token, until=fence.until)
        self.fence = fence

    async def capture_begin(self) -> None:
        """Have the mount record the backing paths it mutates from now on (restarts)."""
        await self.request("capture", action="begin")

    async def capture_hold(self, max_s: float | None = None) -> dict[str, Any]:
        """Make mutations wait (at most `max_s`, default the mount's 120 s):
        {dirty_count, overflow}."""
        extra = {} if max_s is None else {"max_s": max_s}
        return await self.request("capture", action="hold", **extra)

    async def capture_dirty(self) -> tuple[list[bytes], bool]:
        """Every path recorded (relative to the cipher dir, b"" the root), and overflow: if
        true the list is incomplete and the whole tree must be rescanned."""
        paths: list[bytes] = []
        start: int | None = 0
        overflow = False
        while start is not None:
            reply = await self.request("capture", action="dirty", **{"from": start})
            paths += [os.fsencode(p) for p in reply["paths"]]
            start, overflow = reply["next"], bool(reply["overflow"])
        return paths, overflow

    async def capture_release(self) -> dict[str, Any]:
        """End hold and capture: {held_ms, waited, expired}; expired: the hold ran out
        before this, so what was copied under it is not a point in time."""
        return await self.request("capture", action="release")

    async def unmount(self, lazy: bool) -> None:
        """Unmount through the kernel; Busy if files are open and not lazy.

        After a lazy unmount the process keeps serving the files still open and exits by
        itself when the last one is closed (`draining`); it is not killed.
        """
        args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(self.mountpoint)]
        res = await trio.run_process(args, capture_stdout=True, capture_stderr=True,
                                     check=False)
        if res.returncode != 0:
            err = res.stderr.decode(errors="replace").strip()
            if "busy" in err.lower():
                raise Busy(f"volume {self.volume_id} is busy (files are open); "
                           "detach with lazy=true to detach anyway")
            if not self.exited.is_set():
                raise Failed(f"volume {self.volume_id}: unmount failed: {err}")
        with trio.move_on_after(DRAIN_GRACE if lazy else EXIT_TIMEOUT):
            await self.exited.wait()
        if not self.exited.is_set() and not lazy:
            await self.kill()

    @property
    def draining(self) -> bool:
        return not self.exited.is_set()

    async def kill(self) -> None:
        if self.proc is not None and not self.exited.is_set():
            self.proc.kill()
            with trio.move_on_after(5):
                await self.exited.wait()
