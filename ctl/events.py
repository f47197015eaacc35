"""The in-process event bus.

Every event gets a monotonic sequence number and a UTC timestamp. Subscribers have bounded
buffers: a subscriber that falls behind loses the oldest events and is told so by an explicit
gap marker carrying the count it missed, never starved silently. A ring of recent events
lets a stream resume from a sequence number.
"""

from __future__ import annotations

import collections
import datetime as dt
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

TOPICS = (
    "lock_state_changed",
    "volume_state_changed",
    "leadership_role_changed",
    "control_store_commit",
    "control_health",
    "device_event",
    "device_health",
    "export_progress",
    "export_result",
    "import_progress",
    "import_result",
    "tpm_unseal_failed",
    "tpm_resealed",
    "audit",
)
GAP = "gap"
DEFAULT_BUFFER = 256
HISTORY = 4096


def utc_now() -> str:
    """RFC 3339 with nanosecond-style fraction trimmed, 'Z' suffix (Go's RFC3339Nano)."""
    now = dt.datetime.now(dt.UTC)
    frac = f"{now.microsecond:06d}".rstrip("0")
    return now.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


@dataclass(frozen=True)
class Event:
    seq: int
    topic: str
    time: str
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "topic": self.topic, "time": self.time, "data": self.data}


@dataclass(eq=False)
class Subscription:
    topics: frozenset[str] | None
    capacity: int
    _buf: collections.deque[Event] = field(default_factory=collections.deque)
    _missed: int = 0
    _gap_from: int = 0
    _gap_to: int = 0
    _wake: trio.Event = field(default_factory=trio.Event)
    closed: bool = False

    def wants(self, topic: str) -> bool:
        return self.topics is None or topic in self.topics

    def offer(self, event: Event) -> None:
        if len(self._buf) >= self.capacity:
            dropped = self._buf.popleft()
            if not self._missed:
                self._gap_from = dropped.seq
            self._gap_to = dropped.seq
            self._missed += 1
        self._buf.append(event)
        self._wake.set()

    async def next(self) -> Event:
        """The next event, or a gap marker if events were dropped before it."""
        while True:
            if self._missed:
                missed, self._missed = self._missed, 0
                return Event(self._gap_to, GAP, utc_now(),
                             {"missed": missed, "from_seq": self._gap_from,
                              "to_seq": self._gap_to})
            if self._buf:
                return self._buf.popleft()
            if self.closed:
                raise trio.EndOfChannel
            await self._wake.wait()
            self._wake = trio.Event()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Event]:
        while True:
            try:
                yield await self.next()
            except trio.EndOfChannel:
                return


class EventBus:
    def __init__(self, history: int = HISTORY) -> None:
        self._seq = 0
        self._history: collections.deque[Event] = collections.deque(maxlen=history)
        self._subs: set[Subscription] = set()
        self._listeners: list[tuple[frozenset[str], Callable[[Event], None]]] = []

    def listen(self, topics: Iterable[str], callback: Callable[[Event], None]) -> None:
        """A synchronous listener, called inside publish(): for state that must change in
        the same step as the event (gates). It must not block or raise."""
        self._listeners.append((frozenset(topics), callback))

    @property
    def last_seq(self) -> int:
        return self._seq

    def publish(self, topic: str, data: dict[str, Any]) -> Event:
        if topic not in TOPICS:
            raise ValueError(f"unknown topic {topic!r}")
        self._seq += 1
        event = Event(self._seq, topic, utc_now(), dict(data))
        self._history.append(event)
        for topics, callback in self._listeners:
            if topic in topics:
                callback(event)
        for sub in list(self._subs):
            if sub.wants(topic):
                sub.offer(event)
        return event

    def history(self, since: int = 0, topics: Iterable[str] | None = None) -> list[Event]:
        wanted = None if topics is None else frozenset(topics)
        return [e for e in self._history
                if e.seq > since and (wanted is None or e.topic in wanted)]

    def oldest_seq(self) -> int:
        return self._history[0].seq if self._history else self._seq + 1

    def subscribe(self, topics: Iterable[str] | None = None,
                  capacity: int = DEFAULT_BUFFER, since: int | None = None) -> Subscription:
        """Subscribe; with `since`, first replay retained events after that sequence.

        If `since` is older than what is retained, the replay starts with a gap marker.
        """
        sub = Subscription(None if topics is None else frozenset(topics), capacity)
        if since is not None:
            if since + 1 < self.oldest_seq():
                sub._missed = self.oldest_seq() - since - 1
                sub._gap_from = since + 1
                sub._gap_to = self.oldest_seq() - 1
            for event in self.history(since, sub.topics):
                sub.offer(event)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.closed = True
        sub._wake.set()
        self._subs.discard(sub)

    def close(self) -> None:
        for sub in list(self._subs):
            self.unsubscribe(sub)
