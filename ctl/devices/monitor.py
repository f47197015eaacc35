"""udev's block-device events, followed from trio without a thread per event.

pyudev has no trio (or asyncio) integration: its monitor is a netlink socket, so trio
waits for the socket to be readable and the monitor is drained without blocking. Events
can be lost (the socket's buffer overflows while the daemon is busy): that is reported as
a `None` batch, after which the caller rescans everything — which it can, because it acts
on the state udev reports, never on an event alone.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import AsyncGenerator, Callable

import pyudev
import trio

log = logging.getLogger("ctl.devices")

RECEIVE_BUFFER = 8 << 20
RESTART_DELAY = 5.0


async def watch(context: pyudev.Context, on_ready: Callable[[], None] = lambda: None
                ) -> AsyncGenerator[list[pyudev.Device] | None, None]:
    """Batches of block events as udev has processed them (after its rules ran); an empty
    one each time the monitor starts listening, `None` when events may have been lost.
    Runs until cancelled; a broken monitor is re-made."""
    while True:
        try:
            monitor = pyudev.Monitor.from_netlink(context, source="udev")
            monitor.filter_by("block")
            with contextlib.suppress(OSError):  # needs CAP_NET_ADMIN; else the default
                monitor.set_receive_buffer_size(RECEIVE_BUFFER)
            monitor.start()
        except OSError as exc:
            log.error("cannot watch udev (%s); retrying in %.0f s", exc, RESTART_DELAY)
            await trio.sleep(RESTART_DELAY)
            continue
        on_ready()
        yield []  # whatever happened before the monitor listened: look at everything
        try:
            while True:
                await trio.lowlevel.wait_readable(monitor.fileno())
                batch: list[pyudev.Device] = []
                lost = False
                while True:
                    try:
                        dev = monitor.poll(timeout=0)
                    except OSError as exc:
                        if exc.errno != errno.ENOBUFS:
                            raise
                        lost = True
                        continue
                    if dev is None:
                        break
                    batch.append(dev)
                yield None if lost else batch
        except OSError as exc:
            log.error("the udev monitor failed (%s); re-made in %.0f s", exc, RESTART_DELAY)
        finally:
            # trio must forget the fd before it is closed under it.
            trio.lowlevel.notify_closing(monitor.fileno())
            del monitor
        await trio.sleep(RESTART_DELAY)
