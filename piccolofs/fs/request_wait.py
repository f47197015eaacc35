"""How a mount process waits for the kernel's next request.

pyfuse3's loop waits for `/dev/fuse` by taking a trio lock and parking in epoll before every
request. On small virtual machines most of a request's latency is then not Python but the
wake-up: the process sleeps between two requests, its vCPU idles, and the next request has to
wake it (a cross-CPU interrupt, tens of microseconds, paid twice per round trip). Runtimes
that serve FUSE fast (Go's, for one) spin briefly before sleeping.

`RequestWaiter` takes the place of pyfuse3's wait (pyfuse3 looks `_wait_fuse_readable` up at
call time) and does the same, bounded:

- one worker at a time is *the reader*; the others park until the reader's request yields;
- the reader first polls the device without sleeping and, for at most `spin_us` after the
  previous request, keeps polling; only then does it park in epoll as pyfuse3 would;
- it never spins while a handler waits in a thread (that completion must not wait for the
  spin), and it yields to the scheduler every `YIELD_EVERY` requests so that control
  messages and signals are served under a continuous request stream;
- it returns True only after a poll in the same step said the device has data, so the
  read that follows never blocks the event loop.

An idle mount costs nothing: spinning starts only after a request and ends `spin_us` later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from collections.abc import Iterator

import pyfuse3
import trio

log = logging.getLogger("piccolofs.fs")

DEFAULT_SPIN_US = 100
YIELD_EVERY = 32
_POLL_DONE = select.POLLERR | select.POLLHUP | select.POLLNVAL
_HOOK = "_wait_fuse_readable"


def fuse_device_fd() -> int:
    """The descriptor of the FUSE session this process opened (exactly one per mount process)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            continue
    raise RuntimeError("no /dev/fuse descriptor in this process")


class RequestWaiter:
    """The reader role, the bounded spin, and the hand-over when a handler yields."""

    def __init__(self) -> None:
        self.spin_ns = 0
        self.installed = False
        self.immediate = 0  # requests found without sleeping (polled or spun for)
        self.slept = 0  # requests that needed an epoll wake-up
        self._fd = -1
        self._poll = select.poll()
        self._stopped = False
        self._reader_active = False
        self._idle = trio.lowlevel.ParkingLot()
        self._offloaded = 0
        self._since_yield = 0

    def install(self, spin_us: int = DEFAULT_SPIN_US) -> bool:
        """Take over pyfuse3's wait for this session; False if this pyfuse3 has no hook."""
        if not callable(getattr(pyfuse3, _HOOK, None)):
            log.warning("pyfuse3 %s has no request-wait hook; using its own loop",
                        getattr(pyfuse3, "__version__", "?"))
            return False
        self.attach(fuse_device_fd(), spin_us)
        setattr(pyfuse3, _HOOK, self.wait)
        self.installed = True
        return True

    def attach(self, fd: int, spin_us: int = DEFAULT_SPIN_US) -> None:
        """Wait on `fd` (the FUSE device; any pollable fd in tests)."""
        self._fd = fd
        self._poll.register(fd, select.POLLIN)
        self.spin_ns = max(0, spin_us) * 1000

    def stop(self) -> None:
        """The session is ending: every worker's wait returns False (call it in the loop)."""
        self._stopped = True
        self._idle.unpark_all()
        if self._fd >= 0:
            trio.lowlevel.notify_closing(self._fd)  # the reader parked in epoll

    @contextlib.contextmanager
    def offload(self) -> Iterator[None]:
        """Around a handler's wait for a thread: another worker reads requests meanwhile."""
        self._offloaded += 1
        if not self._reader_active:
            self._idle.unpark()
        try:
            yield
        finally:
            self._offloaded -= 1

    def stats(self) -> dict[str, int]:
        return {"requests_immediate": self.immediate, "requests_slept": self.slept}

    # -- the hook pyfuse3 calls ----------------------------------------------------------
    async def wait(self) -> bool:
        while self._reader_active and not self._stopped:
            await self._idle.park()
        if self._stopped:
            return False
        self._reader_active = True
        try:
            return await self._next_request()
        finally:
            self._reader_active = False

    async def _next_request(self) -> bool:
        if self._since_yield >= YIELD_EVERY:
            self._since_yield = 0
            await trio.lowlevel.checkpoint()
            if self._stopped:
                return False
        if self._ready() or (self.spin_ns and not self._offloaded and self._spin()):
            self.immediate += 1
            self._since_yield += 1
            return True
        self._since_yield = 0
        while True:
            try:
                await trio.lowlevel.wait_readable(self._fd)
            except trio.ClosedResourceError:  # pyfuse3.terminate()
                self.stop()
                return False
            if self._stopped:
                return False
            if self._ready():
                self.slept += 1
                return True

    def _spin(self) -> bool:
        deadline = time.monotonic_ns() + self.spin_ns
        while time.monotonic_ns() < deadline:
            if self._ready():
                return True
        return False

    def _ready(self) -> bool:
        events = self._poll.poll(0)
        if not events:
            return False
        if events[0][1] & _POLL_DONE:
            # The kernel ended the session (unmount): the reader sees it when it reads;
            # the parked workers must not wait for a request that will never come.
            self.stop()
        return True
