"""The `piccolofs` command: its exit-code contract and the background mount."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psutil
import pytest

from piccolofs.exitcodes import Exit
from tests.mounts import PASSWORD, PICCOLOFS, force_unmount, init_piccolofs, is_mounted


def run(*args: str, input: bytes | None = None, pass_fds: tuple[int, ...] = ()
        ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*PICCOLOFS, *args], capture_output=True, input=input, timeout=60,
                          pass_fds=pass_fds)


@pytest.fixture
def tree(tmp_path: Path, passfile: Path) -> Path:
    cipher = tmp_path / "cipher"
    init_piccolofs(cipher, passfile)
    return cipher


def test_init_and_info(tmp_path: Path, passfile: Path) -> None:
    cipher = tmp_path / "c"
    res = run("init", "--xchacha", "--scryptn", "10", "--passfile", str(passfile), str(cipher))
    assert res.returncode == Exit.OK, res.stderr
    conf = cipher / "gocryptfs.conf"
    assert conf.stat().st_mode & 0o777 == 0o400
    assert (cipher / "gocryptfs.diriv").stat().st_mode & 0o777 == 0o444
    info = run("info", str(cipher))
    assert info.returncode == Exit.OK
    assert b"XChaCha20-Poly1305" in info.stdout and b"N=1024" in info.stdout
    assert PASSWORD not in conf.read_bytes()
    again = run("init", "--scryptn", "10", "--passfile", str(passfile), str(cipher))
    assert again.returncode == Exit.CIPHERDIR and b"not empty" in again.stderr


@pytest.mark.parametrize("args,code", [
    (["--xchacha", "--aessiv"], Exit.USAGE),
    (["--longnamemax", "61"], Exit.USAGE),
    (["--scryptn", "9"], Exit.USAGE),
])
def test_init_refusals(tmp_path: Path, passfile: Path, args: list[str], code: Exit) -> None:
    res = run("init", *args, "--passfile", str(passfile), str(tmp_path / "c"))
    assert res.returncode == code, res.stderr


def test_password_sources_and_errors(tmp_path: Path, tree: Path) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"nope\n")
    res = run("fsck", "--passfile", str(wrong), str(tree))
    assert res.returncode == Exit.PASSWORD_INCORRECT and b"password incorrect" in res.stderr
    assert b"nope" not in res.stderr
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    assert run("fsck", "--passfile", str(empty), str(tree)).returncode == Exit.PASSWORD_EMPTY
    assert run("fsck", "--passfile", str(tmp_path / "missing"), str(tree)).returncode == \
        Exit.READPASSWORD
    r, w = os.pipe()
    os.write(w, PASSWORD + b"\n")
    os.close(w)
    try:
        res = run("fsck", "--passfd", str(r), str(tree), pass_fds=(r,))
    finally:
        os.close(r)
    assert res.returncode == Exit.OK, res.stderr
    res = run("fsck", str(tree), input=PASSWORD + b"\n")  # stdin when it is not a terminal
    assert res.returncode == Exit.OK, res.stderr


def test_config_problems(tmp_path: Path, tree: Path, passfile: Path) -> None:
    conf = tree / "gocryptfs.conf"
    good = conf.read_bytes()
    conf.chmod(0o600)
    obj = json.loads(good)
    obj["FeatureFlags"].append("FutureFlag")
    conf.write_text(json.dumps(obj))
    res = run("fsck", "--passfile", str(passfile), str(tree))
    assert res.returncode == Exit.UNSUPPORTED and b"FutureFlag" in res.stderr
    conf.write_bytes(good[: len(good) // 2])
    res = run("info", str(tree))
    assert res.returncode == Exit.LOADCONF and b"truncated" in res.stderr
    conf.unlink()
    assert run("info", str(tree)).returncode == Exit.LOADCONF
    assert run("info", str(tmp_path / "nothing")).returncode == Exit.CIPHERDIR


def test_background_mount_umount_and_secrets(tmp_path: Path, tree: Path, passfile: Path) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    res = run("mount", "--passfile", str(passfile), str(tree), str(mnt))
    try:
        assert res.returncode == Exit.OK, res.stderr
        assert is_mounted(mnt)  # mount returned only once the mount was live
        (mnt / "f").write_bytes(b"background")
        procs = [p for p in psutil.process_iter(["cmdline", "environ"])
                 if p.info["cmdline"] and str(mnt) in " ".join(p.info["cmdline"])]
        assert len(procs) == 1
        flat = " ".join(procs[0].info["cmdline"]) + repr(procs[0].info["environ"])
        assert PASSWORD.decode() not in flat and str(passfile) not in flat
        busy = run("mount", "--passfile", str(passfile), str(tree), str(mnt))
        assert busy.returncode == Exit.MOUNTPOINT
        held = open(mnt / "f", "rb")
        try:
            res = run("umount", str(mnt))
            assert res.returncode == Exit.UMOUNT_FAILED and is_mounted(mnt)
        finally:
            held.close()
        assert run("umount", str(mnt)).returncode == Exit.OK
        assert not is_mounted(mnt)
        procs[0].wait(timeout=20)
    finally:
        force_unmount(mnt)
    assert run("umount", str(mnt)).returncode == Exit.UMOUNT_FAILED


def test_mount_errors(tmp_path: Path, tree: Path, passfile: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"bad\n")
    mnt = tmp_path / "m"
    mnt.mkdir()
    assert run("mount", "--passfile", str(wrong), str(tree), str(mnt)).returncode == \
        Exit.PASSWORD_INCORRECT
    assert run("mount", "--passfile", str(passfile), str(tree),
               str(tmp_path / "absent")).returncode == Exit.MOUNTPOINT
    assert not is_mounted(mnt)


def test_fsck_clean_tree(tree: Path, passfile: Path) -> None:
    res = run("fsck", "--passfile", str(passfile), str(tree))
    assert res.returncode == Exit.OK and b"no problems" in res.stderr
