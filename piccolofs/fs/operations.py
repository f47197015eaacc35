"""pyfuse3 Operations for one encrypted tree.

Every handler is wrapped by `fuse_op` (errno mapping) and, where it mutates, passes the gate
first (a capture's hold, then the read-only gate) and records what it changes for a capture
(piccolofs.fs.capture). Handlers do their backing I/O inline: each runs to completion on the
event loop without yielding, which makes one request's read-modify-write atomic with
respect to every other request. Only fsync, whose latency is the disk's, goes to a thread
(`_sync_to_store`, which lets another worker read requests meanwhile).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from piccolofs.backing import dirs, syscalls
from piccolofs.backing.files import CryptFile
from piccolofs.format.content import BlockAuthError
from piccolofs.format.errors import CorruptHeader, FormatError
from piccolofs.format.names import (
    DIRIV_NAME,
    NAME_MAX,
    RMDIR_ARTIFACT_PREFIX,
    ZERO_IV,
    BackingName,
)
from piccolofs.format.volume import VolumeCrypto
from piccolofs.fs.capture import Capture
from piccolofs.fs.errors import Counters, fail, fuse_op
from piccolofs.fs.inodes import ROOT, Inode, InodeTable
from piccolofs.fs.request_wait import RequestWaiter

log = logging.getLogger("piccolofs.fs")

ACL_XATTRS = frozenset({"system.posix_acl_access", "system.posix_acl_default"})
CAPABILITY_XATTR = "security.capability"
XATTR_NAME_MAX = 255
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR
_PASS_FLAGS = os.O_SYNC | os.O_DSYNC
DOT_ENTRIES = 2


@dataclass(slots=True, eq=False)
class FileHandle:
    ino: Inode
    fd: int
    append: bool
    writable: bool


@dataclass(slots=True, eq=False)
class DirHandle:
    ino: Inode
    entries: list[dirs.Entry] | None = None


IntegrityReporter = Callable[[dict[str, Any]], None]


def _dirent(node: int, kind: int) -> pyfuse3.EntryAttributes:
    """What a plain READDIR reports of an entry: its number and file type."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = node
    a.st_mode = kind
    return a


class PiccoloOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False
    # A pyfuse3 with plain READDIR (packaging/pyfuse3) lets the kernel list without
    # attributes where no lookups follow (set per backing filesystem in __init__); others
    # ignore the attribute.
    enable_readdirplus_auto = False

    def __init__(
        self,
        volume: VolumeCrypto,
        root_fd: int,
        *,
        read_only: bool = False,
        timeout: float = 1.0,
        report: IntegrityReporter | None = None,
    ) -> None:
        super().__init__()
        self.volume = volume
        self.names = volume.names
        self.read_only = read_only
        # A leader's write lease (time.monotonic): mutations are refused from this instant
        # on, whatever the parent does or fails to do. None: no lease (a single node).
        self.lease_until: float | None = None
        self.timeout = timeout
        self.inodes = InodeTable(root_fd, volume.blocks)
        self._handles: dict[int, FileHandle | DirHandle] = {}
        self._next_fh = 1
        self._report = report or (lambda event: None)
        self._as_root = os.geteuid() == 0
        self.counters = Counters
        self.requests = RequestWaiter()
        self.listings = {"readdir_plus": 0, "readdir_plain": 0}  # requests, for stats
        self.capture = Capture()
        self._fsync_free = syscalls.fsync_is_free(root_fd)
        self.enable_readdirplus_auto = syscalls.listing_numbers_match_stat(root_fd)
        self.initialized = trio.Event()

    def init(self) -> None:
        """FUSE_INIT has arrived: the kernel mount answers requests from here on. Readiness
        is learnt here, never by a stat of our own mountpoint, which would hang for ever
        if the session ended before it was answered."""
        self.initialized.set()

    # ---------------------------------------------------------------------------------
    # gate, lookup helpers
    # ---------------------------------------------------------------------------------
    def set_read_only(self, read_only: bool) -> None:
        """Flip the gate live; mutations already running finish, new ones see EROFS."""
        self.read_only = read_only

    @property
    def cache_timeout(self) -> float:
        """A follower's backing store changes underneath it (the leader writes, replication
        delivers), so a follower lets the kernel cache nothing; a leader is the only writer."""
        return 0.0 if self.read_only else self.timeout

    async def _sync_to_store(self, fn: Callable[[int], None], fd: int) -> None:
        """fsync/fdatasync, the one place a handler yields: its latency is the disk's. On a
        memory filesystem it returns at once, and a thread would only add two wake-ups."""
        if self._fsync_free:
            fn(fd)
            return
        with self.requests.offload():
            await trio.to_thread.run_sync(fn, fd)

    async def _writable(self) -> None:
        """The gate every mutation passes first: a handler already past it finishes, none
        starts once the role is follower or the write lease has run out. During a capture's
        hold it waits, and only then checks the role, which may have changed meanwhile."""
        if self.capture.held:
            with self.requests.offload():  # another worker reads requests meanwhile
                await self.capture.wait()
        if self.read_only or (self.lease_until is not None
                              and time.monotonic() >= self.lease_until):
            raise fail(errno.EROFS)

    def _fd(self, ino: Inode) -> int:
        return self.inodes.fd(ino)

    def _inode(self, node: int) -> Inode:
        ino = self.inodes.get(node)
        if ino is None:
            raise fail(errno.ESTALE)
        return ino

    def _dir(self, node: int) -> Inode:
        ino = self._inode(node)
        if not ino.is_dir:
            raise fail(errno.ENOTDIR)
        return ino

    def _diriv(self, ino: Inode) -> bytes:
        if not self.volume.dir_iv:
            return ZERO_IV
        if ino.diriv is None:
            ino.diriv = dirs.read_diriv(self._fd(ino))
        return ino.diriv

    def _bname(self, parent: Inode, name: bytes, creating: bool = False) -> BackingName:
        if len(name) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        if self.names.plaintext_names and parent.node == ROOT and \
                self.names.is_hidden(name, in_root=True):
            raise fail(errno.EPERM if creating else errno.ENOENT)
        return self.names.backing_name(self._diriv(parent), name)

    def _new_id(self, obj: FileHandle | DirHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = obj
        return fh

    def _file(self, fh: int) -> FileHandle:
        h = self._handles.get(fh)
        if not isinstance(h, FileHandle):
            raise fail(errno.EBADF)
        return h

    # ---------------------------------------------------------------------------------
    # attributes
    # ---------------------------------------------------------------------------------
    def _symlink_len(self, ino: Inode) -> int:
        if ino.symlink_len is None:
            ino.symlink_len = len(self.volume.open_symlink(self._readlink_raw(ino)))
        return ino.symlink_len

    def _readlink_raw(self, ino: Inode) -> bytes:
        if ino.fd < 0 and ino.parent is not None and ino.name is not None:
            return os.readlink(ino.name, dir_fd=self._fd(ino.parent))
        return os.readlink(b"", dir_fd=self._fd(ino))

    def _attr(self, ino: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino.node
        a.generation = 0
        a.entry_timeout = a.attr_timeout = self.cache_timeout
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        if stat.S_ISREG(st.st_mode):
            a.st_size = self.volume.blocks.layout.plain_size(st.st_size)
        elif stat.S_ISLNK(st.st_mode):
            try:
                a.st_size = self._symlink_len(ino)
            except FormatError:
                a.st_size = st.st_size
        else:
            a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _lookup_backing(self, parent: Inode, backing: bytes) -> pyfuse3.EntryAttributes:
        """Find the backing entry (one fstatat, no fd kept) and count one lookup for it."""
        st = os.stat(backing, dir_fd=self._fd(parent), follow_symlinks=False)
        ino = self.inodes.remember(parent, backing, st)
        return self._attr(ino, st)

    def _owner(self, parent: Inode, ctx: pyfuse3.RequestContext) -> tuple[int, int] | None:
        """Owner for a new entry: the caller, group per the parent's set-gid bit."""
        if not self._as_root:
            return None
        gid = ctx.gid
        pst = os.fstat(self._fd(parent))
        if pst.st_mode & stat.S_ISGID:
            gid = pst.st_gid
        return ctx.uid, gid

    def _chown_new(self, fd: int, owner: tuple[int, int] | None, mode: int = 0) -> None:
        """Give a new entry its owner. chown clears set-user/group-ID bits of non-directories,
        so those are put back afterwards (`mode`: the mode the entry was created with)."""
        if owner is None:
            return
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != owner:
            syscalls.fchown_empty(fd, *owner)
            special = stat.S_IMODE(mode) & (stat.S_ISUID | stat.S_ISGID)
            if special and not stat.S_ISLNK(st.st_mode) and not stat.S_ISDIR(st.st_mode):
                os.chmod(syscalls.proc_path(fd), stat.S_IMODE(mode))

    # ---------------------------------------------------------------------------------
    # lookups and attributes
    # ---------------------------------------------------------------------------------
    @fuse_op
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._dir(parent_inode)
        bn = self._bname(parent, name)
        try:
            return self._lookup_backing(parent, bn.name)
        except FileNotFoundError:
            raise fail(errno.ENOENT) from None

    @fuse_op
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for node, count in inode_list:
            self.inodes.forget(node, count)

    @fuse_op
    async def getattr(self, inode: int,
                      ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        ino = self._inode(inode)
        return self._attr(ino, self.inodes.stat(ino))

    @fuse_op
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._writable()
        ino = self._inode(inode)
        self.capture.touch(ino)
        if fields.update_size:
            if ino.is_dir:
                raise fail(errno.EISDIR)
            if not ino.is_reg or ino.cfile is None:
                raise fail(errno.EINVAL)
            handle = self._handles.get(fh) if fh is not None else None
            if isinstance(handle, FileHandle) and handle.writable:
                ino.cfile.truncate(handle.fd, attr.st_size)
            else:
                fd = syscalls.reopen(self._fd(ino), os.O_RDWR)
                try:
                    ino.cfile.truncate(fd, attr.st_size)
                finally:
                    os.close(fd)
        if fields.update_mode:
            if ino.is_symlink:
                raise fail(errno.EOPNOTSUPP)
            os.chmod(syscalls.proc_path(self._fd(ino)), stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            syscalls.fchown_empty(
                self._fd(ino),
                attr.st_uid if fields.update_uid else -1,
                attr.st_gid if fields.update_gid else -1,
            )
        if fields.update_atime or fields.update_mtime:
            syscalls.utimens_empty(
                self._fd(ino),
                attr.st_atime_ns if fields.update_atime else None,
                attr.st_mtime_ns if fields.update_mtime else None,
            )
        return self._attr(ino, self.inodes.stat(ino))

    @fuse_op
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        ino = self._inode(inode)
        if not ino.is_symlink:
            raise fail(errno.EINVAL)
        target = self.volume.open_symlink(self._readlink_raw(ino))
        ino.symlink_len = len(target)
        return target

    # ---------------------------------------------------------------------------------
    # creating entries
    # ---------------------------------------------------------------------------------
    def _create_entry(self, parent: Inode, name: bytes,
                      make: Callable[[BackingName], None]) -> BackingName:
        """Write a long name's companion, run `make`, and undo the companion on failure.
        (The caller has passed the gate.)"""
        bn = self._bname(parent, name, creating=True)
        self.capture.entry(parent, bn.name)
        dirs.write_companion(self._fd(parent), bn)
        try:
            make(bn)
        except BaseException:
            if bn.companion is not None:
                try:
                    os.lstat(bn.name, dir_fd=self._fd(parent))
                except FileNotFoundError:
                    dirs.remove_companion(self._fd(parent), bn)
            raise
        return bn

    @fuse_op
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._writable()
        parent = self._dir(parent_inode)
        owner = self._owner(parent, ctx)

        def make(bn: BackingName) -> None:
            os.mknod(bn.name, mode, rdev, dir_fd=self._fd(parent))

        bn = self._create_entry(parent, name, make)
        attr = self._lookup_backing(parent, bn.name)
        ino = self._inode(attr.st_ino)
        self._chown_new(self._fd(ino), owner, mode)
        return self._attr(ino, self.inodes.stat(ino))

    @fuse_op
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._writable()
        parent = self._dir(parent_inode)
        owner = self._owner(parent, ctx)
        want = stat.S_IMODE(mode)

        def make(bn: BackingName) -> None:
            os.mkdir(bn.name, want | 0o700, dir_fd=self._fd(parent))
            if self.volume.dir_iv:
                try:
                    fd = syscalls.open_path(self._fd(parent), bn.name)
                    try:
                        dirs.write_diriv(fd)
                    finally:
                        os.close(fd)
                except BaseException:
                    os.rmdir(bn.name, dir_fd=self._fd(parent))
                    raise

        bn = self._create_entry(parent, name, make)
        attr = self._lookup_backing(parent, bn.name)
        ino = self._inode(attr.st_ino)
        inherited = self.inodes.stat(ino).st_mode & stat.S_ISGID
        self._chown_new(self._fd(ino), owner)
        os.chmod(syscalls.proc_path(self._fd(ino)), want | inherited)
        return self._attr(ino, self.inodes.stat(ino))

    @fuse_op
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._writable()
        parent = self._dir(parent_inode)
        owner = self._owner(parent, ctx)
        stored = self.volume.seal_symlink(target)

        def make(bn: BackingName) -> None:
            os.symlink(stored, bn.name, dir_fd=self._fd(parent))

        bn = self._create_entry(parent, name, make)
        attr = self._lookup_backing(parent, bn.name)
        ino = self._inode(attr.st_ino)
        ino.symlink_len = len(target)
        self._chown_new(self._fd(ino), owner)
        return self._attr(ino, self.inodes.stat(ino))

    @fuse_op
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._writable()
        ino = self._inode(inode)
        parent = self._dir(new_parent_inode)
        if ino.is_dir:
            raise fail(errno.EPERM)

        def make(bn: BackingName) -> None:
            syscalls.linkat(self._fd(ino), self._fd(parent), bn.name)

        bn = self._create_entry(parent, new_name, make)
        ino.lookups += 1
        if ino.name is None:  # its old name was removed: the new link is where it lives
            self.inodes.moved(ino, parent, bn.name)
        return self._attr(ino, self.inodes.stat(ino))

    @fuse_op
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        await self._writable()
        parent = self._dir(parent_inode)
        owner = self._owner(parent, ctx)
        excl = os.O_EXCL if flags & os.O_EXCL else 0
        fds: list[int] = []

        def make(bn: BackingName) -> None:
            fd = os.open(bn.name, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | excl
                         | (flags & _PASS_FLAGS), stat.S_IMODE(mode), dir_fd=self._fd(parent))
            fds.append(fd)

        bn = self._create_entry(parent, name, make)
        fd = fds[0]
        try:
            attr = self._lookup_backing(parent, bn.name)
            ino = self._inode(attr.st_ino)
            self._chown_new(fd, owner, mode)
            if flags & os.O_TRUNC and ino.cfile is not None:
                ino.cfile.truncate(fd, 0)
        except BaseException:
            os.close(fd)
            raise
        ino.open_handles += 1
        fh = self._new_id(FileHandle(ino, fd, bool(flags & os.O_APPEND), True))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._attr(ino, self.inodes.stat(ino))

    # ---------------------------------------------------------------------------------
    # removing and renaming
    # ---------------------------------------------------------------------------------
    @fuse_op
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._writable()
        parent = self._dir(parent_inode)
        bn = self._bname(parent, name)
        self.capture.entry(parent, bn.name)
        pfd = self._fd(parent)
        st = os.lstat(bn.name, dir_fd=pfd)
        if stat.S_ISDIR(st.st_mode):
            raise fail(errno.EISDIR)
        self.inodes.removed(parent, bn.name, st)
        os.unlink(bn.name, dir_fd=pfd)
        dirs.remove_companion(pfd, bn)

    def _plain_empty(self, dir_fd: int) -> list[bytes]:
        """Hidden metadata of a directory, or ENOTEMPTY if it holds any real entry."""
        hidden = []
        for name in os.listdir(dir_fd):
            raw = os.fsencode(name)
            if raw == DIRIV_NAME:
                continue
            if self.names.plaintext_names or not self.names.is_hidden(raw, in_root=False):
                raise fail(errno.ENOTEMPTY)
            hidden.append(raw)
        return hidden

    def _set_diriv_aside(self, parent_fd: int, dir_backing: bytes) -> tuple[int, bytes] | None:
        """Make an (empty) directory removable by moving its IV into the parent.

        Returns (dir fd, artifact name) so the caller can restore it if the next step fails.
        A crash leaves `gocryptfs.diriv.rmdir.<n>` in the parent, which readers skip.
        """
        dfd = os.open(dir_backing, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=parent_fd)
        try:
            for junk in self._plain_empty(dfd):
                os.unlink(junk, dir_fd=dfd)
            if not self.volume.dir_iv:
                os.close(dfd)
                return None
            artifact = RMDIR_ARTIFACT_PREFIX + str(int.from_bytes(os.urandom(8), "big")).encode()
            os.rename(DIRIV_NAME, artifact, src_dir_fd=dfd, dst_dir_fd=parent_fd)
        except BaseException:
            os.close(dfd)
            raise
        return dfd, artifact

    def _restore_diriv(self, parent_fd: int, aside: tuple[int, bytes] | None) -> None:
        if aside is not None:
            dfd, artifact = aside
            try:
                os.rename(artifact, DIRIV_NAME, src_dir_fd=parent_fd, dst_dir_fd=dfd)
            finally:
                os.close(dfd)

    def _drop_diriv(self, parent_fd: int, aside: tuple[int, bytes] | None) -> None:
        if aside is not None:
            dfd, artifact = aside
            os.close(dfd)
            os.unlink(artifact, dir_fd=parent_fd)

    @fuse_op
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._writable()
        parent = self._dir(parent_inode)
        bn = self._bname(parent, name)
        self.capture.entry(parent, bn.name)  # the IV set aside, the companion: all in parent
        st = os.lstat(bn.name, dir_fd=self._fd(parent))
        if not stat.S_ISDIR(st.st_mode):
            raise fail(errno.ENOTDIR)
        aside = self._set_diriv_aside(self._fd(parent), bn.name)
        self.inodes.removed(parent, bn.name, st)
        try:
            os.rmdir(bn.name, dir_fd=self._fd(parent))
        except BaseException:
            self._restore_diriv(self._fd(parent), aside)
            raise
        self._drop_diriv(self._fd(parent), aside)
        dirs.remove_companion(self._fd(parent), bn)

    @fuse_op
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        await self._writable()
        old_parent = self._dir(parent_inode_old)
        new_parent = self._dir(parent_inode_new)
        old = self._bname(old_parent, name_old)
        new = self._bname(new_parent, name_new, creating=True)
        self.capture.entry(old_parent, old.name)
        self.capture.entry(new_parent, new.name)
        if flags & ~(syscalls.RENAME_NOREPLACE | syscalls.RENAME_EXCHANGE
                     | syscalls.RENAME_WHITEOUT):
            raise fail(errno.EINVAL)
        opfd, npfd = self._fd(old_parent), self._fd(new_parent)
        src = os.lstat(old.name, dir_fd=opfd)
        if old_parent is new_parent and old.name == new.name:
            return
        try:
            dst: os.stat_result | None = os.lstat(new.name, dir_fd=npfd)
        except FileNotFoundError:
            dst = None
        moved = self.inodes.get(self.inodes.node_for(src))
        if flags & syscalls.RENAME_EXCHANGE:
            syscalls.renameat2(opfd, old.name, npfd, new.name, flags)
            other = None if dst is None else self.inodes.get(self.inodes.node_for(dst))
            if moved is not None:
                self.inodes.moved(moved, new_parent, new.name)
            if other is not None:
                self.inodes.moved(other, old_parent, old.name)
            return
        if dst is not None and (dst.st_dev, dst.st_ino) != (src.st_dev, src.st_ino):
            self.inodes.removed(new_parent, new.name, dst)
        companion_existed = new.companion is not None and _exists(npfd, new.companion)
        dirs.write_companion(npfd, new)
        try:
            self._rename_entry(old_parent, old, new_parent, new, flags)
        except BaseException:
            if new.companion is not None and not companion_existed:
                dirs.remove_companion(npfd, new)
            raise
        if moved is not None and (dst is None or (dst.st_dev, dst.st_ino) != (src.st_dev,
                                                                               src.st_ino)):
            self.inodes.moved(moved, new_parent, new.name)
        if old.companion is not None and not _exists(opfd, old.name):
            dirs.remove_companion(opfd, old)  # (a whiteout keeps the old name, and its .name)

    def _rename_entry(self, old_parent: Inode, old: BackingName, new_parent: Inode,
                      new: BackingName, flags: int) -> None:
        try:
            syscalls.renameat2(self._fd(old_parent), old.name, self._fd(new_parent), new.name,
                               flags)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or flags:
                raise
        # The target is a directory that only looks non-empty because of its IV.
        src = os.lstat(old.name, dir_fd=self._fd(old_parent))
        if not stat.S_ISDIR(src.st_mode):
            raise fail(errno.EISDIR)
        aside = self._set_diriv_aside(self._fd(new_parent), new.name)
        try:
            syscalls.renameat2(self._fd(old_parent), old.name, self._fd(new_parent), new.name, 0)
        except BaseException:
            self._restore_diriv(self._fd(new_parent), aside)
            raise
        self._drop_diriv(self._fd(new_parent), aside)

    # ---------------------------------------------------------------------------------
    # file I/O
    # ---------------------------------------------------------------------------------
    @fuse_op
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        ino = self._inode(inode)
        if not ino.is_reg or ino.cfile is None:
            raise fail(errno.EISDIR if ino.is_dir else errno.EINVAL)
        writable = bool(flags & _WRITE_FLAGS)
        if writable or flags & os.O_TRUNC:
            await self._writable()
        if flags & os.O_TRUNC:
            self.capture.touch(ino)
        fd = syscalls.reopen(self._fd(ino), (os.O_RDWR if writable else os.O_RDONLY)
                             | (flags & _PASS_FLAGS))
        try:
            if flags & os.O_TRUNC:
                tfd = fd if writable else syscalls.reopen(self._fd(ino), os.O_RDWR)
                try:
                    ino.cfile.truncate(tfd, 0)
                finally:
                    if tfd != fd:
                        os.close(tfd)
        except BaseException:
            os.close(fd)
            raise
        ino.open_handles += 1
        fh = self._new_id(FileHandle(ino, fd, bool(flags & os.O_APPEND), writable))
        return pyfuse3.FileInfo(fh=fh, keep_cache=not self.read_only)

    @fuse_op
    async def read(  # type: ignore[override]  # pyfuse3 accepts any buffer, not only bytes
            self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        h = self._file(fh)
        assert h.ino.cfile is not None
        try:
            return h.ino.cfile.read(h.fd, off, size)
        except BlockAuthError as exc:
            self._integrity(h.ino, exc.block_no, str(exc))
            raise
        except CorruptHeader as exc:
            self._integrity(h.ino, None, str(exc))
            raise

    def _integrity(self, ino: Inode, block: int | None, reason: str) -> None:
        """One warning naming inode and block; never bytes or names."""
        Counters.integrity_errors += 1
        where = "header" if block is None else f"block {block}"
        log.warning("integrity: inode %d %s failed authentication (%s)", ino.node, where,
                    reason)
        self._report({"event": "integrity", "inode": ino.node, "block": block})

    def _written(self, fh: int) -> tuple[FileHandle, CryptFile]:
        """The handle and content of a file about to be written (opened for writing),
        recorded for a running capture."""
        h = self._file(fh)
        if not h.writable:
            raise fail(errno.EBADF)
        self.capture.touch(h.ino)
        assert h.ino.cfile is not None
        return h, h.ino.cfile

    @fuse_op
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        await self._writable()
        h, cfile = self._written(fh)
        if h.append:
            off = cfile.plain_size(h.fd)
        try:
            return cfile.write(h.fd, off, buf)
        except BlockAuthError as exc:
            self._integrity(h.ino, exc.block_no, str(exc))
            raise

    @fuse_op
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """Modes 0 and KEEP_SIZE, as gocryptfs; anything else (punching holes, zeroing,
        collapsing ranges) would need re-encrypting blocks: EOPNOTSUPP, as gocryptfs.
        Reached only with a pyfuse3 that has the handler (packaging/pyfuse3)."""
        await self._writable()
        if mode & ~syscalls.FALLOC_FL_KEEP_SIZE:
            raise fail(errno.EOPNOTSUPP)
        if offset < 0 or length <= 0:
            raise fail(errno.EINVAL)
        h, cfile = self._written(fh)
        cfile.allocate(h.fd, offset, length, keep_size=bool(mode))

    @fuse_op
    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA and SEEK_HOLE (the only ones the kernel sends) on the encrypted layout."""
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise fail(errno.EINVAL)
        h = self._file(fh)
        cfile = h.ino.cfile
        assert cfile is not None
        return cfile.seek(h.fd, offset, whence)

    @fuse_op
    async def flush(self, fh: int) -> None:
        self._file(fh)

    @fuse_op
    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if isinstance(h, FileHandle):
            os.close(h.fd)
            self.inodes.release_handle(h.ino)

    @fuse_op
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._file(fh)
        await self._sync_to_store(os.fdatasync if datasync else os.fsync, h.fd)

    # ---------------------------------------------------------------------------------
    # directories
    # ---------------------------------------------------------------------------------
    @fuse_op
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        ino = self._dir(inode)
        ino.open_handles += 1
        return self._new_id(DirHandle(ino))

    @fuse_op
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        h = self._handles.get(fh)
        if not isinstance(h, DirHandle):
            raise fail(errno.EBADF)
        dir_ino = h.ino
        if h.entries is None or start_id == 0:
            dfd = syscalls.open_dir(self._fd(dir_ino))
            try:
                h.entries = list(dirs.list_entries(self.names, dfd, self._diriv(dir_ino),
                                                   dir_ino.node == ROOT))
            finally:
                os.close(dfd)
        # READDIRPLUS gives the kernel every entry's attributes (and counts a lookup for
        # each); a plain READDIR, for the parts of a listing no lookup follows, only names,
        # inode numbers and types, all from getdents: no stat, no inode in either table.
        plus = getattr(token, "plus", True)
        self.listings["readdir_plus" if plus else "readdir_plain"] += 1
        # "." and ".." come first (ids 1 and 2); their lookup counts are never touched.
        for dot_id, (dot, ino) in enumerate(((b".", dir_ino),
                                             (b"..", dir_ino.parent or dir_ino)), 1):
            if start_id >= dot_id:
                continue
            attr = (self._attr(ino, self.inodes.stat(ino)) if plus
                    else _dirent(ino.node, stat.S_IFDIR))
            if not pyfuse3.readdir_reply(token, dot, attr, dot_id):
                return
        entries = h.entries
        if not plus:
            dev = dir_ino.key[0]
            node_for = self.inodes.listed_node
            for i in range(max(0, start_id - DOT_ENTRIES), len(entries)):
                entry = entries[i]
                if not pyfuse3.readdir_reply(token, entry.plain,
                                             _dirent(node_for(dev, entry.inode), entry.kind),
                                             i + 1 + DOT_ENTRIES):
                    return
            return
        dfd = self._fd(dir_ino)
        for i in range(max(0, start_id - DOT_ENTRIES), len(entries)):
            entry = entries[i]
            try:
                st = os.stat(entry.backing, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            ino = self.inodes.remember(dir_ino, entry.backing, st, count=0)
            if not pyfuse3.readdir_reply(token, entry.plain, self._attr(ino, st),
                                         i + 1 + DOT_ENTRIES):
                if ino.lookups <= 0:
                    self.inodes.forget(ino.node, 0)
                return
            ino.lookups += 1

    @fuse_op
    async def releasedir(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if isinstance(h, DirHandle):
            self.inodes.release_handle(h.ino)

    @fuse_op
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        h = self._handles.get(fh)
        if not isinstance(h, DirHandle):
            raise fail(errno.EBADF)
        dfd = syscalls.open_dir(self._fd(h.ino))
        try:
            await self._sync_to_store(os.fsync, dfd)
        finally:
            os.close(dfd)

    @fuse_op
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        root = self._inode(ROOT)
        sv = os.statvfs(syscalls.proc_path(self._fd(root)))
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail"):
            setattr(out, field, getattr(sv, field))
        out.f_namemax = NAME_MAX if not self.names.plaintext_names else sv.f_namemax
        return out

    # ---------------------------------------------------------------------------------
    # extended attributes
    # ---------------------------------------------------------------------------------
    def _xattr_name(self, name: bytes) -> str:
        plain = name.decode("utf-8", "surrogateescape")
        if plain in ACL_XATTRS:
            return plain
        enc = self.names.encrypt_xattr_name(plain)
        if len(enc) > XATTR_NAME_MAX:
            raise fail(errno.ERANGE)
        return enc

    def _xattr_target(self, ino: Inode) -> str:
        if ino.is_symlink:
            raise fail(errno.EPERM)
        return syscalls.proc_path(self._fd(ino))

    @fuse_op
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        await self._writable()
        ino = self._inode(inode)
        self.capture.touch(ino)
        if name.decode("utf-8", "surrogateescape") == CAPABILITY_XATTR:
            raise fail(errno.EOPNOTSUPP)
        enc = self._xattr_name(name)
        stored = value if enc in ACL_XATTRS else self.volume.seal_xattr(value)
        os.setxattr(self._xattr_target(ino), enc, stored)

    @fuse_op
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        ino = self._inode(inode)
        if name.decode("utf-8", "surrogateescape") == CAPABILITY_XATTR or ino.is_symlink:
            raise fail(pyfuse3.ENOATTR)
        enc = self._xattr_name(name)
        try:
            stored = os.getxattr(self._xattr_target(ino), enc)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise fail(pyfuse3.ENOATTR) from None
            raise
        if enc in ACL_XATTRS:
            return stored
        try:
            return self.volume.open_xattr(stored)
        except FormatError:
            Counters.integrity_errors += 1
            log.warning("integrity: inode %d xattr value failed authentication", ino.node)
            self._report({"event": "integrity", "inode": ino.node, "block": None,
                          "what": "xattr"})
            raise

    @fuse_op
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        ino = self._inode(inode)
        if ino.is_symlink:
            return []
        out = []
        for name in os.listxattr(self._xattr_target(ino)):
            if name in ACL_XATTRS:
                out.append(name.encode())
                continue
            try:
                out.append(self.names.decrypt_xattr_name(name).encode("utf-8",
                                                                      "surrogateescape"))
            except FormatError:
                continue
        return out

    @fuse_op
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._writable()
        ino = self._inode(inode)
        self.capture.touch(ino)
        try:
            os.removexattr(self._xattr_target(ino), self._xattr_name(name))
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise fail(pyfuse3.ENOATTR) from None
            raise

    # ---------------------------------------------------------------------------------
    # lifecycle
    # ---------------------------------------------------------------------------------
    def close(self) -> None:
        for h in self._handles.values():
            if isinstance(h, FileHandle):
                os.close(h.fd)
        self._handles.clear()
        self.inodes.close_all()


def _exists(dir_fd: int, name: bytes) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True

