"""The inode table: FUSE node ids <-> O_PATH fds pinning backing inodes.

Node ids are the backing inode numbers (so hard links share one id and ids are stable
across remounts), except the root (always 1) and inodes that would collide or come from
another device, which get ids from a spill range. Each entry holds an O_PATH fd, so the
backing inode cannot be freed or reused while the kernel still knows its node id.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

import pyfuse3

from piccolofs.backing.files import CryptFile
from piccolofs.format.content import BlockCodec

ROOT = pyfuse3.ROOT_INODE
SPILL_BASE = 1 << 48


@dataclass(slots=True, eq=False)
class Inode:
    node: int
    fd: int
    mode: int
    lookups: int = 0
    diriv: bytes | None = None
    cfile: CryptFile | None = None
    symlink_len: int | None = None
    open_handles: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


class InodeTable:
    def __init__(self, root_fd: int, codec: BlockCodec) -> None:
        st = os.fstat(root_fd)
        self._codec = codec
        self._dev = st.st_dev
        self._root_key = (st.st_dev, st.st_ino)
        self._spill: dict[tuple[int, int], int] = {}
        self._next_spill = SPILL_BASE
        self._by_node: dict[int, Inode] = {ROOT: Inode(ROOT, root_fd, st.st_mode, lookups=1)}

    def __len__(self) -> int:
        return len(self._by_node)

    def node_for(self, st: os.stat_result) -> int:
        key = (st.st_dev, st.st_ino)
        if key == self._root_key:
            return ROOT
        if st.st_dev == self._dev and ROOT < st.st_ino < SPILL_BASE:
            return st.st_ino
        node = self._spill.get(key)
        if node is None:
            node = self._next_spill
            self._next_spill += 1
            self._spill[key] = node
        return node

    def get(self, node: int) -> Inode | None:
        return self._by_node.get(node)

    def remember(self, fd: int, st: os.stat_result, count: int = 1) -> Inode:
        """Take ownership of `fd` and count `count` lookups for its inode."""
        node = self.node_for(st)
        ino = self._by_node.get(node)
        if ino is not None:
            if fd != ino.fd:
                os.close(fd)
            ino.lookups += count
            return ino
        ino = Inode(node, fd, st.st_mode, lookups=count)
        if stat.S_ISREG(st.st_mode):
            ino.cfile = CryptFile(self._codec)
        self._by_node[node] = ino
        return ino

    def add_lookup(self, ino: Inode) -> None:
        ino.lookups += 1

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
        del self._by_node[ino.node]
        os.close(ino.fd)
        if ino.node >= SPILL_BASE:
            for key, node in list(self._spill.items()):
                if node == ino.node:
                    del self._spill[key]
                    break

    def close_all(self) -> None:
        for ino in list(self._by_node.values()):
            if ino.node != ROOT:
                os.close(ino.fd)
        self._by_node = {ROOT: self._by_node[ROOT]}
