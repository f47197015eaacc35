"""A real `piccolo-ctld` process on a temporary state dir, driven through its socket and CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from ctl.cli import ApiError, Client
from tests.mounts import force_unmount, is_mounted

PASSWORD = "admin password 1"
CHEAP_KDF = ["--kdf-memory", "8192", "--kdf-time", "1", "--kdf-threads", "1"]
READY_TIMEOUT = 30.0


class Daemon:
    def __init__(self, base: Path, extra: list[str] | None = None) -> None:
        self.base = base
        self.state = base / "state"
        self.run = base / "run"
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = base / "ctld.log"

    @property
    def socket(self) -> Path:
        return self.run / "ctl.sock"

    @property
    def client(self) -> Client:
        return Client(str(self.socket), timeout=60)

    def start(self, ready_timeout: float = READY_TIMEOUT) -> Daemon:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = self.base / "notify.sock"
        if notify_path.exists():
            notify_path.unlink()
        notify.bind(str(notify_path))
        notify.settimeout(ready_timeout)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        env.pop("PICCOLO_STATE_DIR", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ctl.daemon", "--state-dir", str(self.state),
                 "--run-dir", str(self.run), "--volume-scryptn", "10", *CHEAP_KDF,
                 *self.extra], stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
        try:
            msg = notify.recv(4096)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"daemon never became ready; log:\n{self.log()}") from None
        finally:
            notify.close()
            notify_path.unlink()
        assert msg == b"READY=1", msg
        return self

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.client.call(method, path, body)

    def error(self, method: str, path: str, body: dict[str, Any] | None = None
              ) -> ApiError:
        try:
            self.call(method, path, body)
        except ApiError as exc:
            return exc
        raise AssertionError(f"{method} {path} succeeded")

    def ctl_argv(self) -> list[str]:
        return [sys.executable, "-m", "ctl.cli", "--socket", str(self.socket)]

    def ctl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.ctl_argv(), *args], capture_output=True, text=True,
                              input=input, timeout=300)

    def setup_and_unlock(self) -> None:
        self.call("POST", "/crypto/setup", {"password": PASSWORD})
        self.call("POST", "/crypto/unlock", {"password": PASSWORD})

    def volume(self, vid: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/volumes/{vid}"))

    def journal(self, vid: str) -> dict[str, Any]:
        return dict(json.loads((self.state / "volumes" / vid / "state.json").read_text()))

    def mount(self, vid: str) -> Path:
        return self.state / "mounts" / vid

    def events(self, since: int = 0, topic: str | None = None) -> list[dict[str, Any]]:
        q = f"/events?since={since}" + (f"&topic={topic}" if topic else "")
        return list(self.client.stream(q))

    def wait_for(self, predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; log:\n{self.log()[-3000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def children(self) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if "piccolofs" in cmd and any(str(self.state) in c for c in cmd):
                out.append(p)
        return out

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self, release: bool = True) -> int | None:
        """SIGTERM and wait; `release` also lifts the mountpoints' write guard (for the
        temporary directory's removal) — tests that look at a stopped daemon's state keep
        it."""
        code = None
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None
        for child in self.children():
            try:
                child.wait(timeout=20)
            except psutil.TimeoutExpired:
                child.kill()
        if release:
            release_mountpoints(self.state)
            release_mountpoints(self.run, "pools")
        return code

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def release_mountpoints(state: Path, under: str = "mounts") -> None:
    """Unmount what is left and lift the mountpoints' write guard, so the test's temporary
    directory can be removed (volumes' mountpoints, or with `under="pools"` the pools')."""
    from ctl.volumes import mountpoint

    mounts = state / under
    if mounts.exists():
        for entry in os.scandir(mounts):
            m = Path(entry.path)
            if is_mounted(m):
                force_unmount(m)
            if not is_mounted(m) and entry.is_dir(follow_symlinks=False):
                mountpoint.release(m)


def volume_passphrase(state: Path, vid: str, password: str = PASSWORD) -> bytes:
    """White-box: what the daemon unseals for volume `vid` (to mount it a second time, as
    another node or an operator with the keys would)."""
    from ctl.keys.keyset import Keyset
    from ctl.volumes.metadata import VolumeMeta

    keyset = Keyset.parse((state / "crypto" / "keyset.json").read_bytes())
    sdek = keyset.open_with_password(password.encode())
    meta = VolumeMeta.parse((state / "ciphertext" / vid / "piccolo.volume.json").read_bytes())
    return bytes(meta.unseal(bytes(sdek)))


def second_mount(state: Path, vid: str, where: Path, ro: bool = False) -> Any:
    """A separate piccolofs mount of a daemon volume (another node's view of the same tree)."""
    from tests.mounts import PiccoloMount

    passfile = where.parent / f"{where.name}.pass"
    passfile.write_bytes(volume_passphrase(state, vid) + b"\n")
    return PiccoloMount(state / "ciphertext" / vid, where, passfile, ro=ro)
