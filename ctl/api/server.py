"""HTTP/1.1 over a Unix socket, on trio, with h11 doing the protocol.

Every connection's peer credentials (SO_PEERCRED) are checked before a byte is parsed:
root, the daemon's own user, and members of the socket's group may talk to the daemon;
anyone else gets 403. Request bodies and headers are bounded. Handlers return a JSON
`Response` or a `Stream` of NDJSON lines (sent chunked).

Nothing a client does may end `serve`, and no crowd of clients may lock another one out:

- At most `max_connections` connections are held, derived from RLIMIT_NOFILE so that
  descriptors stay free for the daemon's own work (mount children, the store, journals).
- At that limit a newcomer evicts the connection that has been idle longest; connections
  running a handler or an event stream are never evicted. Only when every connection is
  busy is the newcomer answered 503 `too_many_connections` (nothing was run; retry).
- A kept-alive connection may idle for IDLE_TIMEOUT, a request must then arrive whole
  within REQUEST_TIMEOUT, and a client that stops reading is dropped after SEND_TIMEOUT.
- Oversized headers get 431 and malformed requests 400, in the JSON error shape.
- accept() failing for want of descriptors or memory is logged once per burst, sheds idle
  connections and is retried after a short back-off.
"""

from __future__ import annotations

import contextlib
import errno
import http
import json
import logging
import os
import resource
import select
import socket
import struct
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio

from ctl.errors import CtlError, Forbidden, InvalidRequest

log = logging.getLogger("ctl.api")

MAX_BODY = 1024 * 1024
MAX_HEADERS = 16 * 1024
RECEIVE_SIZE = 64 * 1024
UPLOAD_TYPES = (b"application/x-tar", b"application/octet-stream")
UPLOAD_IDLE = 60.0  # seconds an upload may pause before it is given up
SOCKET_MODE = 0o660

# A kept-alive connection waiting for its next request. The CLI sends its request at once.
IDLE_TIMEOUT = 15.0
# From the first byte of a request to its last: bounds slow (slowloris) senders.
REQUEST_TIMEOUT = 30.0
# One response, or one event-stream line, to be taken up by the client.
SEND_TIMEOUT = 30.0
# After an error answer: how long to keep reading (and dropping) what the client still
# sends, so that closing with unread data does not reset the connection under the answer.
LINGER_TIMEOUT = 2.0
LINGER_BYTES = MAX_BODY + MAX_HEADERS
# How often an event stream whose client shut only its sending side is checked for the
# client having gone altogether.
HANGUP_POLL = 5.0

# The kernel caps this at net.core.somaxconn (4096 by default since Linux 5.4). Queued
# connections cost the daemon no descriptor, so a burst of clients waits here, not fails.
LISTEN_BACKLOG = 4096
# Descriptors never handed to connections: a quarter of the limit, and at least this many.
RESERVED_FDS = 128
# Connections being refused at once (each holds a descriptor while its 503 is written);
# beyond that, accepting pauses until one is done.
MAX_REFUSING = 32
# Bounds on the connection limit whatever RLIMIT_NOFILE says: the ceiling bounds memory.
MIN_CONNECTIONS = 8
MAX_CONNECTIONS = 1024
# Idle connections closed when accept() runs out of descriptors or memory.
SHED_ON_EXHAUSTION = 8
ACCEPT_BACKOFF_MIN = 0.01
ACCEPT_BACKOFF_MAX = 0.5
_EXHAUSTION = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

# JSON error codes for the statuses h11 hints at when it rejects a request.
_PROTOCOL_CODES = {431: "headers_too_large", 501: "not_implemented"}


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    @property
    def client(self) -> str:
        return f"uid:{self.uid}"


class Upload:
    """A request body taken as it arrives, never whole in memory: a bundle sent to be
    imported. `receive()` gives the next piece, b"" at the end; a client that stalls for
    UPLOAD_IDLE seconds or leaves mid-way ends it with UploadBroken."""

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        self._stream = stream
        self._conn = conn
        self.complete = False

    async def receive(self) -> bytes:
        while not self.complete:
            try:
                event = self._conn.next_event()
                if event is h11.NEED_DATA:
                    with trio.fail_after(UPLOAD_IDLE):
                        data = await self._stream.receive_some(RECEIVE_SIZE)
                    self._conn.receive_data(data)
                    continue
            except (h11.RemoteProtocolError, trio.TooSlowError, trio.BrokenResourceError,
                    trio.ClosedResourceError) as exc:
                raise UploadBroken(f"the upload ended early: {exc or 'the client stalled'}")\
                    from None
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                self.complete = True
            else:
                raise UploadBroken("the upload ended early: the client left")
        return b""


class UploadBroken(OSError):
    pass


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    peer: Peer
    params: dict[str, str] = field(default_factory=dict)
    upload: Upload | None = None

    def json(self) -> dict[str, Any]:
        if not self.body.strip():
            return {}
        try:
            obj = json.loads(self.body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidRequest("request body is not valid JSON") from None
        except RecursionError:
            raise InvalidRequest("request body is nested too deeply") from None
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
    content_type: str = "application/x-ndjson"
    headers: dict[str, str] = field(default_factory=dict)


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


def groups_of(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


def connection_limit(nofile: int | None = None) -> int:
    """How many connections to hold at once under a descriptor limit of `nofile` (default:
    the soft RLIMIT_NOFILE). A quarter of the limit (at least RESERVED_FDS) stays with the
    daemon's own work, MAX_REFUSING with refusals; the rest goes to connections."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    spare = nofile - max(RESERVED_FDS, nofile // 4) - MAX_REFUSING
    return max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, spare))


def raw_error(status: int, code: str, message: str,
              headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A complete error response with `connection: close`, built without h11: it is sent
    where h11 cannot help (the request was unparseable, or never read)."""
    payload = (json.dumps({"error": {"code": code, "message": message}}) + "\n").encode()
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
             "content-type: application/json", f"content-length: {len(payload)}",
             "connection: close", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


class _Burst:
    """Logs the first of a run of like events and, when the run ends, how many there were:
    a flood costs two log lines, not one per connection."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0

    def hit(self, detail: str) -> None:
        if self.count == 0:
            log.warning("%s: %s", self.what, detail)
        self.count += 1

    def end(self) -> None:
        if self.count > 1:
            log.warning("%s: %d times in all, now over", self.what, self.count)
        self.count = 0


@dataclass(eq=False)
class _Slot:
    """One held connection as the accept loop sees it: evictable unless busy."""

    sock: trio.socket.SocketType
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    # Since the connection was accepted or last answered, not since its last byte: a slow
    # sender trickling a header does not look fresh.
    idle_since: float = field(default_factory=trio.current_time)
    busy: bool = False  # a handler or an event stream is running on it


class ApiServer:
    def __init__(self, socket_path: Path, dispatch: Handler, *,
                 max_connections: int | None = None,
                 uploads: Callable[[str, str], bool] = lambda method, path: False) -> None:
        self.socket_path = socket_path
        self.dispatch = dispatch
        self.uploads = uploads
        self.max_connections = max_connections or connection_limit()
        self._fixed_limit = max_connections is not None
        self._group = -1
        self._inode = -1
        self._slots: set[_Slot] = set()
        self._refusing = 0
        self._room = trio.Event()  # set (and replaced) whenever a connection or refusal ends
        self._accept_failures = _Burst("accept() failing")
        self._evictions = _Burst("connection limit reached, evicting idle connections")
        self._refusals = _Burst("every connection busy, refusing newcomers with 503")

    def allowed(self, peer: Peer) -> bool:
        if peer.uid in (0, os.geteuid()):
            return True
        return self._group >= 0 and (peer.gid == self._group
                                     or self._group in groups_of(peer.pid))

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listener = await self._listen()
        log.info("serving up to %d connections at once (RLIMIT_NOFILE %d)",
                 self.max_connections, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await self._accept_loop(listener, nursery)
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                if os.stat(self.socket_path).st_ino == self._inode:  # not a successor's
                    self.socket_path.unlink()

    async def _listen(self) -> trio.socket.SocketType:
        path = self.socket_path
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            path.unlink()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(str(path))
            os.chmod(path, SOCKET_MODE)
            sock.listen(LISTEN_BACKLOG)
        except BaseException:
            sock.close()
            raise
        st = os.stat(path)
        self._group, self._inode = st.st_gid, st.st_ino
        return sock

    async def _accept_loop(self, listener: trio.socket.SocketType,
                           nursery: trio.Nursery) -> None:
        backoff = ACCEPT_BACKOFF_MIN
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:
                # Out of descriptors or memory, or a connection that died in the queue:
                # none of it is fatal. Idle connections give back descriptors and memory;
                # the pause keeps a still-readable listener from spinning the loop.
                self._accept_failures.hit(exc.strerror or str(exc))
                if exc.errno in _EXHAUSTION:
                    if not self._fixed_limit:  # the limit may have been changed under us
                        self.max_connections = connection_limit()
                    self._shed(min(self.max_connections,
                                   len(self._slots) - SHED_ON_EXHAUSTION))
                await trio.sleep(backoff)
                backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
                continue
            backoff = ACCEPT_BACKOFF_MIN
            self._accept_failures.end()
            await self._admit(sock, nursery)

    async def _admit(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        """Hold the new connection, evicting the longest-idle one at the limit; when every
        connection is busy, answer 503. With MAX_REFUSING answers already being written,
        wait for one of those or a connection to end: meanwhile newcomers queue in the
        listen backlog, which costs the daemon nothing."""
        try:
            while True:
                if len(self._slots) >= self.max_connections:
                    self._shed(self.max_connections - 1)
                else:
                    self._evictions.end()
                if len(self._slots) < self.max_connections:
                    self._refusals.end()
                    slot = _Slot(sock)
                    self._slots.add(slot)
                    nursery.start_soon(self._connection, slot)
                    return
                if self._refusing < MAX_REFUSING:
                    self._refusals.hit(f"{len(self._slots)} busy connections")
                    self._refusing += 1
                    nursery.start_soon(self._send_refusal, sock)
                    return
                await self._room.wait()
        except BaseException:
            sock.close()
            raise

    def _made_room(self) -> None:
        """Wake an accept loop waiting in `_admit` for a connection or refusal to end."""
        self._room.set()
        self._room = trio.Event()

    def _shed(self, target: int) -> None:
        """Evict the longest-idle connections until at most `target` are held (or none idle
        is left). Their descriptors are closed here, before the next accept()."""
        while len(self._slots) > max(target, 0):
            idle = [s for s in self._slots if not s.busy]
            if not idle:
                return
            victim = min(idle, key=lambda s: s.idle_since)
            self._evictions.hit(f"{len(self._slots)} held, limit {self.max_connections}")
            self._slots.discard(victim)
            victim.scope.cancel()
            victim.sock.close()

    async def _send_refusal(self, sock: trio.socket.SocketType) -> None:
        try:
            await self._reject(trio.SocketStream(sock), 503, "too_many_connections",
                               f"the daemon is serving {self.max_connections} busy "
                               "connections; retry shortly", [("retry-after", "1")])
        except OSError:
            pass
        finally:
            self._refusing -= 1
            sock.close()
            self._made_room()

    async def _connection(self, slot: _Slot) -> None:
        try:
            with slot.scope:
                await self._converse(trio.SocketStream(slot.sock), slot)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                h11.ProtocolError, OSError):
            pass  # the client went away, stalled, broke the protocol or was evicted
        except Exception:
            # One connection's trouble must never take the daemon (and every other
            # connection) down with it.
            log.exception("connection failed")
        finally:
            self._slots.discard(slot)
            slot.sock.close()
            self._made_room()

    async def _converse(self, stream: trio.SocketStream, slot: _Slot) -> None:
        peer = peer_credentials(slot.sock)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        allowed = self.allowed(peer)
        while True:
            slot.busy, slot.idle_since = False, trio.current_time()
            req = await self._read_request(stream, conn, peer)
            if req is None:
                return
            slot.busy = True
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
            await self._send(stream, conn, result, head=req.method == "HEAD")
            if req.upload is not None and not req.upload.complete:
                return  # answered before the body ended (refused): the rest is not read
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

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
        """The next request, or None when the connection should close: the client left,
        idled past IDLE_TIMEOUT, took longer than REQUEST_TIMEOUT from its first byte, or
        sent something unacceptable (then it has been answered)."""
        head: h11.Request | None = None
        body = bytearray()
        rejected: tuple[int, str, str] | None = None
        with trio.move_on_after(IDLE_TIMEOUT) as deadline:
            started = False
            try:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(RECEIVE_SIZE)
                        if data and not started:
                            started = True
                            deadline.deadline = trio.current_time() + REQUEST_TIMEOUT
                        conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Request):
                        head = event
                        if self._is_upload(head):
                            return self._request_of(head, b"", peer, Upload(stream, conn))
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > MAX_BODY:
                            rejected = (400, "invalid_request",
                                        f"request body exceeds {MAX_BODY} bytes")
                            break
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return None
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                message = (f"request headers exceed {MAX_HEADERS} bytes" if status == 431
                           else f"malformed request: {str(exc)[:200]}")
                rejected = (status, _PROTOCOL_CODES.get(status, "invalid_request"), message)
        if rejected is not None:
            await self._reject(stream, *rejected)
            return None
        if head is None or deadline.cancelled_caught:
            return None  # nothing, or a request that did not arrive in time: drop it
        return self._request_of(head, bytes(body), peer)

    def _is_upload(self, head: h11.Request) -> bool:
        """A request whose body is a stream for its handler (a bundle), not JSON to read."""
        ctype = dict(head.headers).get(b"content-type", b"").split(b";")[0].strip().lower()
        path = urllib.parse.urlsplit(head.target.decode("ascii", "replace")).path
        return ctype in UPLOAD_TYPES and self.uploads(head.method.decode(), path)

    @staticmethod
    def _request_of(head: h11.Request, body: bytes, peer: Peer,
                    upload: Upload | None = None) -> Request:
        target = urllib.parse.urlsplit(head.target.decode("ascii", "replace"))
        return Request(
            method=head.method.decode(),
            path=target.path,
            query=urllib.parse.parse_qs(target.query, keep_blank_values=True),
            headers={k.decode().lower(): v.decode("latin-1") for k, v in head.headers},
            body=body,
            peer=peer,
            upload=upload,
        )

    async def _reject(self, stream: trio.SocketStream, status: int, code: str, message: str,
                      headers: Iterable[tuple[str, str]] = ()) -> None:
        """Answer with an error and end the connection. The bytes are written directly, as
        h11 may be in its ERROR state; then, with our side shut, whatever the client is still
        sending is read and dropped for a moment, because closing a Unix socket with unread
        data resets it and the client might lose the answer."""
        with trio.move_on_after(LINGER_TIMEOUT):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(raw_error(status, code, message, headers))
                await stream.send_eof()
                dropped = 0
                while dropped < LINGER_BYTES:
                    data = await stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        break
                    dropped += len(data)

    async def _send(self, stream: trio.SocketStream, conn: h11.Connection,
                    resp: Response, head: bool = False) -> None:
        payload = b"" if resp.body is None else (json.dumps(resp.body) + "\n").encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(payload)))]
        headers += list(resp.headers.items())
        data = conn.send(h11.Response(status_code=resp.status, headers=headers))
        if not head:  # a response to HEAD has the headers of the GET and no body
            data += conn.send(h11.Data(data=payload))
        data += conn.send(h11.EndOfMessage())
        with trio.fail_after(SEND_TIMEOUT):
            await stream.send_all(data)

    async def _send_stream(self, stream: trio.SocketStream, conn: h11.Connection,
                           result: Stream) -> None:
        headers = [("content-type", result.content_type), ("transfer-encoding", "chunked"),
                   ("connection", "close"), *result.headers.items()]
        try:
            with trio.fail_after(SEND_TIMEOUT):
                await stream.send_all(conn.send(h11.Response(status_code=result.status,
                                                             headers=headers)))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._cancel_on_hangup, stream, nursery.cancel_scope)
                try:
                    async for line in result.lines:
                        with trio.fail_after(SEND_TIMEOUT):
                            await stream.send_all(conn.send(h11.Data(data=line)))
                    with trio.fail_after(SEND_TIMEOUT):
                        await stream.send_all(conn.send(h11.EndOfMessage()))
                except (trio.BrokenResourceError, trio.ClosedResourceError,
                        trio.TooSlowError):
                    pass  # the client left or stopped reading
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            aclose = getattr(result.lines, "aclose", None)
            if aclose is not None:
                await aclose()

    @staticmethod
    async def _cancel_on_hangup(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        """A followed event stream mostly waits for events; without watching for the
        client's end of the connection, a client that left would hold its (unevictable)
        connection until the next event happened to be written. End of file may also be a
        client that only shut its sending side and still reads: that one keeps its stream
        until it closes altogether."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while await stream.receive_some(RECEIVE_SIZE):
                pass  # nothing more is expected from the client; drop it
        while not _hung_up(stream.socket):
            await trio.sleep(HANGUP_POLL)
        scope.cancel()


def _hung_up(sock: trio.socket.SocketType) -> bool:
    """Whether the peer has closed both directions (POLLHUP), not just its sending side."""
    if sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLHUP)
    return any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL)
               for _, ev in poller.poll(0))
