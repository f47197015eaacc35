"""The filesystem tools a pool needs: make, check, mount, unmount.

Each runs as a child with a timeout, so a wedged disk fails the operation instead of
hanging the daemon; its own error text is what the caller reports.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import trio

from ctl.errors import Failed

MOUNT_OPTIONS = "nosuid,nodev,noexec"
MKFS_TIMEOUT = 600.0
CHECK_TIMEOUT = 600.0
MOUNT_TIMEOUT = 60.0
BUSY_RETRIES, BUSY_WAIT = 5, 1.0


async def _run(argv: list[str], timeout: float, what: str, ok: tuple[int, ...] = (0,)
               ) -> subprocess.CompletedProcess[bytes]:
    try:
        with trio.fail_after(timeout):
            res = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                         check=False, stdin=subprocess.DEVNULL)
    except trio.TooSlowError:
        raise Failed(f"{what}: {argv[0]} did not finish within {timeout:.0f} s") from None
    except FileNotFoundError:
        raise Failed(f"{what}: {argv[0]} is not installed") from None
    if res.returncode not in ok:
        lines = [ln.strip() for ln in (res.stderr + res.stdout).decode(errors="replace")
                 .splitlines() if ln.strip()]
        text = "; ".join(lines[-3:]) if lines else f"exit status {res.returncode}"
        raise Failed(f"{what}: {text[:500]}")
    return res


async def make(fs_type: str, node: str, fs_uuid: str, label: str) -> None:
    """Erase every old signature (a stale partition table must not survive beside the new
    filesystem), then make the filesystem with the pool's UUID and label."""
    await _run(["wipefs", "--all", "--quiet", node], MKFS_TIMEOUT, f"erasing {node}")
    argv = {
        # No blocks reserved for root: every writer of a pool is the daemon, as root.
        "ext4": ["mkfs.ext4", "-F", "-q", "-m", "0", "-U", fs_uuid, "-L", label, node],
        "xfs": ["mkfs.xfs", "-f", "-q", "-m", f"uuid={fs_uuid}", "-L", label, node],
        "btrfs": ["mkfs.btrfs", "-f", "-q", "-U", fs_uuid, "-L", label, node],
    }[fs_type]
    await _run(argv, MKFS_TIMEOUT, f"making {fs_type} on {node}")


async def check(fs_type: str, node: str) -> None:
    """Before a mount: ext4 is checked and repaired where that is safe (`e2fsck -p`, as at
    boot); xfs and btrfs replay their logs at mount and have no such pass. A device another
    opener holds for a moment (udev probing a new filesystem, a lazily detached mount
    being let go of) is tried again a few times before the check counts as failed."""
    if fs_type != "ext4":
        return
    for attempt in range(BUSY_RETRIES + 1):
        try:
            # 1: errors corrected; 2: corrected, a reboot is advised (not for a data disk).
            await _run(["e2fsck", "-p", node], CHECK_TIMEOUT, f"checking {node}",
                       ok=(0, 1, 2))
            return
        except Failed as exc:
            if "in use" not in exc.message or attempt == BUSY_RETRIES:
                raise
        await trio.sleep(BUSY_WAIT)


async def mount(fs_type: str, node: str, where: Path) -> None:
    # ext4 turns read-only on the first error it finds rather than writing on.
    options = MOUNT_OPTIONS + (",errors=remount-ro" if fs_type == "ext4" else "")
    await _run(["mount", "-t", fs_type, "-o", options, node, str(where)],
               MOUNT_TIMEOUT, f"mounting {node}")


async def unmount(where: Path, lazy: bool) -> None:
    """Detach the pool's filesystem; lazily, its last user (a mount process still
    draining) releases it."""
    await _run(["umount", *(["-l"] if lazy else []), str(where)], MOUNT_TIMEOUT,
               f"unmounting {where}")


async def settle(node: str) -> None:
    """Have udev probe the device again now and wait until it has (after mkfs): so its
    database, which every reconcile reads, already says what is there."""
    await _run(["udevadm", "trigger", "--action=change", "--settle", node], MOUNT_TIMEOUT,
               f"asking udev to probe {node}")
