"""The one atomic-write helper: temp file, fsync, rename, fsync of the directory.

Used for gocryptfs.conf and, by the daemon, for every state file. A reader sees either the
old complete file or the new complete file, never a torn one, even across a crash. Also
the one syncfs(2) of the project.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets

_LIBC = ctypes.CDLL(None, use_errno=True)


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (a rename, a creation, an unlink) durable."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def syncfs(path: str | os.PathLike[str]) -> None:
    """Write back the one filesystem holding `path` (syncfs(2)). Never a host-wide sync:
    that waits on every mount of the machine, and one dead or wedged mount elsewhere would
    hang it for good."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _LIBC.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fspath(path))
    finally:
        os.close(fd)
