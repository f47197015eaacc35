"""Device health: capacity, the kernel's error counters, SMART; judged against thresholds.

- capacity: statvfs of the pool's mount;
- kernel counters (sysfs): the SCSI layer's `device/ioerr_cnt` of the disk, ext4's
  `errors_count`, btrfs's per-device `error_stats`, where the kernel has them;
- SMART: `smartctl --json` of the whole disk where the device speaks it (a loop device or
  a virtual disk does not: then `smart.available` is false and says why).

`degraded` means act soon (nearly full, errors seen, a pre-failure attribute); `failing`
means copy the data off now (SMART's overall verdict failed, an NVMe critical warning).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ctl.devices.blockdev import SYS_BLOCK, BlockDevice
from ctl.events import utc_now

SYS_FS = Path("/sys/fs")
SMART_TIMEOUT = 30.0
STATES = ("ok", "degraded", "failing", "unknown")


@dataclass(frozen=True)
class Thresholds:
    degraded_used: float = 0.90  # fraction of the filesystem in use
    failing_used: float = 0.98
    nvme_wear: int = 90  # percentage_used of an NVMe drive's rated endurance


def capacity(where: Path) -> dict[str, Any]:
    st = os.statvfs(where)
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    used = (total - free) / total if total else 0.0
    return {"total_bytes": total, "free_bytes": free, "used_ratio": round(used, 4)}


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        return int(text, 0)
    except ValueError:
        return None


def error_counters(dev: BlockDevice, fs_uuid: str) -> dict[str, int]:
    """The kernel's error counts for this device and its filesystem (those that exist)."""
    out: dict[str, int] = {}
    ioerr = _read_int(SYS_BLOCK / dev.disk / "device" / "ioerr_cnt")
    if ioerr is not None:
        out["io_errors"] = ioerr
    ext4 = _read_int(SYS_FS / "ext4" / dev.name / "errors_count")
    if ext4 is not None:
        out["fs_errors"] = ext4
    devinfo = SYS_FS / "btrfs" / fs_uuid / "devinfo"
    total = 0
    for stats in devinfo.glob("*/error_stats"):
        try:
            lines = stats.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                total += int(parts[1])
        out["fs_errors"] = total
    return out


async def smart(disk_node: str) -> dict[str, Any]:
    """smartctl's verdict on the whole disk: {available, passed, ...} or why not."""
    try:
        with trio.fail_after(SMART_TIMEOUT):
            res = await trio.run_process(["smartctl", "--json=c", "-H", "-A", "-i", disk_node],
                                         capture_stdout=True, capture_stderr=True,
                                         check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return {"available": False, "reason": "smartctl is not installed (smartmontools)"}
    except OSError as exc:
        return {"available": False, "reason": f"smartctl cannot run: {exc.strerror or exc}"}
    except trio.TooSlowError:
        return {"available": False, "reason": f"smartctl did not answer in {SMART_TIMEOUT:.0f} s"}
    try:
        report = json.loads(res.stdout)
        return parse_smart(report, res.returncode)
    except (ValueError, TypeError, AttributeError, KeyError):
        return {"available": False, "reason": "smartctl's report is not of the expected shape"}


def parse_smart(report: dict[str, Any], status: int) -> dict[str, Any]:
    """smartctl's exit status is a bit mask (smartctl(8)): bit 1 the device could not be
    opened or spoken to, bit 3 the disk is failing, bit 4 a pre-failure attribute is at or
    below its threshold."""
    messages = [m.get("string", "") for m in report.get("smartctl", {}).get("messages", [])
                if isinstance(m, dict)]
    support = report.get("smart_support", {})
    if status & 0b11 or "smart_status" not in report or support.get("enabled") is False:
        return {"available": False,
                "reason": messages[0] if messages else "the device does not report SMART"}
    out: dict[str, Any] = {"available": True,
                           "passed": bool(report["smart_status"].get("passed", True)),
                           "failing_now": bool(status & 0b1000),
                           "prefail_below_threshold": bool(status & 0b10000)}
    for attr in report.get("ata_smart_attributes", {}).get("table", []):
        if attr.get("id") in (5, 197, 198):  # reallocated, pending, uncorrectable sectors
            out.setdefault("bad_sectors", 0)
            out["bad_sectors"] += int(attr.get("raw", {}).get("value", 0))
    nvme = report.get("nvme_smart_health_information_log")
    if isinstance(nvme, dict):
        out["critical_warning"] = int(nvme.get("critical_warning", 0))
        out["percentage_used"] = int(nvme.get("percentage_used", 0))
        out["media_errors"] = int(nvme.get("media_errors", 0))
    return out


def judge(cap: dict[str, Any] | None, counters: dict[str, int], smart_: dict[str, Any],
          limits: Thresholds) -> tuple[str, list[str]]:
    """The state and every reason for it, worst first."""
    failing: list[str] = []
    degraded: list[str] = []
    if cap is not None:
        used = cap["used_ratio"]
        if used >= limits.failing_used:
            failing.append(f"the filesystem is {used:.0%} full")
        elif used >= limits.degraded_used:
            degraded.append(f"the filesystem is {used:.0%} full")
    for name, count in sorted(counters.items()):
        if count:
            degraded.append(f"{count} {name.replace('_', ' ')} counted by the kernel")
    if smart_.get("available"):
        if not smart_.get("passed", True) or smart_.get("failing_now"):
            failing.append("SMART says the disk is failing")
        if smart_.get("critical_warning"):
            failing.append(f"NVMe critical warning {smart_['critical_warning']:#x}")
        if smart_.get("prefail_below_threshold"):
            degraded.append("a SMART pre-failure attribute is at its threshold")
        if smart_.get("bad_sectors"):
            degraded.append(f"{smart_['bad_sectors']} reallocated or pending sectors")
        if smart_.get("media_errors"):
            degraded.append(f"{smart_['media_errors']} NVMe media errors")
        if smart_.get("percentage_used", 0) >= limits.nvme_wear:
            degraded.append(f"{smart_['percentage_used']}% of the rated endurance used")
    if failing:
        return "failing", failing + degraded
    return ("degraded", degraded) if degraded else ("ok", [])


async def assess(dev: BlockDevice, where: Path | None, limits: Thresholds
                 ) -> dict[str, Any]:
    """One health reading of a mounted pool's device (its filesystem at `where`)."""
    cap = None
    if where is not None:
        try:
            cap = await trio.to_thread.run_sync(capacity, where, abandon_on_cancel=True)
        except OSError as exc:
            return {"status": "failing", "reasons": [f"statvfs failed: {exc.strerror}"],
                    "checked_at": utc_now()}
    counters = await trio.to_thread.run_sync(error_counters, dev, dev.fs_uuid)
    smart_ = await smart(f"/dev/{dev.disk}")
    status, reasons = judge(cap, counters, smart_, limits)
    return {"status": status, "reasons": reasons, "capacity": cap, "errors": counters,
            "smart": smart_, "checked_at": utc_now()}
