"""Routes of the boot-before-the-password room: the TPM enrolment of the bootstrap key, and
the pre-unlock assets on the bootstrap volume (usable while locked whenever bootstrap is
mounted; 423 otherwise)."""

from __future__ import annotations

from typing import Any

from ctl.api.routes import (
    API,
    BOOL,
    INT,
    MAX_SECRET,
    MESSAGE,
    NAME,
    OBJ,
    REMOTE_FIELDS,
    STR,
    Route,
    Schema,
    _body,
    _out,
    _record,
)
from ctl.api.server import Request, Response
from ctl.bootstrap.assets import MAX_PEM, Assets
from ctl.bootstrap.tpm import BootstrapTpm
from ctl.controller import Controller
from ctl.errors import Unauthorized
from ctl.events import EventBus
from ctl.paths import BOOTSTRAP
from ctl.store.repos import REMOTE_SCHEMA

PIN: Schema = {"type": "string", "minLength": 4, "maxLength": MAX_SECRET}
PEM_KEY: Schema = {"type": "string", "minLength": 1, "maxLength": MAX_PEM,
                   "format": "pem-private-key",
                   "description": "an unencrypted private key, PEM"}
PEM_CHAIN: Schema = {"type": "string", "minLength": 1, "maxLength": MAX_PEM,
                     "format": "pem-certificate-chain",
                     "description": "a certificate chain, PEM, leaf first"}
PCRS: Schema = {"type": "array", "minItems": 1, "maxItems": 24, "uniqueItems": True,
                "items": {"type": "integer", "minimum": 0, "maximum": 23}}
NULLABLE_STR: Schema = {"type": ["string", "null"]}
TPM_STATUS = _out(
    ["tcti", "enrolled", "available", "bootstrap"], tcti=STR, enrolled=BOOL, available=BOOL,
    pcrs={"type": ["array", "null"], "items": INT}, pin={"type": ["boolean", "null"]},
    bootstrap={"enum": ["tpm", "unlock", None]}, pcrs_changed={"type": ["boolean", "null"]},
    last_failure={"type": ["object", "null"]}, unavailable_reason=STR, error=STR)
CERT = _out(["name", "cert", "key"], name=STR, cert=NULLABLE_STR, key=NULLABLE_STR,
            subject=NULLABLE_STR, not_after=STR)


def bootstrap_routes(ctl: Controller, tpm: BootstrapTpm, assets: Assets,
                     bus: EventBus) -> list[Route]:
    def audit(req: Request, kind: str, **data: Any) -> None:
        bus.publish("audit", {"kind": kind, "client": req.peer.client, **data})

    async def tpm_status(req: Request) -> Response:
        return Response(200, await tpm.status())

    async def tpm_enroll(req: Request) -> Response:
        body = req.json()
        ctl.require_unlocked()
        pin = body.get("pin")
        pcrs = [int(p) for p in body.get("pcrs", [7])]
        out = await tpm.enroll(pcrs, pin.encode() if pin else None)
        audit(req, "tpm.enroll", pcrs=out["pcrs"], pin=bool(pin))
        return Response(200, out)

    async def tpm_reseal(req: Request) -> Response:
        ctl.require_unlocked()
        pin = req.json().get("pin")
        out = await tpm.reseal(pin.encode() if pin else None)
        audit(req, "tpm.reseal", pcrs=out["pcrs"])
        return Response(200, out)

    async def tpm_remove(req: Request) -> Response:
        ctl.require_unlocked()
        await tpm.remove()
        audit(req, "tpm.remove")
        return Response(200, {"message": "ok"})

    async def tpm_unseal(req: Request) -> Response:
        """With a PIN enrolment: the PIN mounts bootstrap while locked. The PIN draws on
        the same attempt budget as every other secret; only a PIN that really opened the
        sealed key clears it."""
        client = req.peer.client
        ctl.keys.backoff.admit(client)
        already = tpm.volumes.mounted(BOOTSTRAP)
        try:
            mounted = await tpm.bring_up(req.json()["pin"].encode())
        except Unauthorized:
            raise  # a wrong PIN: the attempt stays charged
        except BaseException:
            ctl.keys.backoff.refund(client)
            raise
        if mounted and not already and tpm.came_up == "tpm":
            ctl.keys.backoff.success(client)
        else:
            ctl.keys.backoff.refund(client)  # nothing was checked
        return Response(200, {"mounted": mounted, **(await tpm.status())})

    async def remote_get(req: Request) -> Response:
        return Response(200, await assets.remote_get())

    async def remote_put(req: Request) -> Response:
        stored = await assets.remote_put(req.json())
        audit(req, "bootstrap.remote_put", stored=stored)
        return Response(200, {"message": "ok", "stored": stored})

    async def acme_get(req: Request) -> Response:
        return Response(200, await assets.acme_get())

    async def acme_put(req: Request) -> Response:
        body = req.json()
        await assets.acme_put(body["key"], body["account"])
        audit(req, "bootstrap.acme_put")
        return Response(200, {"message": "ok"})

    async def certs_list(req: Request) -> Response:
        return Response(200, {"certs": await assets.certs_list()})

    async def cert_get(req: Request) -> Response:
        return Response(200, await assets.cert_get(req.params["name"]))

    async def cert_put(req: Request) -> Response:
        body = req.json()
        await assets.cert_put(req.params["name"], body["cert"], body["key"])
        audit(req, "bootstrap.cert_put", name=req.params["name"])
        return Response(200, {"message": "ok"})

    async def cert_delete(req: Request) -> Response:
        await assets.cert_delete(req.params["name"])
        audit(req, "bootstrap.cert_delete", name=req.params["name"])
        return Response(200, {"message": "ok"})

    t, b = f"{API}/tpm", f"{API}/bootstrap"
    unlocked, mounted = (409, 423), (404, 423)
    return [
        Route("GET", t, tpm_status, "TPM enrolment of the bootstrap key, and how bootstrap "
              "came up", TPM_STATUS),
        Route("POST", f"{t}/enroll", tpm_enroll, "Seal the bootstrap key to the TPM under "
              "a PCR policy (default PCR 7), optionally with a PIN (unlocked)", TPM_STATUS,
              (*unlocked, 404), _body([], pcrs=PCRS, pin=PIN)),
        Route("POST", f"{t}/reseal", tpm_reseal, "Seal again to the current PCR values "
              "(unlocked; the PIN when enrolled with one)", TPM_STATUS, (*unlocked, 404),
              _body([], pin=PIN)),
        Route("POST", f"{t}/remove", tpm_remove, "Forget the TPM enrolment (unlocked)",
              MESSAGE, unlocked),
        Route("POST", f"{t}/unseal", tpm_unseal, "Mount bootstrap with the PIN of a PIN "
              "enrolment (while locked)", _out(["mounted"], mounted=BOOL), (401, 409, 429),
              _body(["pin"], pin=PIN)),
        Route("GET", f"{b}/remote", remote_get, "The remote configuration on the bootstrap "
              "volume (the file wins; {} when there is none)",
              _out([], **_record(REMOTE_SCHEMA, False)), (423,)),
        Route("PUT", f"{b}/remote", remote_put, "Save the remote configuration (to the store "
              "first when unlocked; while locked it reaches the store at unlock)",
              _out(["message", "stored"], message=STR, stored=BOOL), (409, 423),
              _body([], **REMOTE_FIELDS)),
        Route("GET", f"{b}/acme", acme_get, "The ACME account (key and record)",
              _out(["key", "account"], key=NULLABLE_STR, account={"type": ["object", "null"]}),
              mounted),
        Route("PUT", f"{b}/acme", acme_put, "Save the ACME account", MESSAGE, (423,),
              _body(["key", "account"], key=PEM_KEY, account={**OBJ, "maxProperties": 256})),
        Route("GET", f"{b}/certs", certs_list, "Names of the portal's TLS certificates",
              _out(["certs"], certs={"type": "array", "items": NAME}), (423,)),
        Route("GET", f"{b}/certs/{{name}}", cert_get, "One certificate chain and key", CERT,
              mounted),
        Route("PUT", f"{b}/certs/{{name}}", cert_put, "Save a certificate chain and its key "
              "(checked to belong together)", MESSAGE, (423,),
              _body(["cert", "key"], cert=PEM_CHAIN, key=PEM_KEY)),
        Route("DELETE", f"{b}/certs/{{name}}", cert_delete, "Delete a certificate", MESSAGE,
              mounted),
    ]

