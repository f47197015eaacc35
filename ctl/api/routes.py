"""The routes of the control socket, and the OpenAPI document built from the same table.

Input is validated before anything happens: malformed JSON is 400, a well-formed body with
wrong or missing fields is 422, both in the one error shape. Mutations while locked are 423;
a leader action the leadership registry has not granted is 409.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ctl import events as ev
from ctl.api.server import Request, Response, Stream
from ctl.controller import Controller
from ctl.errors import InvalidInput, NotFound
from ctl.events import EventBus
from ctl.roles import ROLES, LeadershipRegistry
from ctl.store.repos import (
    APP_FIELDS,
    REMOTE_SCHEMA,
    AppStateRepo,
    AuditRepo,
    AuthRepo,
    RemoteRepo,
)
from ctl.store.store import ControlStore
from ctl.volumes.manager import VolumeManager
from ctl.volumes.metadata import CLASSES, CLUSTER_MODES, FOLLOWER_POLICIES

API = "/api/v1"
VERSION = "1.0.0"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Callable[[Request], Awaitable[Response | Stream]]
    summary: str
    body: dict[str, Any] | None = None
    mutates: bool = False

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.path) + "$")


def _field(body: dict[str, Any], name: str, kind: type, required: bool = True,
           choices: tuple[str, ...] | None = None, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        if required:
            raise InvalidInput(f"field {name!r} is required")
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidInput(f"field {name!r} must be {kind.__name__}")
    if choices is not None and value not in choices:
        raise InvalidInput(f"field {name!r} must be one of {', '.join(choices)}")
    return value


def _secret(body: dict[str, Any], name: str) -> bytes:
    value: str = _field(body, name, str)
    if not value:
        raise InvalidInput(f"field {name!r} must not be empty")
    return value.encode()


def _schema(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "additionalProperties": False,
            "properties": props}


STR = {"type": "string"}
BOOL = {"type": "boolean"}


class Api:
    def __init__(self, controller: Controller, volumes: VolumeManager, bus: EventBus,
                 registry: LeadershipRegistry, store: ControlStore) -> None:
        self.ctl = controller
        self.volumes = volumes
        self.bus = bus
        self.registry = registry
        self.store = store
        self.auth = AuthRepo(store)
        self.remote = RemoteRepo(store)
        self.apps = AppStateRepo(store)
        self.audit = AuditRepo(store)
        s = f"{API}/store"
        staleness = {k: (BOOL if k.endswith("_stale") else STR) for k in AuthRepo.STALENESS}
        v = f"{API}/volumes/{{id}}"
        role_body = _schema(["role"], role={"enum": list(ROLES)})
        self.routes = [
            Route("GET", f"{API}/health", self.health, "Daemon, lock and volume health"),
            Route("GET", f"{API}/openapi.json", self.openapi, "This document"),
            Route("GET", f"{API}/crypto/status", self.crypto_status, "Initialized / locked"),
            Route("POST", f"{API}/crypto/setup", self.setup, "Create the SDEK under a password",
                  _schema(["password"], password=STR)),
            Route("POST", f"{API}/crypto/unlock", self.unlock,
                  "Unlock with the password or the recovery key; mounts bootstrap and control",
                  _schema([], password=STR, recovery_key=STR)),
            Route("POST", f"{API}/crypto/lock", self.lock,
                  "Detach control and application volumes, forget the SDEK"),
            Route("GET", f"{API}/crypto/recovery-key", self.recovery_status,
                  "Whether a recovery key exists"),
            Route("POST", f"{API}/crypto/recovery-key/generate", self.recovery_generate,
                  "Create or rotate the recovery key (unlocked, or with the password)",
                  _schema([], password=STR)),
            Route("POST", f"{API}/crypto/reset-password", self.reset_password,
                  "Set a new password with the recovery key",
                  _schema(["recovery_key", "new_password"], recovery_key=STR,
                          new_password=STR)),
            Route("POST", f"{API}/crypto/password", self.change_password,
                  "Change the password (the recovery key stays valid)",
                  _schema(["old_password", "new_password"], old_password=STR,
                          new_password=STR)),
            Route("GET", f"{API}/volumes", self.volume_list, "All volumes"),
            Route("POST", f"{API}/volumes", self.volume_ensure, "Ensure a volume exists",
                  _schema(["id"], id=STR, **{"class": {"enum": list(CLASSES)}},
                          cluster_mode={"enum": list(CLUSTER_MODES)},
                          follower_policy={"enum": list(FOLLOWER_POLICIES)}), True),
            Route("GET", v, self.volume_show, "One volume"),
            Route("POST", f"{v}/attach", self.volume_attach, "Mount (idempotent)",
                  role_body, True),
            Route("POST", f"{v}/detach", self.volume_detach,
                  "Unmount (409 busy unless lazy)", _schema([], lazy=BOOL), True),
            Route("POST", f"{v}/role", self.volume_role, "Change the role, live if mounted",
                  role_body, True),
            Route("GET", f"{API}/leadership", self.leadership, "The leadership registry"),
            Route("POST", f"{API}/leadership", self.leadership_set,
                  "Set a resource's role in the local registry",
                  _schema(["resource", "role"], resource=STR, role={"enum": list(ROLES)})),
            Route("GET", f"{API}/events", self.events,
                  "Events as NDJSON (?topic=T&since=SEQ&follow=1)"),
            Route("GET", s, self.store_status, "Revision, checksum, role and health"),
            Route("POST", f"{s}/check", self.store_check,
                  "Run quick_check now (a leader repairs what it finds)"),
            Route("GET", f"{s}/auth", self.auth_get, "Auth state (never the hash)"),
            Route("POST", f"{s}/auth/initialized", self.auth_initialized,
                  "Mark auth initialized (no-op when it is)"),
            Route("PUT", f"{s}/auth/password-hash", self.auth_hash, "Store the admin hash",
                  _schema(["password_hash"], password_hash=STR)),
            Route("POST", f"{s}/auth/staleness", self.auth_staleness,
                  "Partial update of the staleness flags", _schema([], **staleness)),
            Route("GET", f"{s}/remote", self.remote_get, "The remote configuration"),
            Route("PUT", f"{s}/remote", self.remote_put, "Replace the remote configuration",
                  {"type": "object", "required": [],
                   "properties": {k: {} for k in REMOTE_SCHEMA}}),
            Route("GET", f"{s}/apps", self.apps_list, "App records"),
            Route("GET", f"{s}/apps/{{name}}", self.apps_get, "One app record"),
            Route("PUT", f"{s}/apps/{{name}}", self.apps_put, "Create or replace an app record",
                  {"type": "object", "required": [],
                   "properties": {k: {} for k in APP_FIELDS}}),
            Route("DELETE", f"{s}/apps/{{name}}", self.apps_delete, "Delete an app record"),
            Route("GET", f"{s}/audit", self.audit_list, "Audit log (?since=SEQ&limit=N)"),
        ]
        self._compiled = [(r, r.pattern) for r in self.routes]

    # -- dispatch ------------------------------------------------------------------------
    async def dispatch(self, req: Request) -> Response | Stream:
        allowed = []
        for route, pattern in self._compiled:
            m = pattern.match(req.path)
            if m is None:
                continue
            allowed.append(route.method)
            if route.method == req.method:
                req.params = {k: urllib.parse.unquote(v) for k, v in m.groupdict().items()}
                if route.body is not None or req.method in ("POST", "PUT"):
                    body = req.json()
                    if route.body is not None:
                        unknown = set(body) - set(route.body["properties"])
                        if unknown:
                            raise InvalidInput(f"unknown field(s): {', '.join(sorted(unknown))}")
                if route.mutates:
                    self.ctl.require_unlocked()
                return await route.handler(req)
        if allowed:
            return Response(405, {"error": {"code": "method_not_allowed",
                                            "message": f"use {', '.join(allowed)}"}},
                            {"Allow": ", ".join(allowed)})
        raise NotFound(f"no route {req.path}")

    def _audit(self, req: Request, kind: str, **data: Any) -> None:
        self.bus.publish("audit", {"kind": kind, "client": req.peer.client, **data})

    # -- health, docs --------------------------------------------------------------------
    async def health(self, req: Request) -> Response:
        vols = self.volumes.list()
        broken = [v["id"] for v in vols if v["needs_repair"] or v["observed_state"] == "error"]
        status = self.ctl.status()
        store_bad = self.store.health["status"] in ("degraded", "error")
        return Response(200, {
            "status": "degraded" if broken or store_bad else "ok",
            "crypto": status,
            "control_health": self.store.health,
            "volumes": {v["id"]: v["observed_state"] for v in vols},
            "needs_repair": broken,
            "last_event_seq": self.bus.last_seq,
        })

    async def openapi(self, req: Request) -> Response:
        return Response(200, openapi_document(self.routes))

    # -- crypto --------------------------------------------------------------------------
    async def crypto_status(self, req: Request) -> Response:
        s = self.ctl.status()
        return Response(200, {"initialized": s["initialized"], "locked": s["locked"]})

    async def setup(self, req: Request) -> Response:
        await self.ctl.keys.setup(_secret(req.json(), "password"))
        self._audit(req, "crypto.setup")
        return Response(200, {"message": "ok"})

    async def unlock(self, req: Request) -> Response:
        body = req.json()
        if ("password" in body) == ("recovery_key" in body):
            raise InvalidInput("give exactly one of 'password' or 'recovery_key'")
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
        info = await self.volumes.ensure(
            _field(body, "id", str),
            _field(body, "class", str, False, CLASSES, "application"),
            _field(body, "cluster_mode", str, False, CLUSTER_MODES, "stateful"),
            _field(body, "follower_policy", str, False, FOLLOWER_POLICIES, "read_only"),
        )
        return Response(200, info)

    async def volume_attach(self, req: Request) -> Response:
        role = _field(req.json(), "role", str, True, ROLES)
        return Response(200, await self.volumes.attach(req.params["id"], role))

    async def volume_detach(self, req: Request) -> Response:
        lazy = _field(req.json(), "lazy", bool, False, default=False)
        return Response(200, await self.volumes.detach(req.params["id"], lazy=lazy))

    async def volume_role(self, req: Request) -> Response:
        role = _field(req.json(), "role", str, True, ROLES)
        return Response(200, await self.volumes.set_role(req.params["id"], role))

    # -- leadership ----------------------------------------------------------------------
    async def leadership(self, req: Request) -> Response:
        return Response(200, {"roles": self.registry.snapshot()})

    async def leadership_set(self, req: Request) -> Response:
        body = req.json()
        changed = self.registry.set_role(_field(body, "resource", str),
                                         _field(body, "role", str, True, ROLES))
        return Response(200, {"changed": changed, "roles": self.registry.snapshot()})

    # -- events --------------------------------------------------------------------------
    async def events(self, req: Request) -> Stream:
        topics: list[str] | None = None
        raw = [t for v in req.query.get("topic", []) for t in v.split(",") if t]
        if raw:
            unknown = [t for t in raw if t not in ev.TOPICS]
            if unknown:
                raise InvalidInput(f"unknown topic(s): {', '.join(unknown)}")
            topics = raw
        since_arg = req.arg("since")
        try:
            since = int(since_arg) if since_arg is not None else 0
        except ValueError:
            raise InvalidInput("since must be an integer sequence number") from None
        if since < 0:
            raise InvalidInput("since must be >= 0")
        follow = req.arg("follow") in ("1", "true", "yes")
        return Stream(self._event_lines(topics, since, follow))

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
        await self.auth.save_password_hash(_field(req.json(), "password_hash", str))
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
        try:
            since = int(req.arg("since") or 0)
            limit = int(req.arg("limit") or 100)
        except ValueError:
            raise InvalidInput("since and limit must be integers") from None
        return Response(200, {"audit": await self.audit.list(since, limit)})


def _line(event: ev.Event) -> bytes:
    return (json.dumps(event.to_json(), separators=(",", ":")) + "\n").encode()


def openapi_document(routes: list[Route]) -> dict[str, Any]:
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": STR, "message": STR}}}}
    paths: dict[str, Any] = {}
    for r in routes:
        op: dict[str, Any] = {
            "summary": r.summary,
            "responses": {
                "200": {"description": "OK"},
                **{code: {"description": text,
                          "content": {"application/json": {"schema": {"$ref":
                                                                       "#/components/schemas/Error"}}}}
                   for code, text in (("400", "Malformed request"), ("422", "Invalid input"),
                                      ("404", "Not found"), ("409", "Conflict / not leader"),
                                      ("423", "Locked"), ("429", "Too many attempts"))},
            },
        }
        if r.body is not None:
            op["requestBody"] = {"required": bool(r.body["required"]),
                                 "content": {"application/json": {"schema": r.body}}}
        params = re.findall(r"\{(\w+)\}", r.path)
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": STR}
                                for p in params]
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "piccolo-ctld control API", "version": VERSION},
        "paths": paths,
        "components": {"schemas": {"Error": error}},
    }
