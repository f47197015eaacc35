"""The kernel's word on what is mounted where (piccolofs.mountinfo), and the way out of a
dead FUSE mount.

A FUSE mount whose process is gone (or frozen) hangs every `stat` of its mountpoint, in
uninterruptible sleep, so the daemon learns what is mounted from mountinfo alone. A stale
FUSE connection is ended through the fuse control filesystem
(`/sys/fs/fuse/connections/N/abort`), after which every request on it fails at once.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from piccolofs.mountinfo import Mount, canonical, find, is_mounted, mounts

__all__ = ["Mount", "abort", "canonical", "find", "fs_type", "is_mounted", "mounts", "under"]

log = logging.getLogger("ctl.volumes")

FUSECTL = Path("/sys/fs/fuse/connections")


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
