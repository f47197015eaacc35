"""Tampered or truncated ciphertext: EIO on exactly the affected blocks, never wrong bytes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.conftest import assert_clean_log
from tests.mounts import PiccoloMount, fsck_piccolofs, init_piccolofs

pytestmark = pytest.mark.integrity

BLOCK = 4096
CBS = 4096 + 32


def _backing_file(cipher: Path) -> Path:
    files = [p for p in cipher.iterdir() if p.is_file() and not p.name.startswith("gocryptfs.")]
    assert len(files) == 1
    return files[0]


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x20]))


@pytest.fixture
def five_blocks(tmp_path: Path, passfile: Path) -> tuple[Path, Path, bytes]:
    cipher = tmp_path / "cipher"
    init_piccolofs(cipher, passfile)
    data = os.urandom(5 * BLOCK)
    with PiccoloMount(cipher, tmp_path / "mnt", passfile) as m:
        (m.mnt / "victim").write_bytes(data)
    return cipher, passfile, data


def _read_blocks(path: Path) -> dict[int, bytes | int]:
    out: dict[int, bytes | int] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        for b in range(5):
            try:
                out[b] = os.pread(fd, BLOCK, b * BLOCK)
            except OSError as exc:
                out[b] = exc.errno or 0
    finally:
        os.close(fd)
    return out


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_one_flipped_byte_fails_exactly_that_block(
        five_blocks: tuple[Path, Path, bytes], tmp_path: Path, where: str) -> None:
    cipher, passfile, data = five_blocks
    inner = {"nonce": 3, "ciphertext": 16 + 1000, "tag": CBS - 2}[where]
    _flip(_backing_file(cipher), 18 + 2 * CBS + inner)
    with PiccoloMount(cipher, tmp_path / "mnt2", passfile) as m:
        got = _read_blocks(m.mnt / "victim")
        inode = os.stat(m.mnt / "victim").st_ino
        events = m.drain_events()
    assert got[2] == errno.EIO
    for b in (0, 1, 3, 4):
        assert got[b] == data[b * BLOCK : (b + 1) * BLOCK]
    warnings = [ln for ln in m.log().splitlines() if "integrity:" in ln]
    assert warnings and all(f"inode {inode} block 2 " in ln for ln in warnings)
    assert {"event": "integrity", "inode": inode, "block": 2} in events
    assert_clean_log(m, allow_integrity=True)
    res = fsck_piccolofs(cipher, passfile)
    assert res.returncode == 26 and "/victim: block 2 fails authentication" in res.stdout


def test_swapped_blocks_and_bad_header_give_eio(five_blocks: tuple[Path, Path, bytes],
                                                 tmp_path: Path) -> None:
    cipher, passfile, _ = five_blocks
    victim = _backing_file(cipher)
    raw = bytearray(victim.read_bytes())
    b1, b3 = raw[18 + CBS : 18 + 2 * CBS], raw[18 + 3 * CBS : 18 + 4 * CBS]
    raw[18 + CBS : 18 + 2 * CBS], raw[18 + 3 * CBS : 18 + 4 * CBS] = b3, b1
    victim.write_bytes(bytes(raw))
    with PiccoloMount(cipher, tmp_path / "m1", passfile) as m:
        got = _read_blocks(m.mnt / "victim")
    assert got[1] == errno.EIO and got[3] == errno.EIO and isinstance(got[0], bytes)
    raw[0:2] = b"\x00\x09"
    victim.write_bytes(bytes(raw))
    with PiccoloMount(cipher, tmp_path / "m2", passfile) as m:
        got = _read_blocks(m.mnt / "victim")
    assert all(v == errno.EIO for v in got.values())
    assert "bad header" in fsck_piccolofs(cipher, passfile).stdout


def test_truncated_ciphertext(five_blocks: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    cipher, passfile, data = five_blocks
    victim = _backing_file(cipher)
    os.truncate(victim, 18 + 4 * CBS + 100)  # last block cut short
    with PiccoloMount(cipher, tmp_path / "m", passfile) as m:
        p = m.mnt / "victim"
        assert os.stat(p).st_size == 4 * BLOCK + 100 - 32
        fd = os.open(p, os.O_RDONLY)
        try:
            assert os.pread(fd, BLOCK, 0) == data[:BLOCK]
            with pytest.raises(OSError) as e:
                os.pread(fd, BLOCK, 4 * BLOCK)
            assert e.value.errno == errno.EIO
        finally:
            os.close(fd)
    os.truncate(victim, 18 + 4 * CBS + 10)  # a fragment too short to be a block
    res = fsck_piccolofs(cipher, passfile)
    assert res.returncode == 26 and "trailing fragment" in res.stdout


def test_tampered_symlink_xattr_and_name(tmp_path: Path, passfile: Path) -> None:
    cipher = tmp_path / "cipher"
    init_piccolofs(cipher, passfile)
    with PiccoloMount(cipher, tmp_path / "mnt", passfile) as m:
        os.symlink("the-target", m.mnt / "link")
        (m.mnt / "file").write_bytes(b"x")
        os.setxattr(m.mnt / "file", "user.attr", b"secret value")
        (m.mnt / "other").write_bytes(b"y")
        link_ino = os.lstat(m.mnt / "link").st_ino
        file_ino = os.stat(m.mnt / "file").st_ino
        other_ino = os.stat(m.mnt / "other").st_ino
    by_ino = {p.lstat().st_ino: p for p in cipher.iterdir()}
    link, file, other = by_ino[link_ino], by_ino[file_ino], by_ino[other_ino]
    target = os.readlink(link)
    os.unlink(link)
    os.symlink(target[:-3] + ("A" if target[-3] != "A" else "B") + target[-2:], link)
    (xname,) = os.listxattr(file)
    value = bytearray(os.getxattr(file, xname))
    value[-1] ^= 1
    os.setxattr(file, xname, bytes(value))
    other.rename(other.with_name("Z" + other.name[1:] if other.name[0] != "Z"
                                 else "Y" + other.name[1:]))
    with PiccoloMount(cipher, tmp_path / "mnt2", passfile) as m:
        with pytest.raises(OSError) as e:
            os.readlink(m.mnt / "link")
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError) as e:
            os.getxattr(m.mnt / "file", "user.attr")
        assert e.value.errno == errno.EIO
        assert "other" not in os.listdir(m.mnt)  # an undecodable name is hidden, not shown
        assert (m.mnt / "file").read_bytes() == b"x"
    out = fsck_piccolofs(cipher, passfile).stdout
    assert "/link: symlink target fails authentication" in out
    assert "xattr 'user.attr' fails authentication" in out
