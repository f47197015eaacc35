"""Storage pools on real disks: a real systemd-udevd, loop devices over image files, a real
daemon driven through its CLI and socket (tests/disks.py says how a disk leaves here)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from piccolofs.atomic import syncfs
from tests.daemon import Daemon
from tests.disks import Disk, Udevd
from tests.fds import kinds, open_files
from tests.mounts import is_mounted, mounts_under

pytestmark = [pytest.mark.devices, pytest.mark.timeout(600)]

DETACH_WITHIN = 2.0  # the bound from removal to a detached, journaled volume


@pytest.fixture
def udevd(tmp_path: Path) -> Iterator[Udevd]:
    with Udevd(tmp_path / "udevd.log") as u:
        yield u


# A test takes `disk` before `daemon`: the daemon stops (and lets go of the disk) before the
# disk is detached.
@pytest.fixture
def disk(tmp_path: Path, udevd: Udevd) -> Iterator[Disk]:
    d = Disk(tmp_path / "disk.img")
    d.plug()
    yield d
    d.detach()


@pytest.fixture
def daemon(tmp_path: Path, udevd: Udevd) -> Iterator[Daemon]:
    d = Daemon(tmp_path, extra=["--health-interval", "1"])
    d.start()
    d.setup_and_unlock()
    yield d
    d.stop()
    assert "Traceback" not in d.log(), d.log()[-4000:]


def ok(d: Daemon, *args: str) -> Any:
    res = d.ctl("--json", *args)
    assert res.returncode == 0, f"piccoloctl {' '.join(args)}: {res.stdout}{res.stderr}"
    return json.loads(res.stdout)


def refused(d: Daemon, *args: str) -> tuple[int, dict[str, Any]]:
    res = d.ctl("--json", *args)
    assert res.returncode != 0, f"piccoloctl {' '.join(args)} succeeded: {res.stdout}"
    return res.returncode, json.loads(res.stdout)["error"]


def pool_mounts(d: Daemon) -> list[str]:
    return mounts_under(d.run / "pools")


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write_tree(root: Path) -> dict[str, str]:
    (root / "photos" / "2026").mkdir(parents=True)
    for i in range(20):
        (root / "photos" / "2026" / f"img{i:03d}.jpg").write_bytes(os.urandom(4096 * (i + 1)))
    (root / "notes.txt").write_text("remember the milk\n")
    with open(root / "big.bin", "wb") as f:
        f.write(os.urandom(8 << 20))
        os.fsync(f.fileno())
    return tree_digest(root)


def pool_on(d: Daemon, disk: Disk, label: str = "photos") -> dict[str, Any]:
    pool = ok(d, "device", "init", disk.node or "", "--label", label)
    assert pool["state"] == "mounted", pool
    return pool


def volume_on_pool(d: Daemon, pool: dict[str, Any], vid: str = "photos") -> Path:
    info = ok(d, "volume", "ensure", vid, "--pool", pool["label"])
    assert info["pool"] == pool["id"]
    assert info["cipher_dir"] == str(d.run / "pools" / pool["id"] / "ciphertext" / vid)
    ok(d, "volume", "attach", vid)
    return d.mount(vid)


def after_a_reconcile(d: Daemon, act: Any) -> None:
    """Do `act` (which makes udev send an event), then wait until the daemon has looked
    again: a check that nothing changed is worth something only after that."""
    before = d.call("GET", "/devices")["reconciles"]
    act()
    d.wait_for(lambda: d.call("GET", "/devices")["reconciles"] > before, 10, "a reconcile")


def serving(v: dict[str, Any]) -> bool:
    return bool(v["attached"]) and v["observed_state"] == "mounted"


def wait_volume(d: Daemon, vid: str, what: str, pred: Any, timeout: float = 30.0
                ) -> dict[str, Any]:
    return d.wait_for(lambda: (v := d.volume(vid)) and pred(v) and v, timeout, what)


# ---------------------------------------------------------------------------------------
# init and its refusals
# ---------------------------------------------------------------------------------------
def test_init_makes_a_pool_udev_tags_and_a_volume_lives_on_it(disk: Disk,
                                                              daemon: Daemon) -> None:
    pool = pool_on(daemon, disk)
    assert pool["id"].startswith("70696363-") and pool["fs_type"] == "ext4"
    assert pool["device"]["node"] == disk.node and pool["label"] == "photos"
    props = subprocess.run(["udevadm", "info", "--query=property", disk.node or ""],
                           capture_output=True, text=True, check=True).stdout
    assert f"ID_FS_UUID={pool['id']}" in props and "PICCOLO_POOL=1" in props, props
    assert "piccolo-pool" in props  # the rule's tag (TAGS / CURRENT_TAGS)
    where = daemon.run / "pools" / pool["id"]
    flags = os.statvfs(where).f_flag  # an ext4 pool: a stat never waits on us
    assert flags & os.ST_NOSUID and flags & os.ST_NODEV and flags & os.ST_NOEXEC, flags
    marker = json.loads((where / ".piccolo-pool.json").read_text())
    assert marker["pool_id"] == pool["id"] and marker["label"] == "photos"

    mnt = volume_on_pool(daemon, pool)
    digest = write_tree(mnt)
    assert daemon.journal("photos")["pool"] == pool["id"]
    assert any((where / "ciphertext" / "photos").iterdir())
    assert not (daemon.state / "ciphertext" / "photos").exists()
    listed = ok(daemon, "device", "list")
    ours = [p for p in listed["devices"] if p["id"] == pool["id"]]
    assert listed["hotplug"] == "udev" and ours[0]["volumes"] == ["photos"]
    assert tree_digest(mnt) == digest
    # The same name again adopts the pool as it is: nothing is formatted.
    again = ok(daemon, "device", "init", disk.node or "")
    assert again["id"] == pool["id"] and tree_digest(mnt) == digest


def test_init_refuses_in_use_system_and_data_disks(disk: Disk, daemon: Daemon,
                                                   tmp_path: Path) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-L", "family", disk.node or ""], check=True)
    family = tmp_path / "family"
    family.mkdir()
    subprocess.run(["mount", disk.node or "", str(family)], check=True)
    (family / "holiday.jpg").write_bytes(b"family photo")
    subprocess.run(["umount", str(family)], check=True)
    before = subprocess.run(["wipefs", "-n", "-J", disk.node or ""], capture_output=True,
                            check=True).stdout
    code, err = refused(daemon, "device", "init", disk.node or "")
    assert err["code"] == "conflict" and "ext4 'family'" in err["message"], err
    assert "--yes" in err["message"] and code == 5

    mnt = tmp_path / "elsewhere"
    mnt.mkdir()
    subprocess.run(["mount", disk.node or "", str(mnt)], check=True)
    try:
        _, err = refused(daemon, "device", "init", disk.node or "", "--yes")
        assert f"is mounted at {mnt}" in err["message"], err
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert subprocess.run(["wipefs", "-n", "-J", disk.node or ""], capture_output=True,
                          check=True).stdout == before  # nothing was changed

    root = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "/"], capture_output=True,
                          text=True, check=True).stdout.strip()
    if root.startswith("/dev/"):
        _, err = refused(daemon, "device", "init", root, "--yes")
        assert "holds the root filesystem" in err["message"], err
    _, err = refused(daemon, "device", "init", "/dev/null", "--yes")
    assert err["code"] == "invalid_input" and "not a block device" in err["message"]

    # --yes erases the filesystem that was there.
    pool = ok(daemon, "device", "init", disk.node or "", "--yes", "--label", "new")
    assert pool["state"] == "mounted" and pool["label"] == "new"
    root = daemon.run / "pools" / pool["id"]
    assert sorted(os.listdir(root)) == [".piccolo-pool.json", "ciphertext", "lost+found"]
    assert b"family" not in subprocess.run(["wipefs", "-n", "-J", disk.node or ""],
                                           capture_output=True, check=True).stdout


# ---------------------------------------------------------------------------------------
# hotplug
# ---------------------------------------------------------------------------------------
def test_a_disk_that_dies_under_a_writer_and_comes_back(disk: Disk, daemon: Daemon) -> None:
    pool = pool_on(daemon, disk)
    mnt = volume_on_pool(daemon, pool)
    digest = write_tree(mnt)
    syncfs(daemon.run / "pools" / pool["id"])  # on the disk before it dies
    since = daemon.call("GET", "/health")["last_event_seq"]
    writer = subprocess.Popen(
        ["python3", "-c", "import os,sys\n"
         "f=open(sys.argv[1],'wb')\n"
         "try:\n"
         "  while True:\n"
         "    f.write(os.urandom(65536)); f.flush(); os.fsync(f.fileno())\n"
         "except OSError as e:\n"
         "  print(e.errno); sys.exit(3)\n", str(mnt / "stream.bin")],
        stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert writer.poll() is None, "the writer did not start"
        t0 = time.monotonic()
        disk.die(daemon.run / "pools" / pool["id"])  # I/O fails with EIO; udev says remove
        v = wait_volume(daemon, "photos", "the volume detached",
                        lambda v: v["observed_state"] == "error" and not v["attached"],
                        timeout=10)
        took = time.monotonic() - t0
        out, _ = writer.communicate(timeout=20)
    finally:
        if writer.returncode is None:
            writer.kill()
            writer.communicate()
    assert took < DETACH_WITHIN, f"detached after {took:.2f} s"
    assert v["needs_repair"] and v["last_error"] == "device removed", v
    j = daemon.journal("photos")
    assert (j["observed_state"], j["needs_repair"], j["last_error"]) == \
        ("error", True, "device removed")
    assert j["desired_state"] == "mounted"  # the intent stays: it comes back with the disk
    assert writer.returncode == 3, f"the writer must get an error ({out})"
    assert not pool_mounts(daemon) and not is_mounted(mnt)
    events = daemon.events(since, "device_event")
    assert [e["data"]["action"] for e in events] == ["removed"], events
    removed = events[0]["data"]
    assert (removed["id"], removed["pool"], removed["device"]) == (pool["id"], "photos",
                                                                   disk.node)
    assert removed["size_bytes"] == 256 << 20 and removed["model"] == "loop"
    with pytest.raises(PermissionError):  # nothing meant for the disk lands beside it
        (daemon.run / "pools" / pool["id"] / "ciphertext").mkdir()
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert ok(daemon, "device", "show", "photos")["state"] == "absent"
    _, err = refused(daemon, "volume", "attach", "photos")
    assert err["code"] == "pool_absent", err

    disk.remove()  # a real `remove` event: the node is gone
    disk.plug()  # and a real `add`, with a new DISKSEQ
    v = wait_volume(daemon, "photos", "the volume back", serving, timeout=30)
    assert not v["needs_repair"] and "last_error" not in daemon.journal("photos")
    got = tree_digest(mnt)
    got.pop("stream.bin", None)  # what the writer had when the disk died: not checked
    assert got == digest
    fsck = ok(daemon, "volume", "fsck", "photos")
    assert fsck["ok"], fsck
    actions = [e["data"]["action"] for e in daemon.events(since, "device_event")]
    assert actions == ["removed", "added"], actions


def test_synthesized_remove_and_add(disk: Disk, daemon: Daemon) -> None:
    pool = pool_on(daemon, disk)
    mnt = volume_on_pool(daemon, pool)
    digest = write_tree(mnt)
    disk.trigger("remove")  # udev drops its record; the device itself still works
    v = wait_volume(daemon, "photos", "detached on remove",
                    lambda v: not v["attached"] and v["observed_state"] == "error",
                    timeout=DETACH_WITHIN + 1)
    assert v["last_error"] == "device removed"
    assert not pool_mounts(daemon)
    gen = daemon.volume("photos")["generation"]
    after_a_reconcile(daemon, lambda: disk.trigger("remove"))  # seen twice: nothing more
    assert daemon.volume("photos")["generation"] == gen
    disk.trigger("add")
    wait_volume(daemon, "photos", "re-attached on add",
                lambda v: serving(v) and not v["needs_repair"])
    gen = daemon.volume("photos")["generation"]
    since = daemon.call("GET", "/health")["last_event_seq"]
    after_a_reconcile(daemon, lambda: disk.trigger("add"))  # a pool already mounted
    after_a_reconcile(daemon, lambda: disk.trigger("change"))
    assert daemon.volume("photos")["generation"] == gen
    assert not daemon.events(since, "device_event")
    assert tree_digest(mnt) == digest


def _resources(d: Daemon) -> tuple[list[str], list[str], list[str]]:
    """The daemon's open files, the mounts under the test's dir, the daemon's children, once
    they stay the same for a second: a reading taken while the last question's connection
    closes, or a health check's smartctl runs, is not a leak."""
    last = _reading(d)
    for _ in range(10):
        time.sleep(1.0)
        now = _reading(d)
        if now == last:
            break
        last = now
    return last


def _reading(d: Daemon) -> tuple[list[str], list[str], list[str]]:
    assert d.proc is not None
    proc = psutil.Process(d.proc.pid)
    fds = kinds(open_files(proc.pid))
    mounts = sorted(mounts_under(d.base))
    children = [re.sub(r"fd \d+", "fd N", " ".join(c.cmdline()))
                for c in proc.children(recursive=True)]
    return fds, mounts, sorted(children)


def test_twenty_plug_cycles_leak_nothing(tmp_path: Path, udevd: Udevd, disk: Disk) -> None:
    # Health is read at each plug only: its periodic smartctl would blur the readings.
    with Daemon(tmp_path, extra=["--health-interval", "3600"]) as daemon:
        daemon.setup_and_unlock()
        _cycles(daemon, disk)


def _cycles(daemon: Daemon, disk: Disk) -> None:
    pool = pool_on(daemon, disk)
    mnt = volume_on_pool(daemon, pool)
    digest = write_tree(mnt)
    before = _resources(daemon)
    for cycle in range(20):
        disk.trigger("remove")
        wait_volume(daemon, "photos", f"detached in cycle {cycle}", lambda v: not v["attached"])
        disk.trigger("add")
        wait_volume(daemon, "photos", f"back in cycle {cycle}", serving)
    after = _resources(daemon)
    for what, was, now in zip(("open files", "mounts", "children"), before, after,
                              strict=True):
        assert now == was, (f"{what}: gone {Counter(was) - Counter(now)}, "
                            f"new {Counter(now) - Counter(was)}")
    assert tree_digest(mnt) == digest


def test_coldplug_a_pool_present_at_start(tmp_path: Path, udevd: Udevd, disk: Disk) -> None:
    d = Daemon(tmp_path, extra=["--health-interval", "1"])
    with d:
        d.setup_and_unlock()
        pool = pool_on(d, disk)
        digest = write_tree(volume_on_pool(d, pool))
    assert not pool_mounts(d) and not disk.held()  # a stopped daemon lets go of the disk
    with d:
        listed = ok(d, "device", "show", pool["id"])
        assert listed["state"] == "mounted"  # mounted before any unlock
        assert d.volume("photos")["observed_state"] == "pending"
        d.call("POST", "/crypto/unlock", {"password": "admin password 1"})
        wait_volume(d, "photos", "attached at unlock", serving)
        assert tree_digest(d.mount("photos")) == digest
    # Another box's daemon: the pool is listed as foreign and left alone until adopted.
    (tmp_path / "other").mkdir()
    other = Daemon(tmp_path / "other")
    with other:
        other.setup_and_unlock()
        seen = ok(other, "device", "list")["devices"]
        assert [(p["id"], p["state"], p["present"]) for p in seen] == \
            [(pool["id"], "foreign", True)], seen
        assert not pool_mounts(other)
        adopted = ok(other, "device", "init", disk.node or "")
        assert (adopted["id"], adopted["state"]) == (pool["id"], "mounted")
        assert (other.run / "pools" / pool["id"] / "ciphertext" / "photos").is_dir()
    assert not disk.held()
    # Away at start: listed as absent, its volume says why.
    disk.detach()
    with d:
        d.call("POST", "/crypto/unlock", {"password": "admin password 1"})
        assert ok(d, "device", "show", pool["id"])["state"] == "absent"
        v = d.volume("photos")
        assert v["observed_state"] == "error" and "not present" in v["last_error"], v
        disk.plug()
        wait_volume(d, "photos", "attached when plugged", serving)
        assert tree_digest(d.mount("photos")) == digest


def test_eject_refuses_busy_then_leaves_the_disk_free(disk: Disk, daemon: Daemon) -> None:
    pool = pool_on(daemon, disk)
    mnt = volume_on_pool(daemon, pool)
    write_tree(mnt)
    with open(mnt / "notes.txt") as held:
        code, err = refused(daemon, "device", "eject", "photos")
        assert err["code"] == "busy" and code == 5, err
        assert daemon.volume("photos")["attached"]  # a busy eject changes nothing
        assert held.read() == "remember the milk\n"
    res = ok(daemon, "device", "eject", "photos")
    assert res["safe_to_remove"] and res["state"] == "ejected" and res["detached"] == ["photos"]
    assert not pool_mounts(daemon) and not disk.held()
    assert daemon.volume("photos")["desired_state"] == "mounted"
    # Still plugged in: an ejected pool stays unmounted.
    after_a_reconcile(daemon, lambda: disk.trigger("change"))
    assert ok(daemon, "device", "show", "photos")["state"] == "ejected"
    disk.remove()
    disk.plug()  # plugged in again: a new plug mounts it
    wait_volume(daemon, "photos", "back after re-plug", serving)


def test_health_reports_a_filling_disk(disk: Disk, daemon: Daemon) -> None:
    pool = pool_on(daemon, disk)
    since = daemon.call("GET", "/health")["last_event_seq"]
    mnt = volume_on_pool(daemon, pool)
    shown = daemon.wait_for(lambda: (p := ok(daemon, "device", "show", "photos"))["health"]
                            and p, 20, "a first health reading")
    h = shown["health"]
    assert h["status"] == "ok" and h["capacity"]["total_bytes"] > 200 << 20
    assert h["smart"]["available"] is False and h["smart"]["reason"]  # a loop device
    free = h["capacity"]["free_bytes"]
    with open(mnt / "fill.bin", "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(int(free * 0.95) >> 20):
            f.write(chunk)
        os.fsync(f.fileno())
    ev = daemon.wait_for(lambda: [e for e in daemon.events(since, "device_health")
                                  if e["data"]["status"] == "degraded"], 20, "degraded")
    assert "full" in ev[0]["data"]["reasons"][0] and ev[0]["data"]["id"] == pool["id"]
    health = daemon.call("GET", "/health")
    assert health["status"] == "degraded" and health["devices"][pool["id"]] == "degraded"
    (mnt / "fill.bin").unlink()
    syncfs(mnt)
    daemon.wait_for(lambda: daemon.call("GET", "/health")["devices"][pool["id"]] == "ok",
                    20, "ok again")


@pytest.mark.parametrize("fs_type", ["xfs", "btrfs"])
def test_xfs_and_btrfs_pools(daemon: Daemon, tmp_path: Path, fs_type: str) -> None:
    disk = Disk(tmp_path / f"{fs_type}.img", size=320 << 20)  # xfs wants 300 MiB at least
    disk.plug()
    try:
        pool = ok(daemon, "device", "init", disk.node or "", "--fs", fs_type, "--label", "tank")
        assert pool["state"] == "mounted" and pool["fs_type"] == fs_type, pool
        mnt = volume_on_pool(daemon, pool, "tank")
        digest = write_tree(mnt)
        disk.trigger("remove")
        wait_volume(daemon, "tank", "detached", lambda v: v["observed_state"] == "error")
        disk.trigger("add")
        wait_volume(daemon, "tank", "back", serving)
        assert tree_digest(mnt) == digest
        assert ok(daemon, "volume", "fsck", "tank")["ok"]
    finally:
        daemon.stop()
        disk.detach()


def test_only_root_makes_a_pool(udevd: Udevd) -> None:
    base = Path(tempfile.mkdtemp(prefix="piccolo-devices-"))
    base.chmod(0o755)  # reachable by another user: only the daemon's own check stops them
    d = Daemon(base)
    disk = Disk(base / "disk.img")
    try:
        d.start()
        d.setup_and_unlock()
        disk.plug()
        os.chmod(d.run, 0o755)
        script = ("import sys; from ctl.cli import Client, ApiError\n"
                  "try:\n Client(sys.argv[1]).call('POST', '/devices/init',"
                  " {'device': sys.argv[2], 'yes': True})\n"
                  "except ApiError as e: print(e.status, e.code)\n")
        # In the socket's group (root's), so served, but not root.
        res = subprocess.run(["setpriv", "--reuid=1000", "--regid=0", "--clear-groups",
                              sys.executable, "-c", script, str(d.socket), disk.node or ""],
                             capture_output=True, text=True, timeout=60,
                             cwd=str(Path(__file__).resolve().parents[1]))
        assert res.stdout.split() == ["403", "forbidden"], res.stdout + res.stderr
        assert subprocess.run(["wipefs", "-n", disk.node or ""], capture_output=True,
                              text=True, check=True).stdout == ""  # nothing was made
    finally:
        d.stop()
        disk.detach()
        shutil.rmtree(base, ignore_errors=True)


def test_a_lazy_eject_says_when_the_disk_is_really_free(disk: Disk, daemon: Daemon) -> None:
    pool = pool_on(daemon, disk)
    mnt = volume_on_pool(daemon, pool)
    write_tree(mnt)
    held = open(mnt / "notes.txt")  # closed below, after the eject
    try:
        res = ok(daemon, "device", "eject", "photos", "--lazy")
        assert res["state"] == "ejected" and res["detached"] == ["photos"]
        assert res["safe_to_remove"] is False and disk.held()
        assert ok(daemon, "device", "show", "photos")["safe_to_remove"] is False
    finally:
        held.close()
    daemon.wait_for(lambda: ok(daemon, "device", "show", "photos")["safe_to_remove"], 20,
                    "the disk let go of once the last file closed")
    assert not disk.held()


def test_a_pool_that_cannot_be_adopted_is_never_erased(disk: Disk, daemon: Daemon) -> None:
    pool = pool_on(daemon, disk)
    root = daemon.run / "pools" / pool["id"]
    ok(daemon, "device", "eject", "photos")
    # The marker damaged: the filesystem still carries the pool's UUID.
    tmp = root.parent / "x"
    tmp.mkdir()
    subprocess.run(["mount", disk.node or "", str(tmp)], check=True)
    try:
        (tmp / ".piccolo-pool.json").write_text("{not json")
    finally:
        subprocess.run(["umount", str(tmp)], check=True)
        tmp.rmdir()
    _, err = refused(daemon, "device", "init", disk.node or "", "--yes")
    assert "cannot be adopted" in err["message"] and "not erased" in err["message"], err
    out = subprocess.run(["blkid", "-p", "-o", "value", "-s", "UUID", disk.node or ""],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == pool["id"]  # the pool is still there


def test_health_judges_smart_reports() -> None:
    from ctl.devices.health import Thresholds, judge, parse_smart

    limits = Thresholds()
    ata_ok = {"smart_status": {"passed": True}, "smart_support": {"enabled": True},
              "ata_smart_attributes": {"table": [
                  {"id": 5, "raw": {"value": 0}}, {"id": 197, "raw": {"value": 0}}]}}
    assert judge(None, {}, parse_smart(ata_ok, 0), limits) == ("ok", [])
    ata_bad = {**ata_ok, "ata_smart_attributes": {"table": [{"id": 5, "raw": {"value": 8}}]}}
    assert judge(None, {}, parse_smart(ata_bad, 0), limits) == \
        ("degraded", ["8 reallocated or pending sectors"])
    failing = {**ata_ok, "smart_status": {"passed": False}}
    state, reasons = judge(None, {}, parse_smart(failing, 0b1000), limits)
    assert state == "failing" and reasons[0] == "SMART says the disk is failing"
    nvme = {"smart_status": {"passed": True},
            "nvme_smart_health_information_log": {"critical_warning": 4,
                                                  "percentage_used": 95, "media_errors": 0}}
    state, reasons = judge(None, {}, parse_smart(nvme, 0), limits)
    assert state == "failing" and "NVMe critical warning 0x4" in reasons
    assert "95% of the rated endurance used" in reasons
    unsupported = {"smartctl": {"messages": [{"string": "/dev/loop3: Unable to detect "
                                                        "device type"}]}}
    smart = parse_smart(unsupported, 1)
    assert smart == {"available": False, "reason": "/dev/loop3: Unable to detect device type"}
    full = {"total_bytes": 100, "free_bytes": 5, "used_ratio": 0.95}
    assert judge(full, {"io_errors": 2}, smart, limits) == \
        ("degraded", ["the filesystem is 95% full", "2 io errors counted by the kernel"])
