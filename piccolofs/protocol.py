"""The control channel between a mount process and its parent (the daemon or the CLI).

One socketpair end is inherited by the mount process (`--ctl-fd`). Both sides exchange
newline-delimited JSON objects of at most MAX_MESSAGE bytes:

    parent -> child   {"op": "set_role", "role": "leader"|"follower", "id": N,
                       "token": T?, "until": M? | "lease": S?}
                      {"op": "lease", "token": T, "until": M | "lease": S, "id": N}
                      {"op": "stats", "id": N}
                      {"op": "shutdown", "id": N}
                      {"op": "capture", "action": "begin"|"hold"|"dirty"|"release", "id": N,
                       "max_s": S? (hold only), "from": I (dirty only)}
    child -> parent   {"event": "ready", "pid": P, "role": R}
                      {"reply": N, "ok": true, ...} | {"reply": N, "ok": false, "error": "..."}
                      {"event": "integrity", "inode": I, "block": B|null}
                      {"event": "lease_expired", "token": T}
                      {"event": "hold_expired", "held_ms": MS, "waited": W}

Capture (piccolofs.fs.capture), for copying a live volume's cipher dir: `begin` starts (or
restarts) recording the backing paths mutated -> {ok}; `hold` makes mutations wait, for at
most `max_s` seconds (default 120) -> {ok, dirty_count, overflow}; `dirty` returns the
recorded paths from index `from` on -> {ok, paths, next: I|null, overflow}, paths relative to
the cipher dir as os.fsdecode'd strings ("" is the root), a page at most PAGE_BYTES of JSON;
`release` ends hold and capture -> {ok, held_ms, waited, expired}, `expired` saying the hold
ran out by itself before (and the `hold_expired` event was sent): the copy is not then a
point in time. `overflow`: more paths changed than are kept; rescan everything.

Fencing: a leader may hold a write lease, extended by `lease` messages; when it runs out the
mount turns itself read-only (and stays so until promoted again). A parent gives the lease's
end as `until`, on the machine's monotonic clock (CLOCK_MONOTONIC, shared by every process),
so that no delay in delivering the message lengthens it; `lease` (seconds from receipt) is
for a hand-driven mount. A `token` is
the fencing token of a leadership term: a promotion or extension carrying a token older
than one the mount has seen is refused.

Nothing secret crosses this channel: the key travels on its own fd, read once and closed.
This module is FUSE-free so the daemon can import it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

MAX_MESSAGE = 64 * 1024
ROLE_LEADER = "leader"
ROLE_FOLLOWER = "follower"
ROLES = (ROLE_LEADER, ROLE_FOLLOWER)
OPS = ("set_role", "lease", "stats", "shutdown", "capture")
MAX_LEASE = 3600.0
CAPTURE_ACTIONS = ("begin", "hold", "dirty", "release")
MAX_HOLD = 600.0
PAGE_BYTES = 48 * 1024  # of JSON-encoded paths in one `dirty` reply (one path always fits)


class ProtocolError(ValueError):
    """A message that is not valid JSON, too large, or not of a known shape."""


def encode(msg: dict[str, Any]) -> bytes:
    data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_MESSAGE:
        raise ProtocolError("message too large")
    return data


def decode(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_MESSAGE:
        raise ProtocolError("message too large")
    try:
        msg = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ProtocolError("message is not JSON") from None
    if not isinstance(msg, dict):
        raise ProtocolError("message is not an object")
    return msg


def validate_request(msg: dict[str, Any]) -> None:
    op = msg.get("op")
    if op not in OPS:
        raise ProtocolError(f"unknown op {op!r}")
    if op == "capture":
        _validate_capture(msg)
    if op == "set_role" and msg.get("role") not in ROLES:
        raise ProtocolError(f"unknown role {msg.get('role')!r}")
    if op == "lease" and ("token" not in msg or ("lease" in msg) == ("until" in msg)):
        raise ProtocolError("lease needs token and one of until or lease")
    until = msg.get("until")
    if until is not None and (not isinstance(until, (int, float)) or isinstance(until, bool)
                              or not 0 < until < 2**53):
        raise ProtocolError("until must be a time on the monotonic clock")
    token, lease = msg.get("token"), msg.get("lease")
    if token is not None and (not isinstance(token, int) or isinstance(token, bool)
                              or not 0 <= token < 2**63):
        raise ProtocolError("token must be an integer >= 0")
    if lease is not None and (not isinstance(lease, (int, float)) or isinstance(lease, bool)
                              or not 0 < lease <= MAX_LEASE):
        raise ProtocolError(f"lease must be seconds in (0, {MAX_LEASE:.0f}]")


def _validate_capture(msg: dict[str, Any]) -> None:
    action = msg.get("action")
    if action not in CAPTURE_ACTIONS:
        raise ProtocolError(f"unknown capture action {action!r}")
    start, max_s = msg.get("from"), msg.get("max_s")
    if (action == "dirty") != ("from" in msg):
        raise ProtocolError("from goes with dirty, and only there")
    if action == "dirty" and (not isinstance(start, int) or isinstance(start, bool)
                              or not 0 <= start < 2**53):
        raise ProtocolError("from must be an integer >= 0")
    if "max_s" in msg and (action != "hold" or not isinstance(max_s, (int, float))
                           or isinstance(max_s, bool) or not 0 < max_s <= MAX_HOLD):
        raise ProtocolError(f"max_s goes with hold, seconds in (0, {MAX_HOLD:.0f}]")


def dirty_page(paths: list[bytes], start: int) -> tuple[list[str], int | None]:
    """The paths from `start` on that fit in one reply, and where the next page starts."""
    page: list[str] = []
    size = 0
    for end in range(start, len(paths)):
        text = os.fsdecode(paths[end])
        size += len(json.dumps(text)) + 1
        if page and size > PAGE_BYTES:
            return page, end
        page.append(text)
    return page, None


def lease_end(msg: dict[str, Any]) -> float | None:
    """The end of the lease a (validated) message offers, on the monotonic clock."""
    if msg.get("until") is not None:
        return float(msg["until"])
    if msg.get("lease") is not None:
        return time.monotonic() + float(msg["lease"])
    return None


class LineBuffer:
    """Splits a byte stream into bounded lines."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        if len(self._buf) > MAX_MESSAGE:
            self._buf = b""
            raise ProtocolError("message too large")
        return [ln for ln in lines if ln.strip()]
