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

from piccolofs import mountinfo
from piccolofs.mount import READ_AHEAD_KIB
from tests.conftest import assert_clean_log
from tests.mounts import PiccoloMount, init_piccolofs


def _bdi_read_ahead(mnt: Path) -> int:
    dev = os.stat(mnt).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    return int(bdi.read_text())


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may set read-ahead")
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


@pytest.mark.parametrize("value", ["-4", "3", "1022", "1048576"])
def test_a_read_ahead_the_kernel_would_not_keep_is_a_usage_error(
        tmp_path: Path, passfile: Path, value: str) -> None:
    cipher = tmp_path / "cipher"
    init_piccolofs(cipher, passfile)
    m = PiccoloMount(cipher, tmp_path / "mnt", passfile, extra=["--read-ahead", value])
    with pytest.raises(EOFError):
        m.start()
    assert m.proc is not None and m.proc.wait(10) == 2
    assert "give 0 or a multiple of 4" in m.log()


def test_mountinfo_is_read_as_the_kernel_escapes_it() -> None:
    lines = [
        "22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw",
        r"90 22 0:55 / /srv/a\040b\011c\012d\134e rw,nosuid,nodev shared:40 - "
        r"fuse.piccolofs /data/cipher\040dir rw,user_id=0,group_id=0",
        "91 90 0:56 / /srv/stacked rw - tmpfs tmpfs rw",
        "92 90 0:57 / /srv/stacked rw master:3 - fuse.piccolofs /c rw,user_id=0",
    ]
    parsed = mountinfo.parse(lines)
    assert [m.mountpoint for m in parsed] == ["/proc", "/srv/a b\tc\nd\\e", "/srv/stacked",
                                              "/srv/stacked"]
    fuse = parsed[1]
    assert (fuse.fstype, fuse.source, fuse.is_fuse, fuse.bdi) == (
        "fuse.piccolofs", "/data/cipher dir", True, "0:55")
    assert not parsed[0].is_fuse
    top = {m.mountpoint: m for m in parsed}["/srv/stacked"]
    assert (top.fstype, top.bdi) == ("fuse.piccolofs", "0:57")
