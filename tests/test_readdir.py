"""Directory listings with and without attributes.

The kernel asks for READDIRPLUS (names with attributes, one lookup counted per entry) at the
start of a listing and where lookups follow it, and for a plain READDIR elsewhere, when the
filesystem lets it choose (a pyfuse3 with plain READDIR, packaging/pyfuse3). Either way a
listing must give the same names, the inode numbers stat(2) gives, and the right types.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pyfuse3
import pytest

from piccolofs.backing import syscalls
from piccolofs.format.aead import AesGcm
from piccolofs.format.content import BlockCodec
from piccolofs.fs.inodes import InodeTable
from tests.mounts import PiccoloMount

plain_readdir = pytest.mark.skipif(not hasattr(pyfuse3.ReaddirToken, "plus"),
                                   reason="pyfuse3 without plain READDIR")


def _forget_dentries(volume: PiccoloMount) -> None:
    """The kernel drops its unused dentries and inodes and tells the mount (FORGET), so
    the next listing starts from nothing cached; waits until the mount has forgotten
    them."""
    Path("/proc/sys/vm/drop_caches").write_text("2")
    deadline = time.monotonic() + 10
    while volume.request("stats")["inodes"] > 10 and time.monotonic() < deadline:
        time.sleep(0.02)


def _populate(d: Path, files: int) -> dict[str, int]:
    kinds = {}
    for i in range(files):
        (d / f"file-{i:05d}").write_bytes(b"")
        kinds[f"file-{i:05d}"] = stat.S_IFREG
    for i in range(15):
        (d / f"dir-{i}").mkdir()
        kinds[f"dir-{i}"] = stat.S_IFDIR
        os.symlink(f"file-{i:05d}", d / f"link-{i}")
        kinds[f"link-{i}"] = stat.S_IFLNK
    os.mkfifo(d / "fifo")
    kinds["fifo"] = stat.S_IFIFO
    return kinds


@plain_readdir
def test_a_large_listing_goes_without_attributes_and_agrees_with_stat(
        volume: PiccoloMount) -> None:
    fd = os.open(volume.cipher, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if not syscalls.listing_numbers_match_stat(fd):
            pytest.skip("backing filesystem lists only with attributes")
    finally:
        os.close(fd)
    d = volume.mnt / "big"
    d.mkdir()
    kinds = _populate(d, 3000)
    _forget_dentries(volume)
    before = volume.request("stats")
    with os.scandir(d) as it:
        entries = {e.name: e for e in it}
    after = volume.request("stats")
    assert sorted(entries) == sorted(kinds)
    assert after["readdir_plain"] > before["readdir_plain"]  # most of it: names only
    assert after["readdir_plus"] > before["readdir_plus"]  # the start: with attributes
    # A plain entry counts no lookup: the mount did not take an inode for each.
    assert after["inodes"] - before["inodes"] < len(kinds) // 2

    for name, entry in entries.items():
        st = os.stat(entry.path, follow_symlinks=False)
        assert entry.inode() == st.st_ino, name
        assert stat.S_IFMT(st.st_mode) == kinds[name], name
        assert entry.is_dir(follow_symlinks=False) == (kinds[name] == stat.S_IFDIR)
        assert entry.is_symlink() == (kinds[name] == stat.S_IFLNK)
        assert entry.is_file(follow_symlinks=False) == (kinds[name] == stat.S_IFREG)


def test_listings_after_lookups_and_changes(volume: PiccoloMount) -> None:
    """`ls -l` twice (the kernel switches a directory to READDIRPLUS once lookups follow
    its listing), then again after entries came and went."""
    d = volume.mnt / "d"
    d.mkdir()
    kinds = _populate(d, 1500)
    for _ in range(2):
        _forget_dentries(volume)
        listed = {e.name: e.stat(follow_symlinks=False) for e in os.scandir(d)}
        assert sorted(listed) == sorted(kinds)
        assert all(stat.S_IFMT(st.st_mode) == kinds[n] for n, st in listed.items())
    for i in range(0, 1500, 3):
        os.unlink(d / f"file-{i:05d}")
        del kinds[f"file-{i:05d}"]
    (d / "late").write_bytes(b"x")
    kinds["late"] = stat.S_IFREG
    _forget_dentries(volume)
    assert sorted(os.listdir(d)) == sorted(kinds)
    assert {e.name: e.inode() for e in os.scandir(d)} == {
        n: os.stat(d / n, follow_symlinks=False).st_ino for n in kinds}


def test_a_listed_entry_has_the_id_its_lookup_gets(tmp_path: Path) -> None:
    """A plain listing names inodes before any lookup: the id must be the one the lookup
    will return, also for a newcomer that reuses the backing number of a removed inode the
    kernel still holds (which gets an id of its own)."""
    root_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        table = InodeTable(root_fd, BlockCodec(AesGcm(bytes(range(32)))))
        table.max_fds = 0  # past the fd budget: a removed inode is not pinned
        dev = os.fstat(root_fd).st_dev

        def st(number: int) -> os.stat_result:
            return os.stat_result((stat.S_IFREG | 0o644, number, dev, 1, 0, 0, 0, 0, 0, 0))

        assert table.listed_node(dev, 5000) == 5000  # nothing known: the backing number
        old = table.remember(table.root, b"old", st(5000))
        assert old.node == 5000
        table.removed(table.root, b"old", st(5000))
        assert old.name is None and not old.pinned
        listed = table.listed_node(dev, 5000)  # a newcomer under the same number
        assert listed != old.node
        assert table.listed_node(dev, 5000) == listed  # stable across listings
        assert table.remember(table.root, b"new", st(5000)).node == listed
    finally:
        os.close(root_fd)
