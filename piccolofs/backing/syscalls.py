"""Thin wrappers over the `*at` system calls Python's os module does not expose fully.

O_PATH fds pin an inode without opening it for I/O; they are how the filesystem holds on to
every inode the kernel knows about. Calls that Python cannot make with AT_EMPTY_PATH or with
rename flags go through libc via ctypes here, and only here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os

AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2
UTIME_OMIT = (1 << 30) - 2
FALLOC_FL_KEEP_SIZE = 0x01

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(res: int, what: str) -> None:
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def open_path(dir_fd: int, name: bytes) -> int:
    """An O_PATH fd on the entry itself (a symlink is not followed)."""
    return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def proc_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def reopen(path_fd: int, flags: int) -> int:
    """Open the inode behind an O_PATH fd for I/O (never creates, never follows further)."""
    return os.open(proc_path(path_fd), flags | os.O_CLOEXEC)


def open_dir(path_fd: int) -> int:
    """A readable directory fd from an O_PATH fd on a directory."""
    return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=path_fd)


def fchown_empty(fd: int, uid: int, gid: int) -> None:
    _check(
        _libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "fchownat"
    )


def utimens_empty(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set times on the inode behind `fd` (any type, symlinks included); None = leave as is."""

    def ts(ns: int | None) -> _Timespec:
        if ns is None:
            return _Timespec(0, UTIME_OMIT)
        sec, nsec = divmod(ns, 1_000_000_000)
        return _Timespec(sec, nsec)

    times = (_Timespec * 2)(ts(atime_ns), ts(mtime_ns))
    _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH), "utimensat")


def renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int = 0) -> None:
    if flags == 0:
        os.rename(old, new, src_dir_fd=old_dir, dst_dir_fd=new_dir)
        return
    _check(_libc.renameat2(old_dir, old, new_dir, new, flags), "renameat2")


def linkat(old_fd: int, new_dir: int, new: bytes) -> None:
    """Hard-link the inode behind an O_PATH fd (AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH,
    so go through /proc, which links the inode itself, not the magic link)."""
    os.link(proc_path(old_fd), new, dst_dir_fd=new_dir, follow_symlinks=True)


def raise_errno(code: int, what: str) -> None:
    raise OSError(code, f"{what}: {os.strerror(code)}")


def write_new_file(dir_fd: int, name: bytes, data: bytes, mode: int) -> None:
    """Create `name` exclusively with exact contents and mode (diriv, .name companions)."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
        raise
    os.close(fd)


def read_small(dir_fd: int, name: bytes, limit: int) -> bytes:
    """Read a small metadata file without following symlinks; refuse oversized ones."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(errno.EIO, f"{name!r} larger than {limit} bytes")
    return data


# Filesystems whose fsync has nothing to wait for (statfs f_type).
_MEMORY_FS_MAGIC = frozenset({0x01021994, 0x858458F6})  # tmpfs, ramfs
# Filesystems where one directory's entries share its st_dev and getdents gives the inode
# numbers stat gives (not btrfs: a subvolume has a device of its own; not overlayfs).
_FLAT_FS_MAGIC = frozenset({0x01021994, 0x858458F6, 0xEF53, 0x58465342})  # + ext2/3/4, xfs


def _fs_magic(fd: int) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs, f_type first
    _check(_libc.fstatfs(fd, buf), "fstatfs")
    return ctypes.c_long.from_buffer(buf).value


def fsync_is_free(fd: int) -> bool:
    """True if `fd` lives on a memory filesystem, where fsync returns at once."""
    return _fs_magic(fd) in _MEMORY_FS_MAGIC


def listing_numbers_match_stat(fd: int) -> bool:
    """True if the inode numbers and device of a directory listing on `fd`'s filesystem are
    the ones stat(2) reports, so a listing can name inodes without a stat per entry."""
    return _fs_magic(fd) in _FLAT_FS_MAGIC


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode (os.posix_fallocate has none)."""
    _check(_libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)),
           "fallocate")
