"""Block devices as udev sees them, and what `device init` must refuse.

Everything here reads sysfs and udev's database (through pyudev); nothing opens a mounted
filesystem. A device's *instance* is its DISKSEQ where the kernel gives one (a new number
each time a disk appears, so a re-plugged disk is told apart from the one that left), else
the time udev first saw it.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyudev

from ctl.devices.marker import FS_TYPES, is_pool_uuid
from ctl.volumes import mountinfo

SYS_BLOCK = Path("/sys/class/block")
UDEV_CONTROL = Path("/run/udev/control")


@dataclass(frozen=True)
class BlockDevice:
    name: str  # the kernel's name: sdb1, loop3, nvme0n1p2
    node: str  # /dev/...
    devnum: int
    instance: str
    size_bytes: int
    disk: str  # the whole disk's kernel name (itself, for a disk)
    model: str
    serial: str
    fs_type: str
    fs_uuid: str
    fs_label: str
    part_table: str

    @property
    def is_pool(self) -> bool:
        """udev's probe says this carries a Piccolo pool (the marker is checked at mount)."""
        return (is_pool_uuid(self.fs_uuid) and self.fs_type in FS_TYPES
                and self.size_bytes > 0)

    @property
    def pool_id(self) -> str:
        return self.fs_uuid.lower()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "node": self.node, "size_bytes": self.size_bytes,
                "model": self.model, "serial": self.serial, "fs_type": self.fs_type or None,
                "fs_uuid": self.fs_uuid or None, "label": self.fs_label or None}


def udev_running() -> bool:
    return UDEV_CONTROL.exists()


def from_udev(dev: pyudev.Device) -> BlockDevice:
    props = dev.properties
    disk = dev.find_parent("block", "disk") if dev.device_type == "partition" else dev
    disk_props = disk.properties if disk is not None else props

    def prop(*names: str) -> str:
        for source in (props, disk_props):
            for name in names:
                value = source.get(name)
                if value:
                    return str(value).strip()
        return ""

    try:
        sectors = int(dev.attributes.asint("size"))
    except (KeyError, ValueError):
        sectors = 0
    model = prop("ID_MODEL", "ID_NAME")
    if not model and disk is not None:
        model = _attr(disk, "device/model") or ("loop" if dev.sys_name.startswith("loop")
                                                else "")
    return BlockDevice(
        name=dev.sys_name, node=dev.device_node or f"/dev/{dev.sys_name}",
        devnum=int(dev.device_number), instance=prop("DISKSEQ", "USEC_INITIALIZED"),
        size_bytes=sectors * 512, disk=disk.sys_name if disk is not None else dev.sys_name,
        model=model, serial=prop("ID_SERIAL_SHORT", "ID_SERIAL"),
        fs_type=str(props.get("ID_FS_TYPE", "")), fs_uuid=str(props.get("ID_FS_UUID", "")),
        fs_label=str(props.get("ID_FS_LABEL", "")),
        part_table=str(props.get("ID_PART_TABLE_TYPE", "")))


def _attr(dev: pyudev.Device, name: str) -> str:
    try:
        return str(dev.attributes.asstring(name)).strip()
    except (KeyError, UnicodeDecodeError):
        return ""


def scan(context: pyudev.Context) -> list[BlockDevice]:
    """Every block device with udev's current properties (a device udev has not probed,
    or has just dropped, shows none)."""
    return [from_udev(d) for d in context.list_devices(subsystem="block")]


def lookup(context: pyudev.Context, node: str) -> BlockDevice:
    """The block device at `node` (ValueError if it is not one)."""
    real = os.path.realpath(node)
    try:
        dev = pyudev.Devices.from_device_file(context, real)
    except (pyudev.DeviceNotFoundError, OSError, ValueError) as exc:
        raise ValueError(f"{node} is not a block device ({exc})") from None
    if dev.subsystem != "block":
        raise ValueError(f"{node} is not a block device")
    return from_udev(dev)


# ---------------------------------------------------------------------------------------
# what device init refuses
# ---------------------------------------------------------------------------------------
def _partitions(dev: BlockDevice) -> list[str]:
    base = SYS_BLOCK / dev.name
    try:
        return sorted(p.name for p in base.iterdir()
                      if p.name.startswith(dev.name) and (p / "partition").exists())
    except OSError:
        return []


def _devnum(name: str) -> int | None:
    try:
        major, minor = (SYS_BLOCK / name / "dev").read_text().strip().split(":")
        return os.makedev(int(major), int(minor))
    except (OSError, ValueError):
        return None


def disk_of(name: str) -> str:
    """The whole disk a kernel block device name belongs to."""
    if (SYS_BLOCK / name / "partition").exists():
        return Path(os.path.realpath(SYS_BLOCK / name)).parent.name
    return name


def _disk_holding(path: Path) -> str | None:
    """The disk holding the filesystem that holds `path`, if it is on a block device."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    sysdev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if sysdev.exists():
        return disk_of(Path(os.path.realpath(sysdev)).name)
    # btrfs and others report an anonymous st_dev: fall back to the mount's source.
    best: mountinfo.Mount | None = None
    real = os.path.realpath(path)
    for point, m in mountinfo.mounts().items():
        if (real == point or real.startswith(point.rstrip("/") + "/")) and \
                (best is None or len(point) > len(best.mountpoint)):
            best = m
    if best is not None and best.source.startswith("/dev/"):
        return disk_of(Path(os.path.realpath(best.source)).name)
    return None


def in_use(dev: BlockDevice) -> list[str]:
    """Why the device (or a partition on it) is in use now: never overridable."""
    names = [dev.name, *_partitions(dev)]
    nums = {n: _devnum(n) for n in names}
    reasons = []
    for point, m in sorted(mountinfo.mounts().items()):
        source = os.path.realpath(m.source) if m.source.startswith("/dev/") else ""
        for name in names:
            if source == f"/dev/{name}" or (m.dev and m.dev == nums[name]):
                reasons.append(f"/dev/{name} is mounted at {point}")
    try:
        swaps = Path("/proc/swaps").read_text().splitlines()[1:]
    except OSError:
        swaps = []
    for line in swaps:
        if line.split() and os.path.realpath(line.split()[0]) in {f"/dev/{n}" for n in names}:
            reasons.append(f"{line.split()[0]} is in use as swap")
    for name in names:
        try:
            holders = sorted(h.name for h in (SYS_BLOCK / name / "holders").iterdir())
        except OSError:
            holders = []
        if holders:
            reasons.append(f"/dev/{name} is held by {', '.join(holders)}")
    return reasons


def holds_system(dev: BlockDevice, state_dir: Path) -> list[str]:
    """The device is (on) the disk of / or of the state dir: never overridable."""
    reasons = []
    for what, path in (("the root filesystem", Path("/")), ("the state dir", state_dir)):
        disk = _disk_holding(path)
        if disk is not None and disk == dev.disk:
            reasons.append(f"/dev/{dev.disk} holds {what}")
    return reasons


def signatures(node: str) -> list[dict[str, Any]]:
    """Partition tables and filesystems on the device, probed now (not from udev's
    database, which may lag): wipefs's own listing."""
    res = subprocess.run(["wipefs", "--no-act", "--json", node], capture_output=True,
                         timeout=30, check=False)
    if res.returncode != 0:
        raise OSError(f"wipefs cannot probe {node}: "
                      f"{res.stderr.decode(errors='replace').strip()}")
    if not res.stdout.strip():
        return []
    found = json.loads(res.stdout).get("signatures") or []
    return [s for s in found if isinstance(s, dict)]
