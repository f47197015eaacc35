"""`volumes/<id>/state.json`: the crash-safe record of intent and observation.

Fields and rules are the original daemon's: `generation` grows by one on every write;
`last_error` is set only when a cause is given; `needs_repair` is inherited, forced true on
`observed_state=error` or any cause, and cleared when reality matches intent without error.
Every write is atomic (temp, fsync, rename, fsync of the volume dir and of `volumes/`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ctl.events import utc_now
from piccolofs.atomic import write_atomic

STATES = ("mounted", "unmounted", "pending", "error")
ROLES = ("leader", "follower", "unknown")


@dataclass(frozen=True)
class JournalRecord:
    desired_state: str = "unmounted"
    observed_state: str = "unmounted"
    role: str = "unknown"
    generation: int = 0
    needs_repair: bool = False
    last_error: str = ""
    updated_at: str = ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if not out["last_error"]:
            del out["last_error"]
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> JournalRecord:
        def pick(name: str, allowed: tuple[str, ...], default: str) -> str:
            v = obj.get(name)
            return v if v in allowed else default

        return cls(
            desired_state=pick("desired_state", STATES, "unmounted"),
            observed_state=pick("observed_state", STATES, "unmounted"),
            role=pick("role", ROLES, "unknown"),
            generation=int(obj.get("generation") or 0),
            needs_repair=bool(obj.get("needs_repair")),
            last_error=str(obj.get("last_error") or ""),
            updated_at=str(obj.get("updated_at") or ""),
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
    pass


def read(path: Path) -> JournalRecord | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError
        return JournalRecord.from_json(obj)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise CorruptJournal(f"{path} is not a valid journal") from None


def write(path: Path, record: JournalRecord) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(record.to_json(), indent=2) + "\n").encode(), 0o600)
    fd = os.open(path.parent.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
