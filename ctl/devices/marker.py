"""What makes a filesystem a Piccolo storage pool: two marks, one for udev and one for us.

- The filesystem UUID begins with 70696363 ("picc" in ASCII). udev's own blkid probe sees
  it without mounting anything, so the rule in udev/ can tag the device and desktop
  automounters leave it alone. The pool id *is* that UUID.
- `.piccolo-pool.json` at the filesystem's root repeats the pool id, with the label and the
  format version. It is checked after every mount: a filesystem that only looks like a
  pool (a cloned UUID, an init cut short before the marker) is never used.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctl.events import utc_now
from piccolofs.atomic import fsync_dir, write_atomic

PREFIX = "70696363"
NAME = ".piccolo-pool.json"
FORMAT = 1
FS_TYPES = ("ext4", "xfs", "btrfs")
MAX_SIZE = 4096
# xfs allows the shortest filesystem label (12 bytes): every pool's label fits all three.
LABEL = re.compile(r"[a-z0-9][a-z0-9._-]{0,11}")
POOL_ID = re.compile(rf"{PREFIX}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}")


class MarkerError(Exception):
    """The marker is missing, unreadable, or does not describe this filesystem."""


def new_pool_id() -> str:
    return PREFIX + str(uuid.uuid4())[8:]


def is_pool_uuid(fs_uuid: str | None) -> bool:
    return bool(fs_uuid) and POOL_ID.fullmatch(str(fs_uuid).lower()) is not None


@dataclass(frozen=True)
class Marker:
    pool_id: str
    label: str
    fs_type: str
    created_at: str

    @classmethod
    def new(cls, pool_id: str, label: str, fs_type: str) -> Marker:
        return cls(pool_id, label, fs_type, utc_now())

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "pool_id": self.pool_id, "label": self.label,
                "fs_type": self.fs_type, "created_at": self.created_at}

    @classmethod
    def parse(cls, data: bytes) -> Marker:
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise MarkerError("the pool marker is not JSON") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise MarkerError(f"the pool marker is not of format {FORMAT}")
        fields: dict[str, str] = {}
        for name in ("pool_id", "label", "fs_type", "created_at"):
            value = obj.get(name)
            if not isinstance(value, str):
                raise MarkerError(f"the pool marker lacks {name}")
            fields[name] = value
        if not POOL_ID.fullmatch(fields["pool_id"]) or fields["fs_type"] not in FS_TYPES:
            raise MarkerError("the pool marker names no valid pool")
        return cls(**fields)


def read(root: Path, fs_uuid: str) -> Marker:
    """The marker of the filesystem mounted at `root`, which must be the one whose UUID
    udev reported: the marker alone could have been copied."""
    try:
        with open(root / NAME, "rb") as f:
            data = f.read(MAX_SIZE + 1)
    except FileNotFoundError:
        raise MarkerError("no pool marker: not a Piccolo pool, or its init did not "
                          "finish") from None
    except OSError as exc:
        raise MarkerError(f"the pool marker cannot be read: {exc.strerror}") from None
    if len(data) > MAX_SIZE:
        raise MarkerError("the pool marker is implausibly large")
    marker = Marker.parse(data)
    if marker.pool_id != fs_uuid.lower():
        raise MarkerError(f"the marker names pool {marker.pool_id}, but the filesystem is "
                          f"{fs_uuid}")
    return marker


def write(root: Path, marker: Marker) -> None:
    write_atomic(root / NAME, (json.dumps(marker.to_json(), indent=1) + "\n").encode(),
                 0o600)
    fsync_dir(root)
