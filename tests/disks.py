"""Disks for the device tests: a real systemd-udevd and loop devices over image files.

`Udevd` uses the udevd that runs, else starts one (and stops it by pid), and installs the
project's rules into the runtime rules directory. `Disk` is an image file on a loop device,
with the ways a disk can leave:

- `die(root)`: what the kernel does when a mounted disk disappears. It shuts the
  filesystem down (FS_IOC_SHUTDOWN without flushing the log, as the block layer's
  `fs_bdev_mark_dead` does), so every I/O on it fails with EIO from then on, and udev
  reports `remove`. Here the `remove` is synthesized: this machine's kernel has no
  device-mapper (`dmsetup remove --force` is not available), a loop device cannot be
  deleted while a filesystem holds it, and cutting a loop device's size under a mounted
  ext4 hits a kernel BUG in ext4's allocator that wedges the filesystem (and every later
  `sync`) for good, so that is never done.
- `remove()`: once nothing holds it, the loop device is unbound and deleted
  (LOOP_CTL_REMOVE): a real `remove` event, and its node disappears.
- `plug()`: the image on a loop device; after `remove()`, on the same number made again
  (LOOP_CTL_ADD): real `add` and `change` events, with a new DISKSEQ.
- `trigger(action)`: `udevadm trigger --action=remove|add|change`, a synthesized event (the
  device itself does not change; udev drops or re-probes its record).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "udev" / "61-piccolo-pool.rules"
RUNTIME_RULES = Path("/run/udev/rules.d")
UDEVD = "/lib/systemd/systemd-udevd"
LOOP_CTL_ADD, LOOP_CTL_REMOVE = 0x4C80, 0x4C81
FS_IOC_SHUTDOWN, SHUTDOWN_NOLOGFLUSH = 0x8004587D, 2


def settle() -> None:
    subprocess.run(["udevadm", "settle", "--timeout=20"], check=False, timeout=30)


class Udevd:
    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.rules = RUNTIME_RULES / RULES.name

    @staticmethod
    def answers() -> bool:
        return subprocess.run(["udevadm", "control", "--ping", "--timeout=2"],
                              capture_output=True, timeout=10).returncode == 0

    def __enter__(self) -> Udevd:
        if not self.answers():
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen([UDEVD], stdout=out, stderr=out,
                                             stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + 20
            while not self.answers():
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError(f"systemd-udevd did not start: {self.log.read_text()}")
                time.sleep(0.05)
        RUNTIME_RULES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(RULES, self.rules)
        subprocess.run(["udevadm", "control", "--reload"], check=True, timeout=20)
        return self

    def __exit__(self, *exc: object) -> None:
        self.rules.unlink(missing_ok=True)
        subprocess.run(["udevadm", "control", "--reload"], check=False, timeout=20)
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None


class Disk:
    def __init__(self, image: Path, size: int = 256 << 20) -> None:
        self.image = image
        if not image.exists():
            with open(image, "wb") as f:
                f.truncate(size)
        self.node: str | None = None
        self.removed: int | None = None  # the loop number remove() deleted

    @property
    def name(self) -> str:
        assert self.node is not None
        return os.path.basename(self.node)

    def plug(self) -> str:
        if self.removed is not None:
            self._control(LOOP_CTL_ADD, self.removed)
            node = f"/dev/loop{self.removed}"
            deadline = time.monotonic() + 20
            while not os.path.exists(node) and time.monotonic() < deadline:
                time.sleep(0.05)
            subprocess.run(["losetup", node, str(self.image)], check=True, timeout=30)
            self.node, self.removed = node, None
        else:
            self.node = subprocess.run(["losetup", "--find", "--show", str(self.image)],
                                       check=True, capture_output=True, text=True,
                                       timeout=30).stdout.strip()
        settle()
        return self.node

    @staticmethod
    def _control(request: int, number: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        fd = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            while True:
                try:
                    fcntl.ioctl(fd, request, number)
                    return
                except OSError:  # the unbind's own events may still hold it a moment
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        finally:
            os.close(fd)

    def die(self, root: Path) -> None:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("I", SHUTDOWN_NOLOGFLUSH))
        finally:
            os.close(fd)
        self.trigger("remove")

    def trigger(self, action: str) -> None:
        assert self.node is not None
        subprocess.run(["udevadm", "trigger", f"--action={action}", "--settle", self.node],
                       check=True, timeout=30)

    def held(self) -> bool:
        """Something (a mounted filesystem, even lazily detached) still holds the device."""
        assert self.node is not None
        try:
            fd = os.open(self.node, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError:
            return True
        os.close(fd)
        return False

    def remove(self, timeout: float = 20.0) -> None:
        """Unbind the image and delete the loop device, once nothing holds it."""
        assert self.node is not None
        deadline = time.monotonic() + timeout
        while self.held():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.node} is still held")
            time.sleep(0.1)
        subprocess.run(["losetup", "-d", self.node], check=True, timeout=30)
        number = int(self.name.removeprefix("loop"))
        self._control(LOOP_CTL_REMOVE, number)
        self.node, self.removed = None, number
        settle()

    def detach(self) -> None:
        """Clean-up: unbind whatever is left (autoclear if still mounted somewhere), and
        make again a loop device that remove() deleted: the machine as it was found."""
        if self.removed is not None:
            with contextlib.suppress(OSError):
                self._control(LOOP_CTL_ADD, self.removed, timeout=0)
            self.removed = None
        if self.node is not None:
            subprocess.run(["losetup", "-d", self.node], check=False, capture_output=True,
                           timeout=30)
            # Unbound once the last holder lets go (autoclear): wait, so that the next
            # test never finds this disk still there.
            bound = Path("/sys/block") / self.name / "loop" / "backing_file"
            deadline = time.monotonic() + 30
            while bound.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.node = None
            settle()
