"""Fencing a leader in the filesystem itself: a write lease and the term's token.

A leader's mount accepts mutations only until its lease runs out; the parent extends it on
every renewal of its leadership. When it runs out the mount turns itself read-only, whether
the parent is frozen, dead or cut off — so a deposed leader stops writing by its own clock,
before any other node can have won. It stays read-only until promoted again. Each term has
a fencing token (it only grows); a promotion or an extension carrying an older token than
one the mount has seen is refused.

The gate itself is `PiccoloOperations._writable` (one clock read per mutation); this module
moves its inputs and ends the lease on time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from piccolofs.fs.operations import PiccoloOperations

log = logging.getLogger("piccolofs.fence")


class Refused(Exception):
    """A role change or an extension the fence does not accept (the reason is the text)."""


class Fence:
    def __init__(self, ops: PiccoloOperations,
                 report: Callable[[dict[str, Any]], None] = lambda event: None) -> None:
        self.ops = ops
        self.token = 0
        self.report = report
        self._changed = trio.Event()

    def _take(self, token: int | None) -> None:
        if token is not None and token < self.token:
            raise Refused(f"stale token {token}: this mount has seen {self.token}")
        if token is not None:
            self.token = token

    def set_role(self, leader: bool, token: int | None = None, until: float | None = None
                 ) -> None:
        """`until`: the lease's end on the machine's monotonic clock (which every process
        shares), so that no delay in passing it on can lengthen it; None: no lease."""
        if leader:
            if until is not None and time.monotonic() >= until:
                raise Refused("the lease offered has already run out")
            self._take(token)
            self.ops.lease_until = until
            self.ops.set_read_only(False)
        else:
            self.ops.set_read_only(True)
            self.ops.lease_until = None
        self._changed.set()

    def extend(self, token: int, until: float) -> float:
        """Renew the lease of the current term to `until` (time.monotonic); returns it."""
        now = time.monotonic()
        if self.ops.read_only or self.ops.lease_until is None or now >= self.ops.lease_until:
            raise Refused("not a leased leader: the lease has run out, or was never granted")
        if token != self.token:
            raise Refused(f"token {token} is not this term's ({self.token})")
        self.ops.lease_until = until
        self._changed.set()
        return self.ops.lease_until

    def remaining(self) -> float | None:
        until = self.ops.lease_until
        return None if until is None else max(0.0, until - time.monotonic())

    async def run(self) -> None:
        """End the lease on time (the gate already refuses from the instant it runs out;
        this makes it stick and tells the parent)."""
        while True:
            left = None if self.ops.read_only else self.remaining()
            with trio.move_on_after(left if left is not None else float("inf")):
                await self._changed.wait()
            if self._changed.is_set():
                self._changed = trio.Event()
                continue
            if not self.ops.read_only and self.remaining() == 0.0:
                self.ops.set_read_only(True)
                self.ops.lease_until = None
                log.warning("write lease of term %d ran out: read-only", self.token)
                self.report({"event": "lease_expired", "token": self.token})
