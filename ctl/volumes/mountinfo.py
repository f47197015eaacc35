"""Reading /proc/self/mountinfo (the kernel's word on what is mounted where)."""

from __future__ import annotations

import os
import re
from pathlib import Path

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> dict[str, str]:
    """Mountpoint -> filesystem type, for every mount visible to this process."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            out[_unescape(fields[4])] = fields[sep + 1]
    return out


def is_mounted(path: Path | str) -> bool:
    return os.path.realpath(path) in mounts()


def fs_type(path: Path | str) -> str | None:
    return mounts().get(os.path.realpath(path))
