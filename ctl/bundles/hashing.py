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
    instead of adding to them. Memory stays bounded: buffers come from a small pool and go
    back once hashed, and the work queue is bounded too (a caller that outruns the hashing
    waits). A failure in the thread is raised to the caller at the next digest."""

    def __init__(self, buffers: int = 4, size: int = CHUNK) -> None:
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._pool: set[int] = set()
        for _ in range(buffers):
            buf = bytearray(size)
            self._pool.add(id(buf))
            self._free.put(buf)
        self._todo: queue.Queue[tuple[bytes | bytearray | None, int]] = \
            queue.Queue(maxsize=2 * buffers)
        self._done: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._error: BaseException | None = None
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
                continue
            try:
                if self._error is None:
                    h.update(memoryview(data)[:n])
            except BaseException as exc:  # kept for the caller; the loop goes on serving
                self._error = exc
            finally:
                if isinstance(data, bytearray) and id(data) in self._pool:
                    self._free.put(data)

    def buffer(self) -> bytearray:
        return self._free.get()

    def give_back(self, buf: bytearray) -> None:
        self._free.put(buf)

    def feed_buffer(self, buf: bytearray, n: int) -> None:
        """The first `n` bytes of a pool buffer, which returns to the pool once hashed."""
        self._todo.put((buf, n))

    def feed(self, data: bytes) -> None:
        self._todo.put((data, len(data)))

    def digest(self) -> str:
        """The hex digest of everything fed since the last one."""
        self._todo.put((None, 0))
        digest = self._done.get()
        if self._error is not None:
            error, self._error = self._error, None
            raise OSError(5, f"hashing failed: {error!r}")
        return digest

    def close(self) -> None:
        self._todo.put((None, -1))
        self._thread.join()
