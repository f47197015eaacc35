"""Point-in-time capture of the backing tree while applications keep writing.

A parent exporting a live volume copies the cipher directory while it changes. It asks the
mount to record which backing paths it mutates from then on (`begin`), copies everything,
then *holds* mutations, re-copies only the paths recorded, and releases: the export is then
the tree as it was at the hold, and the hold lasts as long as the changes take to re-copy,
not the volume. Mutating handlers wait at the gate during a hold — they never fail — and,
because every handler runs to completion on the event loop without yielding, none is ever
half done when the hold begins.

Paths are relative to the cipher directory (b"" is the root). An entry change in a directory
records the directory (the parent rescans it); a change to an object records the object.
The set is bounded: past `max_dirty` paths it reports `overflow` and the parent rescans the
whole tree. A hold ends by itself at its deadline, so a parent that dies or forgets can
never stop the writers for good.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import trio

from piccolofs.fs.inodes import Inode

log = logging.getLogger("piccolofs.capture")

MAX_DIRTY = 200_000
# A longer path could not be sent in one `dirty` page (JSON may take 6 bytes per byte): it
# counts as an overflow. Backing paths nest as deep as the plaintext ones, without PATH_MAX.
MAX_PATH = 8000
DEFAULT_MAX_HOLD = 120.0


class CaptureError(Exception):
    """A capture request out of order (the reason is the text)."""


class Capture:
    def __init__(self, *, max_dirty: int = MAX_DIRTY, max_hold: float = DEFAULT_MAX_HOLD,
                 report: Callable[[dict[str, Any]], None] = lambda event: None) -> None:
        self.max_dirty = max_dirty
        self.max_hold = max_hold
        self.report = report
        self.recording = False
        self.held = False  # the gate checks this one attribute on every mutation
        self.overflow = False
        self.expired = False  # the current capture's hold ended by its deadline
        self.held_ms = 0
        self.waited = 0  # mutations that waited during the last hold
        self.paths: list[bytes] = []  # append-only while recording: pages stay stable
        self._seen: set[bytes] = set()
        self._tracking = False  # recording and not overflowed: what touch() checks
        self._released = trio.Event()
        self._changed = trio.Event()
        self._started = 0.0
        self._deadline = math.inf

    # -- recording -----------------------------------------------------------------------
    def touch(self, ino: Inode) -> None:
        """The object itself changed (content, attributes, xattrs)."""
        if self._tracking:
            self._add(ino, None)

    def entry(self, parent: Inode, name: bytes) -> None:
        """`name` in `parent` appeared, went or was replaced: records both."""
        if self._tracking:
            self._add(parent, name)

    def _add(self, ino: Inode, name: bytes | None) -> None:
        parts: list[bytes] = []
        node: Inode | None = ino
        while node is not None and node.parent is not None:
            if node.name is None:
                # Removed from the tree: its content is no longer ours to copy, unless a
                # hard link we do not know of still names it.
                if _linked(node):
                    self._overflowed()
                return
            parts.append(node.name)
            node = node.parent
        path = b"/".join(reversed(parts))
        self._record(path)
        if name is not None:
            self._record(path + b"/" + name if path else name)

    def _record(self, path: bytes) -> None:
        if path in self._seen:
            return
        if len(self.paths) >= self.max_dirty or len(path) > MAX_PATH:
            self._overflowed()
            return
        self._seen.add(path)
        self.paths.append(path)

    def _overflowed(self) -> None:
        if not self.overflow:
            log.warning("capture: overflow after %d changed paths; the parent rescans all",
                        len(self.paths))
        self.overflow = True
        self._tracking = False

    # -- the protocol's actions ----------------------------------------------------------
    def begin(self) -> None:
        """Start (or restart) recording from an empty set; a hold still on ends."""
        self._end_hold()
        self.paths, self._seen = [], set()
        self.overflow = self.expired = False
        self.held_ms = self.waited = 0
        self.recording = self._tracking = True

    def hold(self, max_s: float | None = None) -> None:
        """Make mutations wait, from now until release() or `max_s` seconds at most. After
        a hold ran out a parent may hold again: the paths recorded since begin still hold."""
        if not self.recording:
            raise CaptureError("no capture to hold: begin first")
        if self.held:
            raise CaptureError("already held")
        self._started = time.monotonic()
        self._deadline = self._started + (self.max_hold if max_s is None else max_s)
        self._released = trio.Event()
        self.held, self.expired, self.waited, self.held_ms = True, False, 0, 0
        self._changed.set()

    def release(self) -> int:
        """End the hold (if any) and the capture; the milliseconds the last hold lasted."""
        self._end_hold()
        self.recording = self._tracking = False
        self.paths, self._seen = [], set()
        return self.held_ms

    def close(self) -> None:
        """The session ends: nothing may wait any more."""
        self.release()

    def _end_hold(self) -> None:
        if not self.held:
            return
        self.held = False
        self._deadline = math.inf
        self.held_ms = round((time.monotonic() - self._started) * 1000)
        self._released.set()
        self._changed.set()

    # -- waiting, and the deadline -------------------------------------------------------
    async def wait(self) -> None:
        """Until no hold is on (and if another begins before this task runs, that one too)."""
        self.waited += 1
        while self.held:
            await self._released.wait()

    async def run(self) -> None:
        """End each hold at its deadline, and tell the parent it did."""
        while True:
            with trio.move_on_after(max(0.0, self._deadline - time.monotonic())):
                await self._changed.wait()
            self._changed = trio.Event()
            if self.held and time.monotonic() >= self._deadline:
                self._end_hold()
                self.expired = True
                log.warning("capture: hold ran out after %d ms; writers resume", self.held_ms)
                self.report({"event": "hold_expired", "held_ms": self.held_ms,
                             "waited": self.waited})


def _linked(ino: Inode) -> bool:
    if ino.fd < 0:
        return True  # cannot tell: assume the worst
    try:
        return os.fstat(ino.fd).st_nlink > 0
    except OSError:
        return True
