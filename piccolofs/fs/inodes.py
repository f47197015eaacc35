"""The inode table: FUSE node ids <-> backing inodes.

Node ids are the backing inode numbers (hard links share one id and ids survive remounts),
except the root (always 1) and inodes that would collide or come from another device, which
get ids from a spill range.

Each known inode records where it lives — its parent's inode and its backing name — and is
reached through its parent's directory fd. O_PATH fds on the inodes themselves are opened on
demand (always with O_NOFOLLOW, and checked against the recorded device and inode number) and
kept in an LRU cache of bounded size, so a directory of 100,000 files costs no more file
descriptors than a small one. An inode whose last known name is removed while the kernel
still holds it is *pinned*: its fd is opened before the removal and kept until forget.
"""

from __future__ import annotations

import collections
import errno
import os
import resource
import stat
from dataclasses import dataclass

import pyfuse3

from piccolofs.backing import syscalls
from piccolofs.backing.files import CryptFile
from piccolofs.format.content import BlockCodec

ROOT = pyfuse3.ROOT_INODE
SPILL_BASE = 1 << 48


@dataclass(slots=True, eq=False)
class Inode:
    node: int
    key: tuple[int, int]  # (st_dev, st_ino) of the backing inode
    mode: int
    parent: Inode | None
    name: bytes | None  # backing name in parent; None once removed
    lookups: int = 0
    fd: int = -1
    pinned: bool = False
    diriv: bytes | None = None
    cfile: CryptFile | None = None
    symlink_len: int | None = None
    open_handles: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


def _fd_budget() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, min(16384, soft // 4))


class InodeTable:
    def __init__(self, root_fd: int, codec: BlockCodec, max_fds: int | None = None) -> None:
        st = os.fstat(root_fd)
        self._codec = codec
        self._dev = st.st_dev
        self._root_key = (st.st_dev, st.st_ino)
        self._spill: dict[tuple[int, int], int] = {}
        self._next_spill = SPILL_BASE
        root = Inode(ROOT, self._root_key, st.st_mode, None, b".", lookups=1, fd=root_fd,
                     pinned=True)
        self.root = root
        self._by_node: dict[int, Inode] = {ROOT: root}
        self._lru: collections.OrderedDict[int, Inode] = collections.OrderedDict()
        self.max_fds = max_fds or _fd_budget()
        self._pinned = 0

    def __len__(self) -> int:
        return len(self._by_node)

    @property
    def open_fds(self) -> int:
        return len(self._lru) + self._pinned

    def node_for(self, st: os.stat_result) -> int:
        return self.node_for_key(st.st_dev, st.st_ino)

    def node_for_key(self, dev: int, ino: int) -> int:
        key = (dev, ino)
        if key == self._root_key:
            return ROOT
        node = self._spill.get(key)
        if node is not None:
            return node
        if dev == self._dev and ROOT < ino < SPILL_BASE:
            return ino
        return self._spill_node(key)

    def listed_node(self, dev: int, ino: int) -> int:
        """The id a plain listing reports for a backing entry: the one a lookup of it will
        return. `remember` gives a newcomer that reuses the backing number of a removed
        inode the kernel still holds an id of its own; that id is taken here already."""
        node = self.node_for_key(dev, ino)
        old = self._by_node.get(node)
        if old is not None and old.key == (dev, ino) and old.name is None and not old.pinned:
            return self._spill_node((dev, ino))
        return node

    def _spill_node(self, key: tuple[int, int]) -> int:
        node = self._next_spill
        self._next_spill += 1
        self._spill[key] = node
        return node

    def get(self, node: int) -> Inode | None:
        return self._by_node.get(node)

    # -- file descriptors ------------------------------------------------------------------
    def fd(self, ino: Inode) -> int:
        """An O_PATH fd on the inode itself, verified to be the inode we know."""
        if ino.fd >= 0:
            if not ino.pinned:
                self._lru.move_to_end(ino.node)
            return ino.fd
        if ino.parent is None or ino.name is None:
            raise OSError(errno.ESTALE, "inode has no name left")
        fd = syscalls.open_path(self.fd(ino.parent), ino.name)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != ino.key:
            os.close(fd)
            raise OSError(errno.ESTALE, "backing entry was replaced")
        ino.fd = fd
        self._lru[ino.node] = ino
        while len(self._lru) > self.max_fds:
            _, old = self._lru.popitem(last=False)
            os.close(old.fd)
            old.fd = -1
        return fd

    def parent_fd(self, ino: Inode) -> int:
        assert ino.parent is not None
        return self.fd(ino.parent)

    def stat(self, ino: Inode) -> os.stat_result:
        """Current attributes; through the parent when no fd is cached (one syscall)."""
        if ino.fd >= 0 or ino.parent is None or ino.name is None:
            return os.fstat(self.fd(ino))
        st = os.stat(ino.name, dir_fd=self.fd(ino.parent), follow_symlinks=False)
        if (st.st_dev, st.st_ino) != ino.key:
            raise OSError(errno.ESTALE, "backing entry was replaced")
        return st

    def pin(self, ino: Inode) -> None:
        """Keep the inode reachable after its name goes away (open or still known)."""
        if ino.pinned:
            return
        self.fd(ino)
        self._lru.pop(ino.node, None)
        ino.pinned = True
        self._pinned += 1

    # -- lookups ---------------------------------------------------------------------------
    def remember(self, parent: Inode, name: bytes, st: os.stat_result,
                 count: int = 1) -> Inode:
        """Record (or refresh) the inode found at `name` in `parent`; count lookups."""
        key = (st.st_dev, st.st_ino)
        node = self.node_for(st)
        ino = self._by_node.get(node)
        if ino is not None and ino.key == key and ino.name is None and not ino.pinned:
            # Removed without being pinned, and the kernel has not forgotten it yet: the
            # backing store reused its number for a new entry. The kernel must never see
            # two files under one id, so the newcomer gets an id of its own.
            node, ino = self._spill_node(key), None
        if ino is not None and ino.key == key:
            ino.lookups += count
            if ino.name is None or not ino.pinned:
                ino.parent, ino.name = parent, name
            return ino
        ino = Inode(node, key, st.st_mode, parent, name, lookups=count)
        if stat.S_ISREG(st.st_mode):
            ino.cfile = CryptFile(self._codec)
        self._by_node[node] = ino
        return ino

    def moved(self, ino: Inode, parent: Inode, name: bytes) -> None:
        ino.parent, ino.name = parent, name

    def removed(self, parent: Inode, name: bytes, st: os.stat_result) -> None:
        """Call *before* removing `name`: the inode is pinned (its fd opened first), so it
        stays readable through what the kernel still holds (open files, O_PATH fds, a cwd)
        and its number cannot be reused. Past the fd budget only open inodes are pinned;
        the others become unreachable (ESTALE) and a reuse of their number gets a new id."""
        ino = self._by_node.get(self.node_for(st))
        if ino is None or ino.key != (st.st_dev, st.st_ino):
            return
        if ino.open_handles > 0 or ino.is_dir or self._pinned < self.max_fds:
            self.pin(ino)
        if ino.parent is parent and ino.name == name:
            ino.name = None

    def forget(self, node: int, count: int) -> None:
        ino = self._by_node.get(node)
        if ino is None or node == ROOT:
            return
        ino.lookups -= count
        if ino.lookups <= 0 and ino.open_handles == 0:
            self._drop(ino)

    def release_handle(self, ino: Inode) -> None:
        ino.open_handles -= 1
        if ino.lookups <= 0 and ino.open_handles == 0 and ino.node != ROOT:
            self._drop(ino)

    def _drop(self, ino: Inode) -> None:
        if self._by_node.get(ino.node) is not ino:
            return
        del self._by_node[ino.node]
        self._lru.pop(ino.node, None)
        if ino.pinned:
            ino.pinned = False
            self._pinned -= 1
        if ino.fd >= 0:
            os.close(ino.fd)
            ino.fd = -1
        if ino.node >= SPILL_BASE and self._spill.get(ino.key) == ino.node:
            del self._spill[ino.key]

    def close_all(self) -> None:
        for ino in list(self._by_node.values()):
            if ino.node != ROOT and ino.fd >= 0:
                os.close(ino.fd)
                ino.fd = -1
        self._lru.clear()
        self._pinned = 0
        self._by_node = {ROOT: self.root}
