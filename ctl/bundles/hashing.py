"""SHA-256 in a second thread, so that hashing overlaps the copying it checks.

An export hashes every byte twice (each file, then the whole bundle) and an import once;
at about 1 GB/s per core that is the longest part of either. hashlib releases the GIL for
large buffers, so a hashing thread beside the one moving the bytes uses the second CPU.
"""

from __future__ import annotations

import hashlib
import queue
import threading

CHUNK = 1 << 20


class Hasher:
    """SHA-256 computed by a second thread while the caller moves the bytes. hashlib lets
    go of the GIL for large buffers, so on two CPUs hashing overlaps the reads and writes
    instead of adding to them. Buffers come from a small pool and go back once hashed, so
    memory stays bounded."""

    def __init__(self, buffers: int = 4, size: int = CHUNK) -> None:
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(buffers):
            self._free.put(bytearray(size))
        self._todo: queue.SimpleQueue[tuple[bytes | bytearray | None, int]] = \
            queue.SimpleQueue()
        self._done: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="bundle-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        h = hashlib.sha256()
        while True:
            data, n = self._todo.get()
            if data is None:
                if n < 0:
                    return
                self._done.put(h.hexdigest())
                h = hashlib.sha256()
            elif isinstance(data, bytearray):
                h.update(memoryview(data)[:n])
                self._free.put(data)
            else:
                h.update(data)

    def buffer(self) -> bytearray:
        return self._free.get()

    def give_back(self, buf: bytearray) -> None:
        self._free.put(buf)

    def feed(self, data: bytes | bytearray, n: int = -1) -> None:
        """A pool buffer (its first `n` bytes; it returns to the pool), or bytes."""
        self._todo.put((data, n if isinstance(data, bytearray) else len(data)))

    def digest(self) -> str:
        """The hex digest of everything fed since the last one."""
        self._todo.put((None, 0))
        return self._done.get()

    def close(self) -> None:
        self._todo.put((None, -1))
        self._thread.join()
