"""The revision checksum: SHA-256 of a canonical JSON snapshot of the logical state.

The snapshot and its encoding follow the original Go daemon (compact JSON, Go's escaping of
<, > and &, keys in a fixed order, empty values omitted), so a database it wrote keeps the
same checksum here. The audit log, which that daemon did not have, enters the snapshot only
when it holds rows.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


def go_json(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


@dataclass
class Snapshot:
    auth_initialized: bool = False
    password_hash: str = ""
    password_stale: bool = False
    password_stale_at: str = ""
    password_ack_at: str = ""
    recovery_stale: bool = False
    recovery_stale_at: str = ""
    recovery_ack_at: str = ""
    remote: bytes | None = None
    apps: list[bytes] = field(default_factory=list)  # stored payloads, sorted by name
    audit_rows: int = 0

    def document(self, revision: int) -> dict[str, Any]:
        doc: dict[str, Any] = {"version": 1, "auth_initialized": self.auth_initialized}
        if self.remote is not None:
            doc["remote"] = {"Payload": base64.b64encode(self.remote).decode()}
        if self.apps:
            doc["apps"] = [json.loads(p) for p in self.apps]
        for key in ("password_hash", "password_stale", "password_stale_at", "password_ack_at",
                    "recovery_stale", "recovery_stale_at", "recovery_ack_at"):
            value = getattr(self, key)
            if value:
                doc[key] = value
        if self.audit_rows:
            doc["audit_rows"] = self.audit_rows
        doc["revision"] = revision
        doc["checksum"] = ""
        return doc

    def checksum(self, revision: int) -> str:
        return hashlib.sha256(go_json(self.document(revision)).encode()).hexdigest()
