"""Repositories: what callers use instead of SQL. Each validates its input first — a
malformed request raises InvalidInput and writes nothing — then runs one store transaction.

Rows keep the original daemon's encodings (app payloads as JSON with a capitalised `Name`,
timestamps as RFC 3339 UTC strings with 'Z', the remote config as an opaque JSON blob).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sqlite3
from typing import Any

from ctl.errors import InvalidInput, NotFound
from ctl.events import utc_now
from ctl.store.db import NoChange
from ctl.store.store import ControlStore

HASH_FORMAT = re.compile(
    r"^argon2id\$v=19\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+$")
APP_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
AUDIT_KIND = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
MAX_PAYLOAD = 256 * 1024


def _timestamp(value: Any, field: str) -> str:
    """Canonical UTC RFC 3339 ('' clears); refuses anything unparsable."""
    if value in (None, ""):
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be an RFC 3339 timestamp")
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"{field} must be an RFC 3339 timestamp") from None
    if parsed.tzinfo is None:
        raise InvalidInput(f"{field} needs a time zone")
    try:
        utc = parsed.astimezone(dt.UTC)
    except OverflowError:
        raise InvalidInput(f"{field} is out of range") from None
    frac = f"{utc.microsecond:06d}".rstrip("0")
    return utc.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


Schema = dict[str, type | tuple[type, ...]]


def _check_fields(record: dict[str, Any], schema: Schema, what: str) -> None:
    """Every field known and of its type (a JSON true/false is never a number)."""
    for key, value in record.items():
        kind = schema.get(key)
        if kind is None:
            raise InvalidInput(f"unknown {what} field {key!r}")
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise InvalidInput(f"{what} field {key!r} has the wrong type")


def _json_bytes(value: Any, what: str) -> bytes:
    data = json.dumps(value, indent=2, sort_keys=False).encode()
    if len(data) > MAX_PAYLOAD:
        raise InvalidInput(f"{what} is larger than {MAX_PAYLOAD} bytes")
    return data


# ---------------------------------------------------------------------------------------
class AuthRepo:
    STALENESS = ("password_stale", "password_stale_at", "password_ack_at", "recovery_stale",
                 "recovery_stale_at", "recovery_ack_at")

    def __init__(self, store: ControlStore) -> None:
        self.store = store

    async def get(self) -> dict[str, Any]:
        def read(db: sqlite3.Connection) -> dict[str, Any]:
            row = db.execute(
                "SELECT initialized, password_hash IS NOT NULL AND password_hash != '', "
                + ", ".join(self.STALENESS) + ", updated_at FROM auth_state WHERE id = 1"
            ).fetchone()
            out = {"initialized": bool(row[0]), "password_set": bool(row[1])}
            for i, key in enumerate(self.STALENESS):
                v = row[2 + i]
                out[key] = bool(v) if key.endswith("_stale") else v
            out["updated_at"] = row[-1]
            return out

        return await self.store.read(read)

    async def password_hash(self) -> str | None:
        row = await self.store.read(lambda db: db.execute(
            "SELECT password_hash FROM auth_state WHERE id = 1").fetchone())
        return None if row is None else row[0]

    async def set_initialized(self) -> bool:
        """No-op (and no new revision) when already initialized."""
        def write(db: sqlite3.Connection) -> bool:
            if db.execute("SELECT initialized FROM auth_state WHERE id = 1").fetchone()[0]:
                raise NoChange
            db.execute("UPDATE auth_state SET initialized = 1, updated_at = ? WHERE id = 1",
                       (utc_now(),))
            return True

        return bool(await self.store.write(write))

    async def save_password_hash(self, password_hash: str) -> None:
        if not isinstance(password_hash, str) or not HASH_FORMAT.fullmatch(password_hash):
            raise InvalidInput("password_hash must be argon2id$v=19$m=…,t=…,p=…$salt$hash")

        def write(db: sqlite3.Connection) -> None:
            db.execute("UPDATE auth_state SET password_hash = ?, updated_at = ? WHERE id = 1",
                       (password_hash, utc_now()))

        await self.store.write(write)

    async def update_staleness(self, changes: dict[str, Any]) -> bool:
        """Partial update of the staleness flags and times; nothing given = no revision."""
        unknown = set(changes) - set(self.STALENESS)
        if unknown:
            raise InvalidInput(f"unknown staleness field(s): {', '.join(sorted(unknown))}")
        clean: dict[str, Any] = {}
        for key, value in changes.items():
            if key.endswith("_stale"):
                if not isinstance(value, bool):
                    raise InvalidInput(f"{key} must be a boolean")
                clean[key] = int(value)
            else:
                clean[key] = _timestamp(value, key)
        if not clean:
            return False

        def write(db: sqlite3.Connection) -> None:
            sets = ", ".join(f"{k} = ?" for k in clean)
            db.execute(f"UPDATE auth_state SET {sets}, updated_at = ? WHERE id = 1",
                       (*clean.values(), utc_now()))

        await self.store.write(write)
        return True


# ---------------------------------------------------------------------------------------
REMOTE_SCHEMA: Schema = {
    "endpoint": str, "device_secret": str, "solver": str, "tld": str,
    "portal_hostname": str, "dns_provider": str, "dns_credentials": dict, "enabled": bool,
    "issuer": str, "expires_at": str, "next_renewal": str, "last_handshake": str,
    "latency_ms": (int, float), "guide_verified_at": str, "last_preflight": (dict, type(None)),
    "aliases": list, "certificates": list, "events": list,
}


class RemoteRepo:
    def __init__(self, store: ControlStore) -> None:
        self.store = store

    @staticmethod
    def validate(config: Any) -> dict[str, Any]:
        if not isinstance(config, dict):
            raise InvalidInput("remote config must be a JSON object")
        _check_fields(config, REMOTE_SCHEMA, "remote config")
        creds = config.get("dns_credentials", {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in creds.items()):
            raise InvalidInput("dns_credentials must map strings to strings")
        return {**config, "dns_credentials": creds}

    async def get(self) -> dict[str, Any]:
        row = await self.store.read(lambda db: db.execute(
            "SELECT payload FROM remote_config WHERE id = 1").fetchone())
        if row is None:
            raise NotFound("no remote configuration saved")
        payload = row[0] if isinstance(row[0], bytes) else str(row[0]).encode()
        try:
            value = json.loads(payload)
        except ValueError:
            raise NotFound("stored remote configuration is not JSON") from None
        return dict(value)

    async def save(self, config: Any) -> None:
        payload = _json_bytes(self.validate(config), "remote config")

        def write(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO remote_config (id, payload, updated_at) VALUES (1, ?, ?) "
                       "ON CONFLICT (id) DO UPDATE SET payload = excluded.payload, "
                       "updated_at = excluded.updated_at", (payload, utc_now()))

        await self.store.write(write)


# ---------------------------------------------------------------------------------------
APP_FIELDS: Schema = {
    "Name": str, "Version": str, "Image": str, "Enabled": bool, "Listeners": list,
    "Env": dict, "Volumes": list,
}


class AppStateRepo:
    def __init__(self, store: ControlStore) -> None:
        self.store = store

    @staticmethod
    def validate(name: str, record: Any) -> dict[str, Any]:
        if not isinstance(name, str) or not APP_NAME.fullmatch(name):
            raise InvalidInput("app name must match [a-z0-9][a-z0-9._-]{0,62}")
        if not isinstance(record, dict):
            raise InvalidInput("app record must be a JSON object")
        _check_fields(record, APP_FIELDS, "app")
        if record.get("Name", name) != name:
            raise InvalidInput("record Name differs from the app name")
        return {"Name": name, **{k: v for k, v in record.items() if k != "Name"}}

    async def list(self) -> list[dict[str, Any]]:
        rows = await self.store.read(lambda db: db.execute(
            "SELECT payload FROM apps ORDER BY name").fetchall())
        return [json.loads(r[0]) for r in rows]

    async def get(self, name: str) -> dict[str, Any]:
        row = await self.store.read(lambda db: db.execute(
            "SELECT payload FROM apps WHERE name = ?", (name,)).fetchone())
        if row is None:
            raise NotFound(f"no app {name!r}")
        return dict(json.loads(row[0]))

    async def upsert(self, name: str, record: Any) -> dict[str, Any]:
        clean = self.validate(name, record)
        payload = json.dumps(clean, separators=(",", ":")).encode()

        def write(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO apps (name, payload, updated_at) VALUES (?, ?, ?) "
                       "ON CONFLICT (name) DO UPDATE SET payload = excluded.payload, "
                       "updated_at = excluded.updated_at", (name, payload, utc_now()))

        await self.store.write(write)
        return clean

    async def delete(self, name: str) -> None:
        def write(db: sqlite3.Connection) -> None:
            if db.execute("DELETE FROM apps WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no app {name!r}")

        await self.store.write(write)


# ---------------------------------------------------------------------------------------
class AuditRepo:
    """Append-only (the schema's triggers refuse UPDATE and DELETE)."""

    def __init__(self, store: ControlStore) -> None:
        self.store = store

    async def append(self, kind: str, source: str, data: dict[str, Any]) -> int:
        if not isinstance(kind, str) or not AUDIT_KIND.match(kind):
            raise InvalidInput("audit kind must match [a-z][a-z0-9_.-]{0,63}")
        if not isinstance(data, dict):
            raise InvalidInput("audit data must be an object")
        blob = json.dumps(data, separators=(",", ":"), sort_keys=True)
        if len(blob) > MAX_PAYLOAD:
            raise InvalidInput("audit data too large")

        def write(db: sqlite3.Connection) -> int:
            cur = db.execute("INSERT INTO audit (time, kind, source, data) VALUES (?, ?, ?, ?)",
                             (utc_now(), kind, str(source)[:256], blob))
            return int(cur.lastrowid or 0)

        return await self.store.write(write) or 0

    async def list(self, since: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        if since < 0 or not 1 <= limit <= 1000:
            raise InvalidInput("since must be >= 0 and limit 1..1000")
        rows = await self.store.read(lambda db: db.execute(
            "SELECT seq, time, kind, source, data FROM audit WHERE seq > ? ORDER BY seq "
            "LIMIT ?", (since, limit)).fetchall())
        return [{"seq": r[0], "time": r[1], "kind": r[2], "source": r[3],
                 "data": json.loads(r[4])} for r in rows]
