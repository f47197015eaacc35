"""The one atomic-write helper: temp file, fsync, rename, fsync of the directory.

Used for gocryptfs.conf and, by the daemon, for every state file. A reader sees either the
old complete file or the new complete file, never a torn one, even across a crash.
"""

from __future__ import annotations

import contextlib
import os
import secrets


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
