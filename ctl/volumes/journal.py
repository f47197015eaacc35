"""`volumes/<id>/state.json`: the crash-safe record of intent and observation.

Fields and rules are the original daemon's: `generation` grows by one on every write;
`last_error` is set only when a cause is given; `needs_repair` is inherited, forced true on
`observed_state=error` or any cause, and cleared when reality matches intent without error.
Every write is atomic (temp, fsync, rename, fsync of the volume dir and of `volumes/`).
`pool` names the storage pool (ctl.devices) holding the volume's cipher dir; absent for a
volume under the state dir. Reading is strict: a journal that is not exactly of this shape
is corrupt, and the caller keeps it aside rather than guessing an intent from it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ctl.events import utc_now
from piccolofs.atomic import fsync_dir, write_atomic

STATES = ("mounted", "unmounted", "pending", "error")
MAX_SIZE = 64 * 1024
MAX_TEXT = 4096
ROLES = ("leader", "follower", "unknown")
POOL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class JournalRecord:
    desired_state: str = "unmounted"
    observed_state: str = "unmounted"
    role: str = "unknown"
    generation: int = 0
    needs_repair: bool = False
    last_error: str = ""
    updated_at: str = ""
    pool: str = ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for optional in ("last_error", "pool"):
            if not out[optional]:
                del out[optional]
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> JournalRecord:
        """Strict: a field of the wrong type or value is corruption, never a default."""
        def enum(name: str, allowed: tuple[str, ...]) -> str:
            v = obj.get(name)
            if v not in allowed:
                raise ValueError(f"{name} is {_show(v)}, not one of {', '.join(allowed)}")
            return str(v)

        def typed(name: str, kind: type, default: Any) -> Any:
            v = obj.get(name, default)
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise ValueError(f"{name} is {_show(v)}, not {kind.__name__}")
            return v

        generation = typed("generation", int, 0)
        if not 0 <= generation < 2**63:
            raise ValueError(f"generation {generation} is out of range")
        typed("description", str, "")
        pool = typed("pool", str, "")
        if pool and not POOL_ID.fullmatch(pool):
            raise ValueError(f"pool is {_show(pool)}, not a pool id")
        return cls(
            desired_state=enum("desired_state", STATES),
            observed_state=enum("observed_state", STATES),
            role=enum("role", ROLES) if "role" in obj else "unknown",
            generation=generation,
            needs_repair=typed("needs_repair", bool, False),
            last_error=typed("last_error", str, "")[:MAX_TEXT],
            updated_at=typed("updated_at", str, "")[:MAX_TEXT],
            pool=pool,
        )

    def transition(self, *, desired: str | None = None, observed: str | None = None,
                   role: str | None = None, cause: str | None = None) -> JournalRecord:
        desired = desired or self.desired_state
        observed = observed or self.observed_state
        needs_repair = self.needs_repair
        if observed == "error" or cause:
            needs_repair = True
        elif observed in ("mounted", "unmounted") and observed == desired:
            needs_repair = False
        return replace(self, desired_state=desired, observed_state=observed,
                       role=role or self.role, generation=self.generation + 1,
                       needs_repair=needs_repair, last_error=cause or "",
                       updated_at=utc_now())


class CorruptJournal(Exception):
    """The journal exists but cannot be used: unreadable, not JSON, or not of our shape."""


def _show(v: object) -> str:
    text = json.dumps(v) if isinstance(v, (str, int, float, bool, type(None))) else \
        type(v).__name__
    return text[:40]


def read(path: Path) -> JournalRecord | None:
    """The record, None if there is none, or CorruptJournal saying what is wrong with it."""
    try:
        if path.stat().st_size > MAX_SIZE:
            raise CorruptJournal(f"{path} is implausibly large")
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CorruptJournal(f"{path} cannot be read: {exc.strerror}") from None
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise CorruptJournal(f"{path} is not valid JSON"
                             + (" (empty)" if not data.strip() else "")) from None
    if not isinstance(obj, dict):
        raise CorruptJournal(f"{path} is not a JSON object")
    try:
        return JournalRecord.from_json(obj)
    except (ValueError, TypeError, OverflowError) as exc:
        raise CorruptJournal(f"{path}: {exc}") from None


def set_aside(path: Path) -> Path:
    """Keep a corrupt journal (file or whatever else sits there) under a new name, so the
    operator can look at it and a fresh journal can be written."""
    aside = path.with_name(f"{path.name}.corrupt-{utc_now().replace(':', '')}")
    os.rename(path, aside)
    fsync_dir(path.parent)
    return aside


def kept_aside(path: Path) -> list[Path]:
    """Corrupt journals kept aside for `path`, oldest first."""
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


def write(path: Path, record: JournalRecord) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(record.to_json(), indent=2) + "\n").encode(), 0o600)
    fsync_dir(path.parent.parent)

