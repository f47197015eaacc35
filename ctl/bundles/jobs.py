"""Export and import jobs: what one run is doing, as its record and its progress events.

A job's counters are written by the worker thread that copies and read by the event loop,
which publishes `<type>_progress` at most a few times a second: progress never costs the copy
a wake-up per file. Finished jobs stay listed (bounded) so that a client that started one
can always learn its outcome.
"""

from __future__ import annotations

import collections
import os
import secrets
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from ctl.events import EventBus, utc_now

PROGRESS_EVERY = 0.5
KEEP_FINISHED = 32
CRASH_ENV = "PICCOLO_TEST_CRASH_AT"


def crash_point(name: str) -> None:
    """Die here as a power cut would, when a test asks for it ($PICCOLO_TEST_CRASH_AT):
    how every step of an export and of an import is proven recoverable."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(eq=False)
class Job:
    type: str  # "export" | "import"
    kind: str
    client: str
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    state: str = "running"  # running | done | failed
    phase: str = "starting"
    started_at: str = field(default_factory=utc_now)
    finished_at: str | None = None
    bytes: int = 0
    files: int = 0
    total_bytes: int = 0
    total_files: int = 0
    result: dict[str, Any] = field(default_factory=dict)
    error: dict[str, str] | None = None
    cancelled: str | None = None  # why the job must stop (its copy checks between chunks)
    done: trio.Event = field(default_factory=trio.Event)
    _t0: float = field(default_factory=time.monotonic)

    def add(self, nbytes: int, files: int = 0) -> None:
        """Called from the copying thread: plain integer updates, read by the loop."""
        self.bytes += nbytes
        self.files += files

    def progress(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        rate = self.bytes / elapsed
        left = max(self.total_bytes - self.bytes, 0)
        return {"id": self.id, "kind": self.kind, "phase": self.phase, "bytes": self.bytes,
                "files": self.files, "total_bytes": self.total_bytes,
                "total_files": self.total_files, "rate_bytes_per_s": int(rate),
                "eta_s": round(left / rate, 1) if rate > 0 and self.total_bytes else None}

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "kind": self.kind, "state": self.state,
                "started_at": self.started_at, "finished_at": self.finished_at,
                "progress": self.progress(), "result": self.result, "error": self.error}


class Jobs:
    """The running job (one at a time: exports and imports exclude each other) and the
    recently finished ones."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self.running: Job | None = None
        self._finished: collections.OrderedDict[str, Job] = collections.OrderedDict()

    def get(self, job_id: str) -> Job | None:
        if self.running is not None and self.running.id == job_id:
            return self.running
        return self._finished.get(job_id)

    def cancel(self, reason: str) -> Job | None:
        """Ask the running job to stop (lock, shutdown); it ends within one chunk."""
        job = self.running
        if job is not None:
            job.cancelled = reason
        return job

    def begin(self, job: Job) -> Job:
        self.running = job
        return job

    def finish(self, job: Job, *, result: dict[str, Any] | None = None,
               error: dict[str, str] | None = None) -> None:
        job.state = "failed" if error else "done"
        job.phase = job.state
        job.finished_at = utc_now()
        job.result.update(result or {})
        job.error = error
        if self.running is job:
            self.running = None
        self._finished[job.id] = job
        while len(self._finished) > KEEP_FINISHED:
            self._finished.popitem(last=False)
        job.done.set()

    async def report(self, job: Job) -> None:
        """Publish progress until the job ends (run in the job's nursery)."""
        topic = f"{job.type}_progress"
        last: tuple[int, int, str] | None = None
        while not job.done.is_set():
            with trio.move_on_after(PROGRESS_EVERY):
                await job.done.wait()
            now = (job.bytes, job.files, job.phase)
            if now != last and not job.done.is_set():
                self.bus.publish(topic, job.progress())
                last = now


class Runner:
    """Owns the nursery that a kind of job runs in (started with the daemon)."""

    _nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def spawn(self, fn: Any, *args: Any) -> None:
        assert self._nursery is not None, "not running"
        self._nursery.start_soon(fn, *args)
