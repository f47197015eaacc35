"""Routes of storage pools: list, show, init, eject (ctl.devices)."""

from __future__ import annotations

from ctl.api.routes import API, BOOL, INT, STR, Route, _body, _enum, _out
from ctl.api.server import Request, Response
from ctl.devices import marker
from ctl.devices.manager import STATES, DeviceManager
from ctl.errors import Forbidden
from ctl.events import EventBus

NULLABLE_STR = {"type": ["string", "null"]}
POOL = _out(["id", "label", "fs_type", "state", "present", "volumes", "safe_to_remove"],
            id=STR, label=NULLABLE_STR, fs_type=NULLABLE_STR, state=_enum(STATES),
            error=NULLABLE_STR, mountpoint=NULLABLE_STR, present=BOOL,
            device={"type": ["object", "null"]}, volumes={"type": "array", "items": STR},
            health={"type": ["object", "null"]}, safe_to_remove=BOOL,
            last_seen=NULLABLE_STR)
DEVICE_NODE = {"type": "string", "minLength": 6, "maxLength": 255, "pattern": "^/dev/"}
INIT_BODY = _body(["device"], device=DEVICE_NODE,
                  label={"type": "string", "pattern": f"^{marker.LABEL.pattern}$",
                         "maxLength": 12, "default": "piccolo"},
                  fs=_enum(marker.FS_TYPES),
                  yes={**BOOL, "description": "erase a partition table or filesystem found "
                                              "on the device"})


def device_routes(devices: DeviceManager, bus: EventBus) -> list[Route]:
    async def device_list(req: Request) -> Response:
        return Response(200, {"devices": devices.list(), "hotplug": devices.hotplug,
                              "reconciles": devices.reconciles})

    async def device_show(req: Request) -> Response:
        return Response(200, devices.show(req.params["id"]))

    async def device_init(req: Request) -> Response:
        if req.peer.uid != 0:
            raise Forbidden("only root makes a block device a pool: it may erase the disk")
        body = req.json()
        pool = await devices.init(body["device"], body.get("label", "piccolo"),
                                  body.get("fs", "ext4"), bool(body.get("yes", False)))
        bus.publish("audit", {"kind": "device.init", "client": req.peer.client,
                              "device": body["device"], "pool": pool["id"],
                              "erase": bool(body.get("yes", False))})
        return Response(200, pool)

    async def device_eject(req: Request) -> Response:
        res = await devices.eject(req.params["id"], bool(req.json().get("lazy", False)))
        bus.publish("audit", {"kind": "device.eject", "client": req.peer.client,
                              "pool": res["id"], "detached": res["detached"]})
        return Response(200, res)

    d = f"{API}/devices/{{id}}"
    return [
        Route("GET", f"{API}/devices", device_list, "Storage pools, present or remembered",
              _out(["devices", "hotplug", "reconciles"],
                   devices={"type": "array", "items": POOL}, hotplug=STR,
                   reconciles={**INT, "description": "passes of the reconcile so far"})),
        Route("GET", d, device_show, "One pool (by id, label or device name), with its "
              "disk's health", POOL, (404, 409)),
        Route("POST", f"{API}/devices/init", device_init,
              "Make a block device a pool (or adopt the pool on it); root only. Refuses a "
              "device in use or holding / or the state dir, and one holding data unless yes",
              POOL, (409, 423), INIT_BODY, True),
        Route("POST", f"{d}/eject", device_eject,
              "Detach the pool's volumes and unmount it: then the disk is safe to pull "
              "(409 busy unless lazy; locked or not)",
              {**POOL, "properties": {**POOL["properties"], "detached": {
                  "type": "array", "items": STR}, "safe_to_remove": BOOL}},
              (404, 409), _body([], lazy=BOOL)),
    ]
