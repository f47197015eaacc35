"""The kernel's word on what is mounted where, read without ever touching a mountpoint.

A FUSE mount whose process is gone, frozen or is the caller itself answers a `stat` of
its mountpoint late or never. So nothing here resolves or stats the mountpoint: paths are
made canonical through their parent directory only, and the rest comes from
/proc/self/mountinfo. Shared by the mount process (its own device) and the daemon.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
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

    @property
    def bdi(self) -> str:
        """Its backing device info under /sys/class/bdi (read-ahead, among others)."""
        return f"{os.major(self.dev)}:{os.minor(self.dev)}"


def canonical(path: Path | str) -> str:
    """`path` with its parent resolved, the last component taken as it is (no stat of it)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def parse(lines: Iterable[str]) -> list[Mount]:
    """Every mount of mountinfo `lines`, in their order (a later one sits on top)."""
    out = []
    for line in lines:
        fields = line.split()
        sep = fields.index("-")
        major, minor = fields[2].split(":")
        out.append(Mount(_unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2]),
                         os.makedev(int(major), int(minor))))
    return out


def entries() -> list[Mount]:
    """Every mount visible to this process, stacked ones included."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return parse(f)


def mounts() -> dict[str, Mount]:
    """Mountpoint -> the topmost mount there, for every mount visible to this process."""
    return {m.mountpoint: m for m in entries()}


def find(path: Path | str) -> Mount | None:
    return mounts().get(canonical(path))


def is_mounted(path: Path | str) -> bool:
    return find(path) is not None
