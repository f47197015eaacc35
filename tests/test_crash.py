"""Abrupt endings: kill -9 of a writer, forced unmount, kill -9 of the mount process."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.mounts import PiccoloMount, force_unmount, fsck_piccolofs, is_mounted

WRITER = r"""
import os, sys, random
path = sys.argv[1]
rng = random.Random(0)
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
print("started", flush=True)
while True:
    os.pwrite(fd, rng.randbytes(rng.randrange(1, 70000)), rng.randrange(0, 1 << 20))
    if rng.random() < 0.05:
        os.ftruncate(fd, rng.randrange(0, 1 << 20))
"""


def _start_writer(path: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
    time.sleep(0.5)
    return proc


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


def _bystanders(root: Path) -> dict[str, str]:
    (root / "keep").mkdir()
    out = {}
    for i in range(5):
        data = os.urandom(10_000 * (i + 1))
        (root / "keep" / f"f{i}").write_bytes(data)
        out[f"keep/f{i}"] = hashlib.sha256(data).hexdigest()
    return out


def _check(root: Path, expected: dict[str, str]) -> None:
    for name, digest in expected.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest


def test_kill_writer(volume: PiccoloMount) -> None:
    expected = _bystanders(volume.mnt)
    writer = _start_writer(volume.mnt / "victim")
    _kill(writer)
    _check(volume.mnt, expected)
    (volume.mnt / "victim").read_bytes()  # every block still authenticates
    volume.stop()
    res = fsck_piccolofs(volume.cipher, volume.passfile)
    assert res.returncode == 0, res.stdout
    volume.start()


def test_forced_unmount_under_a_writer(volume: PiccoloMount) -> None:
    expected = _bystanders(volume.mnt)
    writer = _start_writer(volume.mnt / "victim")
    subprocess.run(["fusermount3", "-uz", str(volume.mnt)], check=True, timeout=20)
    assert not is_mounted(volume.mnt)
    _kill(writer)
    assert volume.proc is not None
    assert volume.proc.wait(timeout=30) == 0  # the session ends once the last user is gone
    res = fsck_piccolofs(volume.cipher, volume.passfile)
    assert res.returncode == 0, res.stdout
    volume.stop()
    volume.start()
    _check(volume.mnt, expected)


def test_kill_mount_process(volume: PiccoloMount) -> None:
    expected = _bystanders(volume.mnt)
    writer = _start_writer(volume.mnt / "victim")
    assert volume.proc is not None
    volume.proc.send_signal(signal.SIGKILL)
    volume.proc.wait(timeout=10)
    _kill(writer)
    assert is_mounted(volume.mnt)  # a dead session leaves a stale mount ...
    try:
        os.stat(volume.mnt / "keep")
    except OSError as exc:
        assert exc.errno == 107  # ENOTCONN: ... that answers ENOTCONN, never stale data
    force_unmount(volume.mnt)
    res = fsck_piccolofs(volume.cipher, volume.passfile)
    assert res.returncode == 0, res.stdout
    volume.stop()
    volume.start()
    _check(volume.mnt, expected)
