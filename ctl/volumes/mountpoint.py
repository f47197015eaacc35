"""Mountpoints that refuse every write while nothing is mounted on them.

Applications keep writing to their paths whatever the daemon's state is: locked, detached,
a mount process that died, the daemon stopped or crashed, the box just rebooted. Were the
bare directory under a mountpoint writable, that plaintext would land on the host disk
(and be hidden later by the next mount). So every mountpoint is an empty directory with
the immutable attribute (FS_IMMUTABLE_FL, `chattr +i`): creating, removing or renaming
anything in it fails with EPERM even for root, the attribute lives on disk so it holds
across crashes and reboots, and mounting over the directory is unaffected. Only a process
with CAP_LINUX_IMMUTABLE can lift it, on purpose.

Nothing here is called on a path that may be mounted: the caller checks mountinfo first
(opening a mounted path would reach the mounted filesystem, or hang on a dead one).
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger("ctl.volumes")

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
_UNSUPPORTED = (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


class GuardUnsupported(OSError):
    """The filesystem holding the mountpoint has no immutable attribute."""


def _flags(fd: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    return buf[0]


def _set(path: Path, on: bool) -> bool:
    """Set or clear the attribute; True if it changed."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            flags = _flags(fd)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                raise GuardUnsupported(exc.errno, f"{path}: no immutable attribute "
                                       f"on this filesystem") from None
            raise
        want = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        if want == flags:
            return False
        try:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, array.array("i", [want]), True)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                raise GuardUnsupported(exc.errno, f"{path}: no immutable attribute "
                                       f"on this filesystem") from None
            raise
        return True
    finally:
        os.close(fd)


def is_guarded(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return bool(_flags(fd) & FS_IMMUTABLE_FL)
    except OSError:
        return False
    finally:
        os.close(fd)


def guard(path: Path) -> list[str]:
    """Create `path` if needed (0700) and make it refuse writes. Returns the names already
    inside it — data written while it was unguarded, which the caller reports."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    stray = sorted(os.listdir(path))
    if _set(path, True):
        log.info("mountpoint %s now refuses writes while unmounted", path)
    return stray


def release(path: Path) -> None:
    """Lift the guard (to remove the mountpoint)."""
    _set(path, False)
