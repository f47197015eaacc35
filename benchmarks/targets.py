"""What a benchmark runs against: a plain directory, a piccolofs mount, and the peers — a
gocryptfs mount and a securefs mount — all over the same backing store, set up and torn
down by the suite."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from piccolofs.atomic import syncfs

PASSWORD = b"benchmark password\n"


@dataclass
class Target:
    name: str
    root: Path  # where the workload runs
    backing: Path  # where the bytes land
    pid: int | None = None  # the mount process, for RSS and CPU
    notes: list[str] = field(default_factory=list)

    def process(self) -> psutil.Process | None:
        return psutil.Process(self.pid) if self.pid else None

    def reset_peak_rss(self) -> None:
        if self.pid:
            with contextlib.suppress(OSError):
                Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def peak_rss(self) -> int | None:
        if not self.pid:
            return None
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return None

    def cpu_seconds(self) -> float | None:
        proc = self.process()
        if proc is None:
            return None
        t = proc.cpu_times()
        return t.user + t.system


def drop_caches(*paths: Path) -> None:
    """Write back the filesystems holding `paths` in order (the mount, then its backing
    store; every filesystem without any), then drop the page cache: a cold start. Only the
    filesystems that matter, where named, so that a hung one elsewhere on the machine does
    not hang the benchmark."""
    if not paths:
        os.sync()
    for path in paths:
        syncfs(path)
    Path("/proc/sys/vm/drop_caches").write_text("3")


def _mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _unmount(path: Path) -> None:
    for args in (["fusermount3", "-u"], ["fusermount3", "-uz"], ["umount", "-l"]):
        if not _mounted(path):
            return
        subprocess.run([*args, str(path)], capture_output=True, timeout=60)


def _pid_of(mountpoint: Path, needle: str) -> int | None:
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if needle in " ".join(cmd) and str(mountpoint) in cmd:
            return int(p.pid)
    return None


@contextlib.contextmanager
def backing_store(disk: str | None, size: str = "24g") -> Iterator[Path]:
    """A tmpfs (default) or a directory on a disk, removed afterwards."""
    if disk:
        base = Path(tempfile.mkdtemp(prefix="piccolofs-bench-", dir=disk))
        try:
            yield base
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return
    base = Path(tempfile.mkdtemp(prefix="piccolofs-bench-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(base)],
                   check=True)
    try:
        yield base
    finally:
        subprocess.run(["umount", "-l", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def target(kind: str, base: Path, sources: dict[str, Path] | None = None) -> Iterator[Target]:
    """`kind` is plain, gocryptfs, piccolofs, or piccolofs@LABEL: the piccolofs code found
    in sources[LABEL] (a checkout of an earlier revision, for before/after numbers)."""
    work = base / kind.replace("@", "-at-")
    work.mkdir()
    if kind == "plain":
        data = work / "data"
        data.mkdir()
        try:
            yield Target("plain", data, data)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    cipher, mnt, passfile = work / "cipher", work / "mnt", work / "pass"
    passfile.write_bytes(PASSWORD)
    mnt.mkdir()
    if kind.startswith("piccolofs"):
        env = dict(os.environ)
        if "@" in kind:
            env["PYTHONPATH"] = str((sources or {})[kind.split("@", 1)[1]])
        # PYTHONPATH, not the current directory, decides which code runs (older revisions
        # start their mount process in the caller's cwd).
        cmd = [sys.executable, "-P", "-m", "piccolofs"]
        subprocess.run([*cmd, "init", "--scryptn", "10", "--passfile", str(passfile),
                        str(cipher)], check=True, capture_output=True, env=env, cwd=work)
        subprocess.run([*cmd, "mount", "--passfile", str(passfile), str(cipher), str(mnt)],
                       check=True, capture_output=True, env=env, cwd=work)
        pid = _pid_of(mnt, "piccolofs")
        notes = ["allow_other+default_permissions (as root)"]
    elif kind == "gocryptfs":
        cipher.mkdir()
        subprocess.run(["gocryptfs", "-init", "-q", "-scryptn", "10", "-passfile",
                        str(passfile), str(cipher)], check=True, capture_output=True)
        # -allow_other also turns on default_permissions: like with like.
        subprocess.run(["gocryptfs", "-q", "-allow_other", "-passfile", str(passfile),
                        str(cipher), str(mnt)], check=True, capture_output=True)
        pid = _pid_of(mnt, "gocryptfs")
        notes = ["-allow_other (implies default_permissions)"]
    elif kind == "securefs":
        cipher.mkdir()
        key = work / "key"
        key.write_bytes(PASSWORD)  # a key file: no password on the command line
        subprocess.run(["securefs", "create", "--keyfile", str(key), str(cipher)],
                       check=True, capture_output=True, stdin=subprocess.DEVNULL)
        subprocess.run(["securefs", "mount", "-b", "--keyfile", str(key), "-o", "allow_other",
                        "-o", "default_permissions", str(cipher), str(mnt)],
                       check=True, capture_output=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not _mounted(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = _pid_of(mnt, "securefs")
        notes = ["Debian's defaults (format 4, 30 s attribute cache), allow_other + "
                 "default_permissions"]
    else:
        raise ValueError(kind)
    try:
        yield Target(kind, mnt, cipher, pid, notes)
    finally:
        _unmount(mnt)
        deadline = time.monotonic() + 30
        while pid and psutil.pid_exists(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(work, ignore_errors=True)
