"""HTTP/1.1 over a Unix socket, on trio, with h11 doing the protocol.

Every connection's peer credentials (SO_PEERCRED) are checked before a byte is parsed:
root, the daemon's own user, and members of the socket's group may talk to the daemon;
anyone else gets 403. Request bodies and headers are bounded. Handlers return a JSON
`Response` or a `Stream` of NDJSON lines (sent chunked).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio

from ctl.errors import CtlError, Forbidden, InvalidRequest

log = logging.getLogger("ctl.api")

MAX_BODY = 1024 * 1024
MAX_HEADERS = 16 * 1024
READ_TIMEOUT = 30.0
SOCKET_MODE = 0o660


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    @property
    def client(self) -> str:
        return f"uid:{self.uid}"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    peer: Peer
    params: dict[str, str] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        if not self.body.strip():
            return {}
        try:
            obj = json.loads(self.body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidRequest("request body is not valid JSON") from None
        if not isinstance(obj, dict):
            raise InvalidRequest("request body must be a JSON object")
        return obj

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass
class Response:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Stream:
    lines: AsyncIterator[bytes]
    status: int = 200


Handler = Callable[[Request], Awaitable[Response | Stream]]


def error_response(exc: CtlError) -> Response:
    body = {"error": {"code": exc.code, "message": exc.message, **exc.details}}
    headers = {}
    retry = exc.details.get("retry_after")
    if isinstance(retry, (int, float)):
        headers["Retry-After"] = str(max(1, int(retry + 0.999)))
    return Response(exc.status, body, headers)


def peer_credentials(sock: trio.socket.SocketType) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def _groups_of(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


class ApiServer:
    def __init__(self, socket_path: Path, dispatch: Handler) -> None:
        self.socket_path = socket_path
        self.dispatch = dispatch
        self._group = -1

    def allowed(self, peer: Peer) -> bool:
        if peer.uid in (0, os.geteuid()):
            return True
        return self._group >= 0 and (peer.gid == self._group
                                     or self._group in _groups_of(peer.pid))

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        path = self.socket_path
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            path.unlink()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(path))
        os.chmod(path, SOCKET_MODE)
        self._group = os.stat(path).st_gid
        sock.listen(64)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    conn, _ = await sock.accept()
                    nursery.start_soon(self._connection, conn)
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def _connection(self, sock: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(sock)
        try:
            peer = peer_credentials(sock)
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
            allowed = self.allowed(peer)
            while True:
                req = await self._read_request(stream, conn, peer)
                if req is None:
                    return
                if not allowed:
                    # Answered only after reading the (bounded) request, so the client sees
                    # the refusal rather than a reset connection; nothing is dispatched.
                    log.warning("refused connection from uid %d (pid %d)", peer.uid, peer.pid)
                    await self._send(stream, conn, error_response(
                        Forbidden("peer not allowed to use the control socket")))
                    return
                result = await self._handle(req)
                if isinstance(result, Stream):
                    await self._send_stream(stream, conn, result)
                    return
                await self._send(stream, conn, result)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()

    async def _handle(self, req: Request) -> Response | Stream:
        try:
            return await self.dispatch(req)
        except CtlError as exc:
            return error_response(exc)
        except Exception:
            log.exception("internal error handling %s %s", req.method, req.path)
            return Response(500, {"error": {"code": "internal", "message": "internal error"}})

    async def _read_request(self, stream: trio.SocketStream, conn: h11.Connection,
                            peer: Peer) -> Request | None:
        head: h11.Request | None = None
        body = bytearray()
        with trio.move_on_after(READ_TIMEOUT) as deadline:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(event, h11.Request):
                    head = event
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY:
                        await self._send(stream, conn, error_response(
                            InvalidRequest("request body too large")))
                        return None
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return None
        if head is None or deadline.cancelled_caught:
            return None  # nothing, or a request that did not arrive in time: drop it
        target = urllib.parse.urlsplit(head.target.decode("ascii", "replace"))
        return Request(
            method=head.method.decode(),
            path=target.path,
            query=urllib.parse.parse_qs(target.query),
            headers={k.decode().lower(): v.decode("latin-1") for k, v in head.headers},
            body=bytes(body),
            peer=peer,
        )

    async def _send(self, stream: trio.SocketStream, conn: h11.Connection,
                    resp: Response) -> None:
        payload = b"" if resp.body is None else (json.dumps(resp.body) + "\n").encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(payload)))]
        headers += list(resp.headers.items())
        await stream.send_all(conn.send(h11.Response(status_code=resp.status, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=payload)))
        await stream.send_all(conn.send(h11.EndOfMessage()))

    async def _send_stream(self, stream: trio.SocketStream, conn: h11.Connection,
                           result: Stream) -> None:
        headers = [("content-type", "application/x-ndjson"), ("transfer-encoding", "chunked"),
                   ("connection", "close")]
        await stream.send_all(conn.send(h11.Response(status_code=result.status,
                                                     headers=headers)))
        try:
            async for line in result.lines:
                await stream.send_all(conn.send(h11.Data(data=line)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
        finally:
            aclose = getattr(result.lines, "aclose", None)
            if aclose is not None:
                await aclose()
