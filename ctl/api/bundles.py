"""Routes of backups: export jobs and their bundles, imports and the pending import.

A job runs in the daemon; its start answers at once with the job record, which a client
follows (`GET .../{id}` or the `*_progress` / `*_result` events). The older daemon's
`POST /exports/control|full` are kept as aliases that wait for the bundle.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from ctl.api.routes import API, BOOL, NAME, OBJ, STR, Route, _body, _enum, _out, _query
from ctl.api.server import Peer, Request, Response, Stream, groups_of
from ctl.bundles import format as fmt
from ctl.bundles.export import Exporter
from ctl.bundles.imports import Importer
from ctl.bundles.jobs import Job, Jobs
from ctl.controller import Controller
from ctl.errors import Conflict, Failed, Forbidden, NotFound

MAX_PATH = 4096
PATH = {"type": "string", "minLength": 1, "maxLength": MAX_PATH, "pattern": "^/"}
JOB = _out(["id", "type", "kind", "state", "progress"], id=STR, type=_enum(("export", "import")),
           kind=STR, state=_enum(("running", "done", "failed")), started_at=STR,
           finished_at={"type": ["string", "null"]}, progress=OBJ, result=OBJ,
           error={"type": ["object", "null"]})
EXPORT_BODY = _body(["kind"], kind=_enum(fmt.KINDS),
                    volumes={"type": "array", "items": NAME, "maxItems": 256},
                    output=PATH)
IMPORT_BODY = _body(["path"], path=PATH, keyset=PATH, force=BOOL)
UPLOAD_QUERY = {"force": {**_enum(("true", "false")), "default": "false",
                          "description": "with a bundle sent as the body: replace this "
                                         "device's state"},
                "keyset": {**PATH, "description": "with an older envelope sent as the body"}}
CHUNK = 1 << 20
PATH_TIMEOUT = 10.0
T = TypeVar("T")


def bundle_routes(controller: Controller, exporter: Exporter, importer: Importer,
                  jobs: Jobs) -> list[Route]:
    def job_of(req: Request, kind: str) -> Job:
        job = jobs.get(req.params["id"])
        if job is None or job.type != kind:
            raise NotFound(f"no {kind} job {req.params['id']}")
        return job

    async def export_start(req: Request) -> Response:
        body = req.json()
        if body.get("output") and req.peer.uid != 0:
            raise Forbidden("only root chooses where a bundle is written: export to the "
                            "state dir and download it (piccoloctl export ... --output -)")
        plan = await exporter.plan(body["kind"], body.get("volumes") or [],
                                   body.get("output"), req.peer.client)
        return Response(200, exporter.start(plan).to_json())

    def alias(kind: str) -> Any:
        async def run(req: Request) -> Response:
            job = exporter.start(await exporter.plan(kind, [], None, req.peer.client))
            await job.done.wait()
            if job.error:
                raise Conflict(job.error["message"]) if job.error["code"] == "conflict" \
                    else _failed(job.error)
            return Response(200, {"path": job.result["path"], "kind": kind, "job": job.to_json()})
        return run

    async def export_list(req: Request) -> Response:
        running = jobs.running
        return Response(200, {"exports": exporter.history(),
                              "running": running.to_json() if running else None})

    async def export_get(req: Request) -> Response:
        return Response(200, job_of(req, "export").to_json())

    async def export_bundle(req: Request) -> Stream:
        job = job_of(req, "export")
        if req.peer.uid != 0 and job.client != req.peer.client:
            raise Forbidden("a bundle is sent to root or to the client that made it")
        if job.state != "done":
            raise Conflict(f"export {job.id} is {job.state}: no bundle to send")
        path = Path(job.result["path"])
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"the bundle {path} is gone") from None
        return Stream(_Chunks(fd), content_type="application/x-tar",
                      headers={"x-piccolo-sha256": str(job.result.get("sha256", ""))})

    async def import_start(req: Request) -> Response:
        if req.upload is not None:  # the bundle is the body: answered once it is staged
            args = _query(UPLOAD_QUERY, req)
            if args["keyset"]:
                await _off_loop(_peer_may_read, req.peer, Path(args["keyset"]))
            source = await _off_loop(importer.plan, None, args["keyset"],
                                     args["force"] == "true", req.peer.client, req.upload)
            job = importer.start(source)
            await job.done.wait()
            return Response(200, job.to_json())
        body = req.json()
        for given in (body["path"], body.get("keyset")):
            if given:
                await _off_loop(_peer_may_read, req.peer, Path(given))
        source = await _off_loop(importer.plan, body["path"], body.get("keyset"),
                                 bool(body.get("force")), req.peer.client)
        return Response(200, importer.start(source).to_json())

    async def import_status(req: Request) -> Response:
        running = jobs.running if jobs.running and jobs.running.type == "import" else None
        return Response(200, {"pending": importer.status(),
                              "running": running.to_json() if running else None})

    async def import_get(req: Request) -> Response:
        return Response(200, job_of(req, "import").to_json())

    async def import_abort(req: Request) -> Response:
        return Response(200, await controller.abort_import(req.peer.client))

    e, i = f"{API}/exports", f"{API}/imports"
    listing = _out(["exports", "running"], exports={"type": "array", "items": OBJ},
                   running={"type": ["object", "null"]})
    started = (409, 423)
    return [
        Route("POST", e, export_start,
              "Start an export (kind control: bootstrap and control; full: those and the "
              "application volumes, or the ones listed); answers with the job. An `output` "
              "that exists is refused (never overwritten)", JOB, started,
              EXPORT_BODY),
        Route("GET", e, export_list, "Past exports (time, kind, size, SHA-256, revision) and "
              "the running job", listing),
        Route("POST", f"{e}/control", alias("control"),
              "Export bootstrap and control, and wait for the bundle", _out(
                  ["path", "kind"], path=STR, kind=STR, job=JOB), started),
        Route("POST", f"{e}/full", alias("full"),
              "Export every volume, and wait for the bundle", _out(
                  ["path", "kind"], path=STR, kind=STR, job=JOB), started),
        Route("GET", f"{e}/{{id}}", export_get, "One export job", JOB, (404,)),
        Route("GET", f"{e}/{{id}}/bundle", export_bundle, "The bundle of a finished export",
              {"type": "string", "format": "binary"}, (404, 409), stream=True,
              media="application/x-tar"),
        Route("POST", i, import_start,
              "Stage a bundle from a path on this machine, or sent as the body "
              "(application/x-tar; answered once staged); checked entry by entry, nothing "
              "goes live before an unlock with its password or recovery key", JOB,
              (404, 409), IMPORT_BODY, query=UPLOAD_QUERY, upload=True),
        Route("GET", i, import_status, "The staged import, if any, and the running job",
              _out(["pending", "running"], pending={"type": ["object", "null"]},
                   running={"type": ["object", "null"]})),
        Route("GET", f"{i}/{{id}}", import_get, "One import job", JOB, (404,)),
        Route("POST", f"{i}/abort", import_abort,
              "Drop the staged import; the previous state stays (or comes back)",
              _out(["id", "status"], id=STR, status=STR), (404, 409)),
    ]


def _peer_may_read(peer: Peer, path: Path) -> None:
    """The daemon reads as root: a client that is not reads only what it could read."""
    if peer.uid == 0:
        return
    try:
        st = path.stat()
    except OSError:
        return  # the import itself reports a missing file
    if not (st.st_uid == peer.uid or st.st_mode & stat.S_IROTH
            or (st.st_gid in _groups(peer) and st.st_mode & stat.S_IRGRP)):
        raise Forbidden(f"{path} is not readable by uid {peer.uid}")


def _groups(peer: Peer) -> set[int]:
    return {peer.gid} | groups_of(peer.pid)


async def _off_loop(fn: Callable[..., T], *args: Any) -> T:
    """A step that touches paths a client named: in a thread, bounded, since a path on a
    dead or hostile mount could otherwise hang the whole daemon."""
    try:
        with trio.fail_after(PATH_TIMEOUT):
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
    except trio.TooSlowError:
        raise Failed(f"a path given did not answer within {PATH_TIMEOUT:.0f} s") from None


def _failed(error: dict[str, str]) -> Exception:
    exc = Failed(error["message"])
    exc.code = error["code"]
    return exc


class _Chunks:
    """A bundle's bytes for a Stream. The file is closed by aclose() even when iteration
    never began (the client left before the headers went out), which a generator's
    `finally` would not do."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        data = await trio.to_thread.run_sync(os.read, self.fd, CHUNK)
        if not data:
            raise StopAsyncIteration
        return data

    async def aclose(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

