"""The routes of the control socket, and the OpenAPI document built from the same table.

The document is the contract, and it is enforced rather than only described: before a
handler runs, the path parameters, the query and the body are checked against the very
schemas the document publishes (`_violation`), so whatever the document forbids is refused
with 422 (400 for a body that is not a JSON object) and nothing happens. Every string has a
bound. Only then come the state checks: mutations while locked are 423; a leader action the
leadership registry has not granted is 409.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ctl import events as ev
from ctl.api.server import Request, Response, Stream
from ctl.bootstrap import pem
from ctl.controller import Controller
from ctl.devices.manager import DeviceManager
from ctl.errors import InvalidInput, NotFound
from ctl.events import EventBus
from ctl.keys import recovery
from ctl.roles import MAX_RESOURCES, NAME_PATTERN, ROLES, LeadershipRegistry
from ctl.store.repos import (
    APP_FIELDS,
    MAX_PAYLOAD,
    REMOTE_SCHEMA,
    AppStateRepo,
    AuditRepo,
    AuthRepo,
    RemoteRepo,
)
from ctl.store.store import ControlStore
from ctl.volumes import journal
from ctl.volumes.manager import VolumeManager
from ctl.volumes.metadata import CLASSES, CLUSTER_MODES, FOLLOWER_POLICIES

API = "/api/v1"
VERSION = "1.1.0"

MAX_SECRET = 1024  # characters of a password or recovery key: bounds the KDF's input
MAX_TEXT = 4096  # characters of any other free-text field
MAX_ITEMS = 256  # entries of a list or map inside a stored record
MAX_TOPICS = 16  # `topic` query parameters of one /events request
MAX_SEQ = 2**63 - 1  # sequence numbers are SQLite integers
MAX_AUDIT_PAGE = 1000

Schema = dict[str, Any]

STR: Schema = {"type": "string"}
BOOL: Schema = {"type": "boolean"}
INT: Schema = {"type": "integer"}
OBJ: Schema = {"type": "object"}
NAME: Schema = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": NAME_PATTERN}
SECRET: Schema = {"type": "string", "minLength": 1, "maxLength": MAX_SECRET}
TEXT: Schema = {"type": "string", "maxLength": MAX_TEXT}
# The checksum cannot be a pattern: the format names the rule, and validation applies it.
RECOVERY_KEY: Schema = {
    **SECRET, "format": "recovery-key",
    "description": "24 words of the NATO spelling alphabet (older keys), or 26 whose last "
                   "two are their checksum; case-insensitive, separated by whitespace",
}
# Years 0002-9998: whatever the offset, the time stays representable once moved to UTC.
_YEAR = "^(000[2-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9])-"
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
                      r"(Z|[+-][0-9]{2}:[0-9]{2})")
TIMESTAMP: Schema = {
    "anyOf": [{"type": "string", "const": ""},
              {"type": "string", "format": "date-time", "pattern": _YEAR, "maxLength": 32}],
    "description": "an RFC 3339 date-time (upper-case T and Z, at most 6 fraction digits, "
                   "years 0002-9998), or '' to clear",
}


def _enum(values: tuple[str, ...] | list[str]) -> Schema:
    return {"type": "string", "enum": list(values)}


def _query_int(minimum: int, maximum: int, default: int) -> Schema:
    return {"type": "integer", "minimum": minimum, "maximum": maximum, "default": default}


def _body(required: list[str], **props: Any) -> Schema:
    """A request body: closed, so an unknown field is refused rather than ignored."""
    return {"type": "object", "required": required, "additionalProperties": False,
            "properties": props}


def _out(required: list[str], **props: Any) -> Schema:
    """A response object: open, so that fields may be added without breaking clients."""
    return {"type": "object", "required": required, "properties": props}


def _record(kinds: dict[str, type | tuple[type, ...]], bounded: bool) -> dict[str, Schema]:
    """JSON schemas for a repository's field types (the repository checks them again).
    Bounds are for what is written; what is read may predate them."""
    by_type: dict[Any, Schema] = {
        str: STR, bool: BOOL, (int, float): {"type": "number"}, dict: OBJ,
        (dict, type(None)): {"type": ["object", "null"]}, list: {"type": "array"},
    }
    bound = {"string": "maxLength", "object": "maxProperties", "array": "maxItems"}
    out = {}
    for name, kind in kinds.items():
        schema = dict(by_type[kind])
        first = schema["type"] if isinstance(schema["type"], str) else schema["type"][0]
        if bounded and first in bound:
            schema[bound[first]] = MAX_TEXT if first == "string" else MAX_ITEMS
        out[name] = schema
    return out


REMOTE_FIELDS = {**_record(REMOTE_SCHEMA, True), "dns_credentials": {
    "type": "object", "maxProperties": MAX_ITEMS, "additionalProperties": TEXT}}
APP_BODY_FIELDS = {**_record(APP_FIELDS, True), "Name": {
    **NAME, "readOnly": True,
    "description": "the app's name; taken from the path (a record read back may carry it, "
                   "and then it must equal the path's name)"}}
RECORD_NOTE = f"At most {MAX_PAYLOAD // 1024} KiB as JSON."

# -- response schemas ------------------------------------------------------------------------
MESSAGE = _out(["message"], message=STR)
CHANGED = _out(["changed"], changed=BOOL)
HEALTH_STATE = _out(["status", "message", "checked_at"], status=STR, message=STR,
                    checked_at=STR)
BOOTSTRAP_VIA: Schema = {"enum": ["tpm", "unlock", None],
                         "description": "how the bootstrap volume was mounted, if it is"}
CRYPTO = _out(["initialized", "locked"], initialized=BOOL, locked=BOOL, recovery_key=BOOL,
              bootstrap=BOOTSTRAP_VIA)
VOLUME = _out(
    ["id", "class", "cluster_mode", "follower_policy", "cipher_dir", "mountpoint", "attached",
     "pid", "read_only", "desired_state", "observed_state", "role", "generation",
     "needs_repair", "updated_at"],
    id=STR, cipher_dir=STR, mountpoint=STR, attached=BOOL, updated_at=STR, last_error=STR,
    pool={"type": ["string", "null"], "description": "the storage pool holding it"},
    pid={"type": ["integer", "null"]}, read_only={"type": ["boolean", "null"]},
    cluster_mode={"enum": [*CLUSTER_MODES, None]},
    follower_policy={"enum": [*FOLLOWER_POLICIES, None]},
    desired_state=_enum(journal.STATES), observed_state=_enum(journal.STATES),
    role=_enum(journal.ROLES), generation={"type": "integer", "minimum": 0},
    needs_repair=BOOL, **{"class": {"enum": [*CLASSES, None]}})
ROLE_MAP = {"type": "object", "additionalProperties": _enum(ROLES)}
EVENT = _out(["seq", "topic", "time", "data"], seq=INT, topic=_enum([*ev.TOPICS, ev.GAP]),
             time=STR, data=OBJ)
APP = _out(["Name"], **_record(APP_FIELDS, False))

ERROR: Schema = _out(["error"], error=_out(
    ["code", "message"], code=STR, message=STR, retry_after={"type": "number"},
    file=STR, reason=STR))
STATE_CORRUPT: Schema = _out(["error"], error=_out(
    ["code", "message", "file", "reason"], code={"const": "state_corrupt"}, message=STR,
    file=STR, reason=STR))

# Statuses any request may get: from the socket server (before or around routing), from
# validation against this document, or from an unexpected failure.
COMMON = (400, 403, 405, 422, 431, 500, 501, 503)
STATUS_TEXT = {
    400: "Malformed HTTP, or a body that is not a JSON object, nests too deeply or is "
         "over 1 MiB (`invalid_request`)",
    401: "Wrong password or recovery key (`unauthorized`)",
    403: "The peer may not use the control socket (`forbidden`); any route",
    404: "No such volume, app, pool or remote configuration (`not_found`)",
    405: "Wrong method for this path (`method_not_allowed`); `Allow` lists the right ones",
    409: "Refused in the current state (`conflict`, `not_leader`, `busy`, "
         "`not_initialized`, `already_initialized`, `pool_absent`)",
    422: "Input this document forbids: a wrong type, a missing, unknown or null field, a "
         "bound exceeded, a malformed path or query parameter (`invalid_input`)",
    423: "Locked: unlock first (`locked`)",
    429: "Too many wrong secrets (`too_many_attempts`); wait `retry_after` seconds",
    431: "Request headers over 16 KiB (`headers_too_large`)",
    500: "The operation failed (`failed`), a state file is unusable (`state_corrupt`, with "
         "`file` and `reason`), or an internal error (`internal`)",
    501: "A transfer coding the server does not implement (`not_implemented`)",
    503: "Every connection is busy (`too_many_connections`); retry after `Retry-After`",
}
RETRY_AFTER = {"required": True, "schema": {"type": "integer", "minimum": 1},
               "description": "seconds to wait"}
STATUS_HEADERS = {
    405: {"Allow": {"required": True, "schema": STR, "description": "the path's methods"}},
    429: {"Retry-After": RETRY_AFTER},
    503: {"Retry-After": RETRY_AFTER},
}
PATH_PARAMS = {"id": NAME, "name": NAME}
_TOPICS = "|".join(ev.TOPICS)
EVENTS_QUERY: dict[str, Schema] = {
    "topic": {"type": "array", "maxItems": MAX_TOPICS, "items": {
        "type": "string", "maxLength": 256, "pattern": f"^({_TOPICS})(,({_TOPICS}))*$"}},
    "since": _query_int(0, MAX_SEQ, 0),
    "follow": {**_enum(("0", "1", "false", "true", "no", "yes")), "default": "0"},
}
AUDIT_QUERY: dict[str, Schema] = {"since": _query_int(0, MAX_SEQ, 0),
                                  "limit": _query_int(1, MAX_AUDIT_PAGE, 100)}


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Callable[[Request], Awaitable[Response | Stream]]
    summary: str
    ok: Schema
    errors: tuple[int, ...] = ()
    body: Schema | None = None
    mutates: bool = False
    query: dict[str, Schema] = field(default_factory=dict)
    stream: bool = False
    media: str | None = None  # a streamed body of another type (a bundle download)
    upload: bool = False  # also takes its body as a stream (application/x-tar): a bundle

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.path) + "$")


# -- validation against the published schemas ------------------------------------------------
def _is(kind: str, value: Any) -> bool:
    if kind == "integer":  # JSON Schema: 10.0 is an integer too
        return (isinstance(value, int) or (isinstance(value, float) and value.is_integer())) \
            and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "boolean": bool, "object": dict, "array": list,
                              "null": type(None)}[kind])


@functools.cache
def _regex(pattern: str) -> re.Pattern[str]:
    # JSON Schema patterns are ECMA-262: a final `$` is the end, not "before a newline".
    return re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern)


def _timestamp(value: str) -> bool:
    if not _RFC3339.fullmatch(value):
        return False
    try:
        dt.datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(dt.UTC)
    except (ValueError, OverflowError):
        return False
    return True


def _string_violation(schema: Schema, value: str, where: str) -> str | None:
    try:
        value.encode()
    except UnicodeEncodeError:
        return f"{where} is not valid Unicode"
    if len(value) < schema.get("minLength", 0):
        return f"{where} must not be empty" if schema["minLength"] == 1 else \
            f"{where} must have at least {schema['minLength']} characters"
    if len(value) > schema.get("maxLength", len(value)):
        return f"{where} must have at most {schema['maxLength']} characters"
    if "pattern" in schema and not _regex(schema["pattern"]).search(value):
        return f"{where} must match {schema['pattern']}"
    if schema.get("format") == "date-time" and not _timestamp(value):
        return f"{where} must be an RFC 3339 date-time"
    check = FORMATS.get(schema.get("format", ""))
    if check is not None and (why := check(value)) is not None:
        return f"{where}: {why}"
    return None


def _recovery_key_violation(value: str) -> str | None:
    try:
        recovery.normalize(value)
    except recovery.RecoveryKeyError as exc:
        return str(exc)
    return None


# Formats whose rule a JSON Schema pattern cannot state: the document names the format,
# and validation applies the rule (a test registers a generator for each).
FORMATS: dict[str, Callable[[str], str | None]] = {
    "recovery-key": _recovery_key_violation,
    "pem-private-key": pem.private_key_violation,
    "pem-certificate-chain": pem.certificate_chain_violation,
}


def _violation(schema: Schema, value: Any, where: str) -> str | None:
    """Why `value` breaks `schema` (the JSON Schema subset this document uses), or None."""
    for key in ("oneOf", "anyOf"):
        if key in schema:
            fits = sum(_violation(s, value, where) is None for s in schema[key])
            if fits == 0 or (key == "oneOf" and fits > 1):
                return f"{where}: {schema['description']}"
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(k, value) for k in kinds):
            return f"{where} must be {' or '.join(kinds)}"
    if "const" in schema and value != schema["const"]:
        return f"{where} must be {json.dumps(schema['const'])}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {', '.join(map(str, schema['enum']))}"
    if isinstance(value, str):
        return _string_violation(schema, value, where)
    if _is("number", value) and not schema.get("minimum", value) <= value \
            <= schema.get("maximum", value):
        return f"{where} must be in {schema.get('minimum', '')}..{schema.get('maximum', '')}"
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            return f"{where} must have at most {schema['maxItems']} items"
        if len(value) < schema.get("minItems", 0):
            return f"{where} must have at least {schema['minItems']} items"
        if schema.get("uniqueItems") and len({json.dumps(v) for v in value}) < len(value):
            return f"{where} must not repeat an item"
        for i, item in enumerate(value):
            if "items" in schema and (why := _violation(schema["items"], item, f"{where}[{i}]")):
                return why
    if isinstance(value, dict):
        return _object_violation(schema, value, where)
    return None


def _object_violation(schema: Schema, value: dict[str, Any], where: str) -> str | None:
    props = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in value]
    if missing:
        return f"field {missing[0]!r} is required"
    extra = schema.get("additionalProperties", True)
    if extra is False and set(value) - set(props):
        return f"unknown field(s): {', '.join(sorted(set(value) - set(props)))}"
    if len(value) > schema.get("maxProperties", len(value)):
        return f"{where} must have at most {schema['maxProperties']} entries"
    for k, v in value.items():
        sub = props.get(k, extra)
        name = f"field {k!r}" if where == "request body" else f"{where}[{k!r}]"
        if isinstance(sub, dict) and (why := _violation(sub, v, name)):
            return why
    return None


def _check(schema: Schema, value: Any, where: str) -> None:
    why = _violation(schema, value, where)
    if why is not None:
        raise InvalidInput(why)


_QUERY_INT = re.compile(r"0|[1-9][0-9]{0,18}")


def _query_value(name: str, schema: Schema, raw: str) -> Any:
    if schema.get("type") == "integer":
        if not _QUERY_INT.fullmatch(raw):
            raise InvalidInput(f"query parameter {name!r} must be an integer")
        return int(raw)
    return raw


def _query(schemas: dict[str, Schema], req: Request) -> dict[str, Any]:
    """The declared query parameters, typed and checked; a scalar given twice is refused."""
    out: dict[str, Any] = {}
    for name, schema in schemas.items():
        values = req.query.get(name)
        where = f"query parameter {name!r}"
        if values is None:
            out[name] = schema.get("default")
            continue
        if schema.get("type") == "array":
            value: Any = [_query_value(name, schema["items"], v) for v in values]
        elif len(values) > 1:
            raise InvalidInput(f"{where} given more than once")
        else:
            value = _query_value(name, schema, values[0])
        _check(schema, value, where)
        out[name] = value
    return out


def _field(body: dict[str, Any], name: str, default: Any = None) -> Any:
    """A body field, already checked against the route's schema. An explicit null is
    refused there rather than read as "missing"; refused here too, for any other caller."""
    if name not in body:
        return default
    if body[name] is None:
        raise InvalidInput(f"field {name!r} must not be null")
    return body[name]


def _secret(body: dict[str, Any], name: str) -> bytes:
    value = _field(body, name)
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"field {name!r} must not be empty")
    return value.encode()


class Api:
    def __init__(self, controller: Controller, volumes: VolumeManager, bus: EventBus,
                 registry: LeadershipRegistry, store: ControlStore,
                 devices: DeviceManager | None = None) -> None:
        self.ctl = controller
        self.devices = devices
        self.volumes = volumes
        self.bus = bus
        self.registry = registry
        self.store = store
        self.auth = AuthRepo(store)
        self.remote = RemoteRepo(store)
        self.apps = AppStateRepo(store)
        self.audit = AuditRepo(store)
        s = f"{API}/store"
        v = f"{API}/volumes/{{id}}"
        role_body = _body(["role"], role=_enum(ROLES))
        secret_errors = (401, 409, 429)
        unlock_errors = (*secret_errors, 422)  # 422: a staged bundle that fails its check
        volume_errors = (404, 409, 423)
        store_write = (409, 423)
        staleness = {k: (BOOL if k.endswith("_stale") else TIMESTAMP) for k in AuthRepo.STALENESS}
        self.routes = [
            Route("GET", f"{API}/health", self.health, "Daemon, lock and volume health",
                  _out(["status", "crypto", "control_health", "volumes", "needs_repair",
                        "last_event_seq"], status=_enum(("ok", "degraded")), crypto=CRYPTO,
                       control_health=HEALTH_STATE,
                       volumes={"type": "object", "additionalProperties": STR},
                       devices={"type": "object", "additionalProperties": STR,
                                "description": "pool id -> its disk's health (ok, "
                                               "degraded, failing) once read, else its "
                                               "state (mounted, arriving, leaving, absent, "
                                               "ejected, error)"},
                       needs_repair={"type": "array", "items": STR}, last_event_seq=INT)),
            Route("GET", f"{API}/openapi.json", self.openapi, "This document",
                  _out(["openapi", "info", "paths"], openapi=STR, info=OBJ, paths=OBJ)),
            Route("GET", f"{API}/crypto/status", self.crypto_status,
                  "Initialized / locked, and how bootstrap came up",
                  _out(["initialized", "locked", "bootstrap"], initialized=BOOL, locked=BOOL,
                       bootstrap=BOOTSTRAP_VIA, **{"import": {"type": ["object", "null"]}})),
            Route("POST", f"{API}/crypto/setup", self.setup, "Create the SDEK under a password",
                  MESSAGE, (409,), _body(["password"], password=SECRET)),
            Route("POST", f"{API}/crypto/unlock", self.unlock,
                  "Unlock with the password or the recovery key; mounts bootstrap and control. "
                  "Already unlocked: the secret is still checked. With an import staged, the "
                  "bundle's secret: its state is verified and swapped in.", MESSAGE,
                  unlock_errors,
                  {**_body([], password=SECRET, recovery_key=RECOVERY_KEY),
                   "oneOf": [{"required": ["password"]}, {"required": ["recovery_key"]}],
                   "description": "give exactly one of 'password' or 'recovery_key'"}),
            Route("POST", f"{API}/crypto/lock", self.lock,
                  "Detach control and application volumes, forget the SDEK", MESSAGE, (409,)),
            Route("GET", f"{API}/crypto/recovery-key", self.recovery_status,
                  "Whether a recovery key exists", _out(["present"], present=BOOL)),
            Route("POST", f"{API}/crypto/recovery-key/generate", self.recovery_generate,
                  "Create or rotate the recovery key (unlocked, or with the password)",
                  _out(["recovery_key", "words"], recovery_key=STR, words={
                      "type": "array", "items": STR, "minItems": 26, "maxItems": 26}),
                  (*secret_errors, 423), _body([], password=SECRET)),
            Route("POST", f"{API}/crypto/reset-password", self.reset_password,
                  "Set a new password with the recovery key", MESSAGE, secret_errors,
                  _body(["recovery_key", "new_password"], recovery_key=RECOVERY_KEY,
                        new_password=SECRET)),
            Route("POST", f"{API}/crypto/password", self.change_password,
                  "Change the password (the recovery key stays valid)", MESSAGE, secret_errors,
                  _body(["old_password", "new_password"], old_password=SECRET,
                        new_password=SECRET)),
            Route("GET", f"{API}/volumes", self.volume_list, "All volumes",
                  _out(["volumes"], volumes={"type": "array", "items": VOLUME})),
            Route("POST", f"{API}/volumes", self.volume_ensure, "Ensure a volume exists",
                  VOLUME, (404, 409, 423),
                  _body(["id"], id=NAME, cluster_mode=_enum(CLUSTER_MODES),
                        follower_policy=_enum(FOLLOWER_POLICIES),
                        pool={**NAME, "description": "a storage pool (id or label) to hold "
                                                     "a new volume's cipher dir"},
                        **{"class": _enum(CLASSES)}), True),
            Route("GET", v, self.volume_show, "One volume", VOLUME, (404,)),
            Route("POST", f"{v}/attach", self.volume_attach, "Mount (idempotent)", VOLUME,
                  volume_errors, role_body, True),
            Route("POST", f"{v}/detach", self.volume_detach, "Unmount (409 busy unless lazy)",
                  VOLUME, volume_errors, _body([], lazy=BOOL), True),
            Route("POST", f"{v}/role", self.volume_role, "Change the role, live if mounted",
                  VOLUME, volume_errors, role_body, True),
            Route("POST", f"{v}/fsck", self.volume_fsck,
                  "Authenticate every name, xattr and block of the volume's ciphertext",
                  _out(["id", "ok", "problems", "problem_count", "summary"], id=STR, ok=BOOL,
                       problems={"type": "array", "items": STR}, problem_count=INT,
                       summary=STR), volume_errors, None, True),
            Route("GET", f"{API}/leadership", self.leadership, "The leadership registry",
                  _out(["roles"], roles=ROLE_MAP)),
            Route("POST", f"{API}/leadership", self.leadership_set,
                  f"Set a resource's role in the local registry (at most {MAX_RESOURCES} "
                  "resources: a new one beyond that is 409)",
                  _out(["changed", "roles"], changed=BOOL, roles=ROLE_MAP), (409,),
                  _body(["resource", "role"], resource=NAME, role=_enum(ROLES))),
            Route("GET", f"{API}/events", self.events,
                  "Events as NDJSON, one Event per line; without `follow` the retained "
                  "events after `since`, then the end", EVENT, stream=True, query=EVENTS_QUERY),
            Route("GET", s, self.store_status, "Revision, checksum, role and health",
                  _out(["revision", "checksum", "updated_at", "schema_version", "role",
                        "read_only", "health"], revision=INT, checksum=STR, updated_at=STR,
                       schema_version=INT, role=_enum(ROLES), read_only=BOOL,
                       health=HEALTH_STATE), (423,)),
            Route("POST", f"{s}/check", self.store_check,
                  "Run quick_check now (a leader repairs what it finds)", HEALTH_STATE, (423,)),
            Route("GET", f"{s}/auth", self.auth_get, "Auth state (never the hash)",
                  _out(["initialized", "password_set", *AuthRepo.STALENESS, "updated_at"],
                       initialized=BOOL, password_set=BOOL, updated_at=STR,
                       **{k: BOOL if k.endswith("_stale") else STR
                          for k in AuthRepo.STALENESS}), (423,)),
            Route("POST", f"{s}/auth/initialized", self.auth_initialized,
                  "Mark auth initialized (no-op when it is)", CHANGED, store_write),
            Route("PUT", f"{s}/auth/password-hash", self.auth_hash, "Store the admin hash",
                  MESSAGE, store_write, _body(["password_hash"], password_hash={
                      "type": "string", "maxLength": MAX_TEXT,
                      "pattern": "^argon2id\\$v=19\\$m=[0-9]+,t=[0-9]+,p=[0-9]+"
                                 "\\$[A-Za-z0-9+/]+\\$[A-Za-z0-9+/]+$"})),
            Route("POST", f"{s}/auth/staleness", self.auth_staleness,
                  "Partial update of the staleness flags", CHANGED, store_write,
                  _body([], **staleness)),
            Route("GET", f"{s}/remote", self.remote_get, "The remote configuration",
                  _out([], **_record(REMOTE_SCHEMA, False)), (404, 423)),
            Route("PUT", f"{s}/remote", self.remote_put,
                  f"Replace the remote configuration. {RECORD_NOTE}", MESSAGE, store_write,
                  _body([], **REMOTE_FIELDS)),
            Route("GET", f"{s}/apps", self.apps_list, "App records",
                  _out(["apps"], apps={"type": "array", "items": APP}), (423,)),
            Route("GET", f"{s}/apps/{{name}}", self.apps_get, "One app record", APP,
                  (404, 423)),
            Route("PUT", f"{s}/apps/{{name}}", self.apps_put,
                  f"Create or replace an app record. {RECORD_NOTE}", APP, store_write,
                  _body([], **APP_BODY_FIELDS)),
            Route("DELETE", f"{s}/apps/{{name}}", self.apps_delete, "Delete an app record",
                  MESSAGE, (404, *store_write)),
            Route("GET", f"{s}/audit", self.audit_list, "Audit log, oldest first",
                  _out(["audit"], audit={"type": "array", "items": _out(
                      ["seq", "time", "kind", "source", "data"], seq=INT, time=STR, kind=STR,
                      source=STR, data=OBJ)}), (423,),
                  query=AUDIT_QUERY),
        ]
        self._compiled = [(r, r.pattern) for r in sorted(self.routes,
                                                         key=lambda r: "{" in r.path)]

    def accepts_upload(self, method: str, path: str) -> bool:
        return any(r.upload and r.method == method and p.match(path)
                   for r, p in self._compiled)

    def add_routes(self, routes: list[Route]) -> None:
        """Routes of another room (they share this document and its validation)."""
        self.routes += routes
        self._compiled = [(r, r.pattern) for r in sorted(self.routes,
                                                         key=lambda r: "{" in r.path)]

    # -- dispatch ------------------------------------------------------------------------
    async def dispatch(self, req: Request) -> Response | Stream:
        allowed: list[str] = []
        literal = False  # a path spelled out by a route (/exports/control) is that route's,
        for route, pattern in self._compiled:  # not also a {id} of another
            m = pattern.match(req.path)
            if m is None or (literal and "{" in route.path):
                continue
            if "{" not in route.path and not literal:
                literal, allowed = True, []
            allowed.append(route.method)
            if route.method == req.method:
                self._validate(route, req, m)
                if route.mutates:
                    self.ctl.require_unlocked()
                return await route.handler(req)
        if allowed:
            return Response(405, {"error": {"code": "method_not_allowed",
                                            "message": f"use {', '.join(allowed)}"}},
                            {"Allow": ", ".join(allowed)})
        raise NotFound(f"no route {req.path}")

    @staticmethod
    def _validate(route: Route, req: Request, m: re.Match[str]) -> None:
        """Everything the request carries, against the route's published schemas."""
        req.params = {k: urllib.parse.unquote(v) for k, v in m.groupdict().items()}
        for name, value in req.params.items():
            _check(PATH_PARAMS[name], value, f"path parameter {name!r}")
        _query(route.query, req)
        if req.upload is not None:
            return  # the body is the stream itself; its handler checks it as it arrives
        body = req.json()
        if route.body is None:
            if body:
                raise InvalidInput(f"{route.method} {route.path} takes no request body")
        else:
            _check(route.body, body, "request body")

    def _audit(self, req: Request, kind: str, **data: Any) -> None:
        self.bus.publish("audit", {"kind": kind, "client": req.peer.client, **data})

    # -- health, docs --------------------------------------------------------------------
    async def health(self, req: Request) -> Response:
        vols = self.volumes.list()
        broken = [v["id"] for v in vols if v["needs_repair"] or v["observed_state"] == "error"]
        status = self.ctl.status()
        store_bad = self.store.health["status"] in ("degraded", "error")
        devices = self.devices.summary() if self.devices is not None else {}
        disks_bad = any(s in ("degraded", "failing", "error") for s in devices.values())
        return Response(200, {
            "status": "degraded" if broken or store_bad or disks_bad else "ok",
            "crypto": status,
            "control_health": self.store.health,
            "volumes": {v["id"]: v["observed_state"] for v in vols},
            "devices": devices,
            "needs_repair": broken,
            "last_event_seq": self.bus.last_seq,
        })

    async def openapi(self, req: Request) -> Response:
        return Response(200, openapi_document(self.routes))

    # -- crypto --------------------------------------------------------------------------
    async def crypto_status(self, req: Request) -> Response:
        s = self.ctl.status()
        return Response(200, {"initialized": s["initialized"], "locked": s["locked"],
                              "bootstrap": s["bootstrap"], "import": s["import"]})

    async def setup(self, req: Request) -> Response:
        await self.ctl.keys.setup(_secret(req.json(), "password"))
        self._audit(req, "crypto.setup")
        return Response(200, {"message": "ok"})

    async def unlock(self, req: Request) -> Response:
        body = req.json()
        if "password" in body:
            await self.ctl.unlock(password=_secret(body, "password"), client=req.peer.client)
        else:
            await self.ctl.unlock(recovery_key=_secret(body, "recovery_key").decode(),
                                  client=req.peer.client)
        self._audit(req, "crypto.unlock", method="password" if "password" in body
                    else "recovery_key")
        return Response(200, {"message": "ok"})

    async def lock(self, req: Request) -> Response:
        await self.ctl.lock()
        self._audit(req, "crypto.lock")
        return Response(200, {"message": "ok"})

    async def recovery_status(self, req: Request) -> Response:
        return Response(200, {"present": self.ctl.status()["recovery_key"]})

    async def recovery_generate(self, req: Request) -> Response:
        body = req.json()
        password = _secret(body, "password") if "password" in body else None
        rotated = self.ctl.status()["recovery_key"]
        words = await self.ctl.keys.generate_recovery_key(password, req.peer.client)
        self._audit(req, "auth.recovery_key_generate", rotated=rotated)
        return Response(200, {"recovery_key": words, "words": words.split()})

    async def reset_password(self, req: Request) -> Response:
        body = req.json()
        await self.ctl.keys.reset_password(_secret(body, "recovery_key").decode(),
                                           _secret(body, "new_password"), req.peer.client)
        self._audit(req, "auth.reset_with_recovery", was_locked=self.ctl.keys.locked)
        return Response(200, {"message": "ok"})

    async def change_password(self, req: Request) -> Response:
        body = req.json()
        await self.ctl.keys.change_password(_secret(body, "old_password"),
                                            _secret(body, "new_password"), req.peer.client)
        self._audit(req, "auth.password_change")
        return Response(200, {"message": "ok"})

    # -- volumes -------------------------------------------------------------------------
    async def volume_list(self, req: Request) -> Response:
        return Response(200, {"volumes": self.volumes.list()})

    async def volume_show(self, req: Request) -> Response:
        return Response(200, self.volumes.info(req.params["id"]))

    async def volume_ensure(self, req: Request) -> Response:
        body = req.json()
        pool = body.get("pool")
        if pool is not None:
            if self.devices is None:
                raise NotFound("this daemon manages no storage pools")
            pool = self.devices.resolve(pool)
        info = await self.volumes.ensure(
            _field(body, "id"), _field(body, "class", "application"),
            _field(body, "cluster_mode", "stateful"),
            _field(body, "follower_policy", "read_only"), pool=pool)
        return Response(200, info)

    async def volume_attach(self, req: Request) -> Response:
        role = _field(req.json(), "role")
        return Response(200, await self.volumes.attach(req.params["id"], role))

    async def volume_detach(self, req: Request) -> Response:
        lazy = _field(req.json(), "lazy", False)
        return Response(200, await self.volumes.detach(req.params["id"], lazy=lazy))

    async def volume_fsck(self, req: Request) -> Response:
        return Response(200, await self.volumes.fsck(req.params["id"]))

    async def volume_role(self, req: Request) -> Response:
        role = _field(req.json(), "role")
        return Response(200, await self.volumes.set_role(req.params["id"], role))

    # -- leadership ----------------------------------------------------------------------
    async def leadership(self, req: Request) -> Response:
        return Response(200, {"roles": self.registry.snapshot()})

    async def leadership_set(self, req: Request) -> Response:
        body = req.json()
        changed = self.registry.set_role(_field(body, "resource"), _field(body, "role"))
        return Response(200, {"changed": changed, "roles": self.registry.snapshot()})

    # -- events --------------------------------------------------------------------------
    async def events(self, req: Request) -> Stream:
        args = _query(EVENTS_QUERY, req)
        raw = [t for v in args["topic"] or [] for t in v.split(",")]
        follow = args["follow"] in ("1", "true", "yes")
        return Stream(self._event_lines(raw or None, args["since"], follow))

    async def _event_lines(self, topics: list[str] | None, since: int,
                           follow: bool) -> AsyncIterator[bytes]:
        sub = self.bus.subscribe(topics, since=since)
        try:
            if not follow:
                last = self.bus.last_seq
                while True:
                    if not sub._buf and not sub._missed:
                        return
                    event = await sub.next()
                    yield _line(event)
                    if event.seq >= last:
                        return
            async for event in sub:
                yield _line(event)
        finally:
            self.bus.unsubscribe(sub)

    # -- control store -------------------------------------------------------------------
    async def store_status(self, req: Request) -> Response:
        return Response(200, await self.store.status())

    async def store_check(self, req: Request) -> Response:
        self.store._require_open()
        return Response(200, await self.store.check())

    async def auth_get(self, req: Request) -> Response:
        return Response(200, await self.auth.get())

    async def auth_initialized(self, req: Request) -> Response:
        return Response(200, {"changed": await self.auth.set_initialized()})

    async def auth_hash(self, req: Request) -> Response:
        await self.auth.save_password_hash(_field(req.json(), "password_hash"))
        return Response(200, {"message": "ok"})

    async def auth_staleness(self, req: Request) -> Response:
        return Response(200, {"changed": await self.auth.update_staleness(req.json())})

    async def remote_get(self, req: Request) -> Response:
        return Response(200, await self.remote.get())

    async def remote_put(self, req: Request) -> Response:
        await self.remote.save(req.json())
        return Response(200, {"message": "ok"})

    async def apps_list(self, req: Request) -> Response:
        return Response(200, {"apps": await self.apps.list()})

    async def apps_get(self, req: Request) -> Response:
        return Response(200, await self.apps.get(req.params["name"]))

    async def apps_put(self, req: Request) -> Response:
        return Response(200, await self.apps.upsert(req.params["name"], req.json()))

    async def apps_delete(self, req: Request) -> Response:
        await self.apps.delete(req.params["name"])
        return Response(200, {"message": "ok"})

    async def audit_list(self, req: Request) -> Response:
        args = _query(AUDIT_QUERY, req)
        return Response(200, {"audit": await self.audit.list(args["since"], args["limit"])})


def _line(event: ev.Event) -> bytes:
    return (json.dumps(event.to_json(), separators=(",", ":")) + "\n").encode()


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _response(status: int) -> dict[str, Any]:
    schema = {"anyOf": [_ref("StateCorrupt"), _ref("Error")]} if status == 500 else _ref("Error")
    out: dict[str, Any] = {"description": STATUS_TEXT[status],
                           "content": {"application/json": {"schema": schema}}}
    if status in STATUS_HEADERS:
        out["headers"] = STATUS_HEADERS[status]
    return out


def openapi_document(routes: list[Route]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for r in routes:
        media = r.media or ("application/x-ndjson" if r.stream else "application/json")
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": r.method.lower() + re.sub(r"[^A-Za-z0-9]+", "_", r.path).rstrip("_"),
            "responses": {
                "200": {"description": "OK", "content": {media: {"schema": r.ok}}},
                **{str(code): _response(code) for code in sorted({*COMMON, *r.errors})},
            },
        }
        if r.body is not None:
            needed = bool(r.body["required"]) or "oneOf" in r.body
            content: dict[str, Any] = {"application/json": {"schema": r.body}}
            if r.upload:
                content["application/octet-stream"] = {"schema": {"type": "string",
                                                           "format": "binary"}}
            op["requestBody"] = {"required": needed, "content": content}
        params = [{"name": p, "in": "path", "required": True, "schema": PATH_PARAMS[p]}
                  for p in re.findall(r"\{(\w+)\}", r.path)]
        params += [{"name": name, "in": "query", "required": False, "schema": schema,
                    **({"style": "form", "explode": True} if schema["type"] == "array" else {})}
                   for name, schema in r.query.items()]
        if params:
            op["parameters"] = params
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "piccolo-ctld control API", "version": VERSION,
                 "description": "Requests are checked against this document before anything "
                                "happens: what it forbids is refused (422, or 400 for a body "
                                "that is not a JSON object) and changes nothing."},
        "paths": paths,
        "components": {"schemas": {"Error": ERROR, "StateCorrupt": STATE_CORRUPT,
                                   "Event": EVENT}},
    }
