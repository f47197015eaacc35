"""The request waiter: reader role, hand-over, stop, and fairness.

The waiter's logic runs here against a pipe, driven by workers shaped like pyfuse3's
session loop (wait, then a read that must not block, then the handler); the FUSE path
itself is exercised by every mount test, and the last test proves a real mount uses it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from piccolofs.fs.request_wait import YIELD_EVERY, RequestWaiter
from tests.mounts import PiccoloMount

Handler = Callable[[bytes], Awaitable[None]]


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    os.set_blocking(r, False)  # a read the waiter did not promise fails instead of hanging
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


async def worker(waiter: RequestWaiter, fd: int, handle: Handler) -> None:
    while await waiter.wait():
        data = os.read(fd, 1)
        if not data:
            return
        await handle(data)


async def run_workers(waiter: RequestWaiter, fd: int, handle: Handler, n: int,
                      body: Callable[[], Awaitable[None]]) -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(worker, waiter, fd, handle)
            await body()


async def test_requests_are_served_while_a_handler_waits_in_a_thread(
        pipe: tuple[int, int]) -> None:
    r, w = pipe
    waiter = RequestWaiter()
    waiter.attach(r, spin_us=50)
    release = threading.Event()
    served: list[bytes] = []
    fast_done = trio.Event()

    async def handle(data: bytes) -> None:
        if data == b"s":
            with waiter.offload():
                await trio.to_thread.run_sync(release.wait, 3)
        served.append(data)
        if served.count(b"f") == 3:
            fast_done.set()

    async def body() -> None:
        await trio.sleep(0.05)  # one worker reading, the others parked
        os.write(w, b"s")
        await trio.sleep(0.05)
        os.write(w, b"fff")
        await fast_done.wait()  # would time out if the slow request held the reader role
        assert served == [b"f", b"f", b"f"]
        release.set()
        while len(served) < 4:
            await trio.sleep(0.01)
        waiter.stop()

    await run_workers(waiter, r, handle, 4, body)
    assert served[-1] == b"s"


async def test_stop_ends_every_worker_including_parked_ones(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    waiter = RequestWaiter()
    waiter.attach(r, spin_us=0)

    async def handle(data: bytes) -> None:
        raise AssertionError("no request was sent")

    async def body() -> None:
        await trio.sleep(0.05)  # one worker in epoll, the rest parked
        waiter.stop()

    await run_workers(waiter, r, handle, 6, body)


async def test_a_closed_device_ends_every_worker(pipe: tuple[int, int]) -> None:
    """Unmounting disconnects /dev/fuse; the pipe's POLLHUP stands in for it here."""
    r, w = pipe
    waiter = RequestWaiter()
    waiter.attach(r, spin_us=50)
    served: list[bytes] = []

    async def handle(data: bytes) -> None:
        served.append(data)

    async def body() -> None:
        os.write(w, b"ab")
        await trio.sleep(0.05)
        os.close(w)

    await run_workers(waiter, r, handle, 4, body)
    assert served == [b"a", b"b"]


async def test_a_request_stream_does_not_starve_other_tasks(pipe: tuple[int, int]) -> None:
    r, w = pipe
    total = 20 * YIELD_EVERY
    os.write(w, b"x" * total)
    waiter = RequestWaiter()
    waiter.attach(r, spin_us=50)
    served: list[bytes] = []
    seen_by_other_task: list[int] = []

    async def handle(data: bytes) -> None:
        served.append(data)
        if len(served) == total:
            waiter.stop()

    async def other() -> None:
        while len(served) < total:
            seen_by_other_task.append(len(served))
            await trio.lowlevel.checkpoint()

    async def body() -> None:
        await other()

    await run_workers(waiter, r, handle, 2, body)
    assert len(served) == total
    # The other task ran throughout the stream, not only after it.
    assert len(seen_by_other_task) >= total // YIELD_EVERY // 2
    assert seen_by_other_task[len(seen_by_other_task) // 2] < total


async def test_statistics_tell_polled_from_slept_requests(pipe: tuple[int, int]) -> None:
    r, w = pipe
    waiter = RequestWaiter()
    waiter.attach(r, spin_us=0)
    served: list[bytes] = []

    async def handle(data: bytes) -> None:
        served.append(data)
        if len(served) == 4:
            waiter.stop()

    async def body() -> None:
        os.write(w, b"ab")  # already there: found by the first poll
        await trio.sleep(0.05)
        os.write(w, b"c")  # nobody spins (spin_us=0): the reader sleeps for it
        await trio.sleep(0.05)
        os.write(w, b"d")

    await run_workers(waiter, r, handle, 1, body)
    assert waiter.stats() == {"requests_immediate": 2, "requests_slept": 2}


def test_a_mount_serves_requests_through_the_waiter(volume: PiccoloMount) -> None:
    for i in range(50):
        (volume.mnt / f"f{i}").write_bytes(b"x" * 100)
    assert sorted(os.listdir(volume.mnt)) == sorted(f"f{i}" for i in range(50))
    stats = volume.request("stats")
    assert stats["requests_immediate"] + stats["requests_slept"] >= 200


def test_spinning_can_be_turned_off(tmp_path: Path, passfile: Path) -> None:
    from tests.mounts import init_piccolofs

    cipher = tmp_path / "cipher"
    init_piccolofs(cipher, passfile)
    with PiccoloMount(cipher, tmp_path / "mnt", passfile, extra=["--spin-us", "0"]) as m:
        path = m.mnt / "f"
        with open(path, "wb") as f:
            for _ in range(20):
                f.write(b"y" * 4096)
                f.flush()
                os.fsync(f.fileno())
        assert path.read_bytes() == b"y" * 4096 * 20
        stats = m.request("stats")
    assert stats["requests_slept"] > 0
