"""fallocate(2) and SEEK_DATA/SEEK_HOLE on the encrypted layout, through a real mount.

They reach the filesystem only with a pyfuse3 that has the handlers (packaging/pyfuse3,
built by scripts/setup.sh); the layout arithmetic is tested without a mount as well. The
`volume` fixture checks the tree with fsck afterwards.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
from pathlib import Path

import pyfuse3
import pytest

from piccolofs.format.content import HEADER_LEN, PLAIN_BLOCK, Layout
from tests.mounts import PiccoloMount

patched = pytest.mark.skipif(not hasattr(pyfuse3.Operations, "fallocate"),
                             reason="pyfuse3 without the fallocate/lseek handlers")
KEEP_SIZE, PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(None, use_errno=True)
MIB = 1 << 20


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _backing(volume: PiccoloMount) -> Path:
    files = [p for p in volume.cipher.iterdir() if p.is_file()
             and not p.name.startswith("gocryptfs.")]
    assert len(files) == 1, files
    return files[0]


def test_layout_maps_ranges_and_offsets() -> None:
    lay = Layout(overhead=32)
    cb = PLAIN_BLOCK + 32
    assert lay.cipher_range(0, 1) == (0, HEADER_LEN + cb)
    assert lay.cipher_range(PLAIN_BLOCK, PLAIN_BLOCK + 1) == (HEADER_LEN + cb, 2 * cb)
    assert lay.block_at(0) == 0 and lay.block_at(HEADER_LEN + cb - 1) == 0
    assert lay.block_at(HEADER_LEN + cb) == 1
    assert lay.block_from(HEADER_LEN) == 0 and lay.block_from(HEADER_LEN + 1) == 1
    assert lay.block_from(HEADER_LEN + cb) == 1


@patched
def test_fallocate_grows_with_zeros_and_keep_size_only_reserves(volume: PiccoloMount) -> None:
    path = volume.mnt / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"head")
        _fallocate(fd, 0, 0, 3 * MIB + 5)  # mode 0 itself (glibc would fall back to writes)
        assert os.fstat(fd).st_size == 3 * MIB + 5
        assert os.pread(fd, 4, 0) == b"head"
        assert os.pread(fd, MIB, MIB) == bytes(MIB)
        backing = _backing(volume)
        blocks = backing.stat().st_blocks
        _fallocate(fd, KEEP_SIZE, 3 * MIB + 5, 8 * MIB)  # reserved, size unchanged
        assert os.fstat(fd).st_size == 3 * MIB + 5
        assert backing.stat().st_blocks > blocks + (7 * MIB) // 512
        assert backing.stat().st_size == Layout(32).cipher_size(3 * MIB + 5)
        with pytest.raises(OSError) as exc:
            _fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 0, PLAIN_BLOCK)
        assert exc.value.errno == errno.EOPNOTSUPP
        os.pwrite(fd, b"tail", 3 * MIB + 5)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:4] == b"head" and data[-4:] == b"tail" and len(data) == 3 * MIB + 9


@patched
def test_seek_data_and_hole_find_the_holes(volume: PiccoloMount, tmp_path: Path) -> None:
    path = volume.mnt / "sparse"
    with open(path, "wb") as f:
        f.write(b"a" * PLAIN_BLOCK)
        f.seek(4 * MIB)
        f.write(b"b" * PLAIN_BLOCK)
    size = 4 * MIB + PLAIN_BLOCK
    fd = os.open(path, os.O_RDONLY)
    try:
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
        assert PLAIN_BLOCK <= hole < 4 * MIB and hole % PLAIN_BLOCK == 0
        data = os.lseek(fd, hole, os.SEEK_DATA)
        assert hole < data <= 4 * MIB
        assert os.pread(fd, data - hole, hole) == bytes(data - hole)
        assert os.lseek(fd, 4 * MIB, os.SEEK_HOLE) == size  # only the end past the data
        with pytest.raises(OSError) as exc:
            os.lseek(fd, size, os.SEEK_DATA)
        assert exc.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "--sparse=always", str(path), str(copy)], check=True)
    assert copy.read_bytes() == path.read_bytes()
    assert copy.stat().st_blocks * 512 < MIB  # the hole stayed a hole


@patched
def test_fallocate_passes_the_read_only_gate_first(volume: PiccoloMount) -> None:
    """A file opened for writing by a leader that is then demoted: the gate answers."""
    fd = os.open(volume.mnt / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _fallocate(fd, KEEP_SIZE, 0, MIB)
        volume.set_role("follower")
        with pytest.raises(OSError) as exc:
            _fallocate(fd, KEEP_SIZE, 0, 2 * MIB)
        assert exc.value.errno == errno.EROFS
    finally:
        os.close(fd)
        volume.set_role("leader")


@patched
@pytest.mark.parametrize("fallocate", ["native", "posix"])
def test_fio_verify_jobs_pass(volume: PiccoloMount, tmp_path: Path, fallocate: str) -> None:
    """fio lays its files out with fallocate(2) (native: the call itself; posix: glibc's
    posix_fallocate) before writing, then reads every block back against its checksum.
    A data error in any block fails the job (verify_fatal)."""
    job = tmp_path / "verify.fio"
    job.write_text(f"""[global]
directory={volume.mnt}
size=24m
fallocate={fallocate}
verify=crc32c
verify_fatal=1
do_verify=1
ioengine=psync
[seq]
rw=write
bs=128k
[rand]
rw=randwrite
bs=4k
[mixed]
rw=randrw
bs=16k
""")
    # cwd: fio leaves its verify state files (local-*-verify.state) in the working directory.
    res = subprocess.run(["fio", "--output-format=json", str(job)], capture_output=True,
                         text=True, timeout=240, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    jobs = {j["jobname"]: j for j in json.loads(res.stdout[res.stdout.index("{"):])["jobs"]}
    assert set(jobs) == {"seq", "rand", "mixed"}
    for name, j in jobs.items():
        assert j["error"] == 0, (name, j["error"])
        assert j["write"]["io_bytes"] > 0, name  # it wrote, and verify read it all back
