"""The mount's read-ahead window.

The kernel gives a FUSE mount 128 KiB of read-ahead, so a large sequential read arrives as
128 KiB requests; the mount process raises its own window to 1 MiB (the largest request
the kernel sends) through sysfs, once the kernel has taken FUSE_INIT's reply.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from piccolofs.mount import READ_AHEAD_KIB
from tests.conftest import assert_clean_log
from tests.mounts import PiccoloMount, init_piccolofs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only root may set read-ahead")


def _bdi_read_ahead(mnt: Path) -> int:
    dev = os.stat(mnt).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    return int(bdi.read_text())


@pytest.mark.parametrize("extra, expected", [([], READ_AHEAD_KIB),
                                             (["--read-ahead", "256"], 256),
                                             (["--read-ahead", "0"], 128)])
def test_the_mount_sets_its_read_ahead(tmp_path: Path, passfile: Path, extra: list[str],
                                       expected: int) -> None:
    # A space in the mountpoint: mountinfo writes it as \040.
    cipher = tmp_path / "cipher"
    init_piccolofs(cipher, passfile)
    with PiccoloMount(cipher, tmp_path / "mnt point", passfile, extra=extra) as m:
        assert _bdi_read_ahead(m.mnt) == expected
        assert m.request("stats")["read_ahead_kib"] == expected
        data = os.urandom(5 << 20)
        (m.mnt / "big").write_bytes(data)
        fd = os.open(m.mnt / "big", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read through the mount
            got = hashlib.sha256()
            while chunk := os.read(fd, 1 << 16):
                got.update(chunk)
        finally:
            os.close(fd)
        assert got.digest() == hashlib.sha256(data).digest()
    assert_clean_log(m)


def test_a_negative_read_ahead_is_a_usage_error(tmp_path: Path, passfile: Path) -> None:
    cipher = tmp_path / "cipher"
    init_piccolofs(cipher, passfile)
    m = PiccoloMount(cipher, tmp_path / "mnt", passfile, extra=["--read-ahead", "-1"])
    with pytest.raises(EOFError):
        m.start()
    assert m.proc is not None and m.proc.wait(10) == 2
    assert "is negative" in m.log()
