"""The kernel's word on what is mounted where, read without ever touching a mountpoint.

A FUSE mount whose process is gone (or frozen) hangs every `stat` of its mountpoint, in
uninterruptible sleep. So nothing here resolves or stats the mountpoint itself: paths are
made canonical through their parent directory only, and everything else comes from
/proc/self/mountinfo. A stale FUSE connection is ended through the fuse control filesystem
(`/sys/fs/fuse/connections/N/abort`), after which every request on it fails at once.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ctl.volumes")

_ESCAPE = re.compile(r"\\([0-7]{3})")
FUSECTL = Path("/sys/fs/fuse/connections")


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class Mount:
    mountpoint: str
    fstype: str
    source: str
    dev: int  # st_dev of the mounted filesystem: the FUSE connection number

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith("fuse.")


def canonical(path: Path | str) -> str:
    """`path` with its parent resolved, the last component taken as it is (no stat of it)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def mounts() -> dict[str, Mount]:
    """Mountpoint -> the topmost mount there, for every mount visible to this process."""
    out: dict[str, Mount] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            major, minor = fields[2].split(":")
            point = _unescape(fields[4])
            out[point] = Mount(point, fields[sep + 1], _unescape(fields[sep + 2]),
                               os.makedev(int(major), int(minor)))
    return out


def find(path: Path | str) -> Mount | None:
    return mounts().get(canonical(path))


def is_mounted(path: Path | str) -> bool:
    return find(path) is not None


def fs_type(path: Path | str) -> str | None:
    m = find(path)
    return m.fstype if m else None


def under(directory: Path | str) -> list[Mount]:
    """The mounts whose mountpoint is a direct child of `directory`."""
    parent = os.path.realpath(directory)
    return [m for p, m in mounts().items() if os.path.dirname(p) == parent]


def _ensure_fusectl() -> bool:
    if any(m.fstype == "fusectl" for m in mounts().values()):
        return True
    if not FUSECTL.is_dir():
        return False
    res = subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)],
                         capture_output=True, text=True, check=False, timeout=10)
    if res.returncode != 0:
        log.warning("cannot mount the fuse control filesystem: %s", res.stderr.strip())
        return False
    return True


def abort(m: Mount) -> bool:
    """End a FUSE connection: pending and future requests fail with ENOTCONN at once."""
    if not m.is_fuse or not _ensure_fusectl():
        return False
    try:
        with open(FUSECTL / str(m.dev) / "abort", "w") as f:
            f.write("1")
    except OSError:
        return False  # already gone
    return True
