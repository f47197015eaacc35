"""Real mounts for tests: piccolofs (driven over its control channel) and gocryptfs.

Every mount is torn down in `stop()`: unmount, lazy unmount if busy, then terminate and
kill the process, each step bounded, so a failing test never leaves a mount behind.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from piccolofs import mountinfo

PASSWORD = b"correct horse battery staple"
READY_TIMEOUT = 30.0
PICCOLOFS = [sys.executable, "-m", "piccolofs"]

FLAG_SETS: dict[str, list[str]] = {
    "default": [],
    "xchacha": ["-xchacha"],
    "aessiv": ["-aessiv"],
    "plaintextnames": ["-plaintextnames"],
    "deterministic": ["-deterministic-names"],
    "longnamemax": ["-longnamemax", "100"],
}


def piccolofs_flags(gocryptfs_flags: list[str]) -> list[str]:
    return ["-" + f if f.startswith("-") and not f[1:].isdigit() else f for f in gocryptfs_flags]


def write_passfile(directory: Path) -> Path:
    pf = directory / "password"
    pf.write_bytes(PASSWORD + b"\n")
    pf.chmod(0o600)
    return pf


def is_mounted(path: Path | str) -> bool:
    return mountinfo.is_mounted(path)


def mounts_under(path: Path | str) -> list[str]:
    """Every mountpoint at or below `path` (stacked mounts once each), from mountinfo."""
    top = os.path.realpath(path)
    return [m.mountpoint for m in mountinfo.entries()
            if m.mountpoint == top or m.mountpoint.startswith(top + "/")]


def force_unmount(path: Path | str) -> None:
    for argv in (["fusermount3", "-u"], ["fusermount3", "-uz"], ["umount", "-l"]):
        if not is_mounted(path):
            return
        subprocess.run([*argv, str(path)], capture_output=True, timeout=20)


def init_piccolofs(cipher: Path, passfile: Path, flags: list[str] = ()) -> None:  # type: ignore[assignment]
    subprocess.run([*PICCOLOFS, "init", "--scryptn", "10", "--passfile", str(passfile),
                    *flags, str(cipher)], check=True, capture_output=True, timeout=60)


def init_gocryptfs(cipher: Path, passfile: Path, flags: list[str] = ()) -> None:  # type: ignore[assignment]
    cipher.mkdir(exist_ok=True)
    subprocess.run(["gocryptfs", "-init", "-q", "-scryptn", "10", "-passfile", str(passfile),
                    *flags, str(cipher)], check=True, capture_output=True, timeout=60)


class PiccoloMount:
    """`piccolofs mount --foreground --ctl-fd`, as the daemon runs it."""

    def __init__(self, cipher: Path, mnt: Path, passfile: Path, *, ro: bool = False,
                 extra: list[str] = ()) -> None:  # type: ignore[assignment]
        self.cipher, self.mnt, self.passfile = cipher, mnt, passfile
        self.ro = ro
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.events: list[dict[str, Any]] = []
        self.log_path = mnt.parent / f"{mnt.name}.log"
        self._buf = b""
        self._next_id = 1

    def start(self) -> PiccoloMount:
        self.mnt.mkdir(exist_ok=True)
        parent, child = socket.socketpair()
        cmd = [*PICCOLOFS, "mount", "--foreground", "--ctl-fd", str(child.fileno()),
               "--passfile", str(self.passfile), *self.extra]
        if self.ro:
            cmd.append("--ro")
        cmd += [str(self.cipher), str(self.mnt)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, pass_fds=(child.fileno(),), stdout=log,
                                         stderr=log, stdin=subprocess.DEVNULL)
        child.close()
        self.sock = parent
        try:
            msg = self._read_message(READY_TIMEOUT)
        except Exception:
            self.stop()
            raise
        if msg.get("event") != "ready":
            self.stop()
            raise RuntimeError(f"mount did not become ready: {msg}; log: {self.log()}")
        return self

    def _read_message(self, timeout: float) -> dict[str, Any]:
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError(f"no message from mount process; log: {self.log()}")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"mount process closed its control channel; log: {self.log()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    def request(self, op: str, timeout: float = 10.0, **kw: Any) -> dict[str, Any]:
        assert self.sock is not None
        rid = self._next_id
        self._next_id += 1
        self.sock.sendall(json.dumps({"op": op, "id": rid, **kw}).encode() + b"\n")
        return self.wait_reply(rid, timeout)

    def send_raw(self, data: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(data)

    def wait_reply(self, rid: int | None, timeout: float = 10.0) -> dict[str, Any]:
        while True:
            msg = self._read_message(timeout)
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("reply") == rid:
                return msg

    def drain_events(self, timeout: float = 0.5) -> list[dict[str, Any]]:
        try:
            while True:
                msg = self._read_message(timeout)
                if "event" in msg:
                    self.events.append(msg)
        except TimeoutError:
            pass
        return self.events

    def set_role(self, role: str) -> dict[str, Any]:
        return self.request("set_role", role=role)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        force_unmount(self.mnt)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
            force_unmount(self.mnt)
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> PiccoloMount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class GocryptfsMount:
    def __init__(self, cipher: Path, mnt: Path, passfile: Path, *, allow_other: bool = True,
                 extra: list[str] = ()) -> None:  # type: ignore[assignment]
        self.cipher, self.mnt, self.passfile = cipher, mnt, passfile
        self.allow_other = allow_other
        self.extra = list(extra)

    def start(self) -> GocryptfsMount:
        self.mnt.mkdir(exist_ok=True)
        opts = ["-allow_other"] if self.allow_other else []
        subprocess.run(["gocryptfs", "-q", "-passfile", str(self.passfile), *opts, *self.extra,
                        str(self.cipher), str(self.mnt)], check=True, capture_output=True,
                       timeout=60)
        return self

    def stop(self) -> None:
        force_unmount(self.mnt)

    def __enter__(self) -> GocryptfsMount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def have_gocryptfs() -> bool:
    return shutil.which("gocryptfs") is not None


def fsck_piccolofs(cipher: Path, passfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PICCOLOFS, "fsck", "--passfile", str(passfile), str(cipher)],
                          capture_output=True, text=True, timeout=300)


def fsck_gocryptfs(cipher: Path, passfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["gocryptfs", "-fsck", "-passfile", str(passfile), str(cipher)],
                          capture_output=True, text=True, timeout=300)
