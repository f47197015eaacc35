"""An async client for etcd's v3 JSON gateway, native under trio.

Why the gateway: etcd's gRPC clients are asyncio-only or thread-bound, while the gateway is
plain HTTP/1.1 + JSON that `httpx.AsyncClient` speaks under trio without threads. The
gateway's quirks stay in here: keys and values are base64, every int64 is a JSON string,
zero values are omitted, streaming endpoints report errors in-band.

Every request carries `Grpc-Metadata-hasleader: true`, so a member without quorum answers
503 at once instead of hanging for its own 7 s timeout (and drops watches instead of
keeping them silent forever). Every request is bounded by a short overall timeout; a
transport error, a timeout or a 5xx answer moves on to the next endpoint, and the client
sticks to the endpoint that answered last. Only when no endpoint answers does a call raise
`EtcdUnavailable`; an answer that is an error raises `EtcdError` with etcd's message.

A call that timed out may still have been applied by etcd, and the retry on the next
endpoint sees its effect: `put_if_absent` recognizes its own put by the lease, `revoke`
treats "not found" as done. A lease granted by a lost answer is never kept alive and
expires by itself.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, cast

import httpx
import trio

from ctl.errors import Failed

HASLEADER = {"Grpc-Metadata-hasleader": "true"}
DEFAULT_TIMEOUT = 1.0
_GRPC_UNAVAILABLE = 14
_RETRY_STATUSES = (429,)  # etcd's "too many requests": that member is behind, try another


class EtcdError(Failed):
    """etcd answered, and the answer is an error (its message is kept as it is)."""

    code = "etcd_error"

    def __init__(self, message: str, *, endpoint: str | None = None,
                 http_status: int | None = None, grpc_code: int | None = None) -> None:
        super().__init__(message, endpoint=endpoint, http_status=http_status,
                         grpc_code=grpc_code)
        self.endpoint = endpoint
        self.http_status = http_status
        self.grpc_code = grpc_code


class EtcdUnavailable(EtcdError):
    """No endpoint answered in time, or none that answered has a leader (no quorum)."""

    status, code = 503, "etcd_unavailable"


class LeaseNotFound(EtcdError):
    """The lease does not exist (any more): it expired or was revoked."""

    code = "lease_not_found"


class EtcdCompacted(EtcdError):
    """A watch asked for history that etcd has compacted away: re-read the key."""

    code = "etcd_compacted"

    def __init__(self, message: str, compact_revision: int, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class Lease:
    id: int
    ttl: int


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class PutResult:
    """The outcome of a put-if-absent: `won` when the key is ours (under our lease);
    otherwise `create_revision`, `holder` and `holder_lease` describe the key as it stands.
    `revision` is the store revision of the answer (watch from `revision + 1`)."""

    won: bool
    create_revision: int
    holder: str
    holder_lease: int
    revision: int


@dataclass(frozen=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    value: str | None  # None for a delete
    create_revision: int  # 0 for a delete
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class MemberStatus:
    endpoint: str
    reachable: bool
    member_id: int | None = None
    leader: int | None = None  # None: unreachable, or the member knows no leader
    raft_term: int | None = None
    version: str | None = None
    error: str | None = None

    @property
    def is_leader(self) -> bool:
        return self.member_id is not None and self.member_id == self.leader


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _unb64(data: object) -> str:
    if not data:
        return ""
    try:
        return base64.b64decode(str(data), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as e:
        raise EtcdError(f"etcd returned a key or value that is not base64 UTF-8: {e}") from e


def _int(value: object) -> int:
    """The gateway's int64s are strings, and zero is left out."""
    if value is None or value == "":
        return 0
    try:
        return int(cast("str | int", value))
    except (TypeError, ValueError) as e:
        raise EtcdError(f"etcd returned a malformed number: {value!r}") from e


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(key=_unb64(raw.get("key")), value=_unb64(raw.get("value")),
                    create_revision=_int(raw.get("create_revision")),
                    mod_revision=_int(raw.get("mod_revision")),
                    version=_int(raw.get("version")), lease=_int(raw.get("lease")))


def _revision(data: dict[str, Any]) -> int:
    header = data.get("header")
    return _int(header.get("revision")) if isinstance(header, dict) else 0


def _failure(status: int, data: object) -> tuple[int, str, int | None] | None:
    """(HTTP status, message, gRPC code) when the answer is an error, else None. Unary
    endpoints answer errors with an HTTP status; streaming ones in-band with 200."""
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
        code = err.get("grpc_code")
        return (_int(err.get("http_code")) or 500, str(err.get("message") or "error"),
                code if isinstance(code, int) else None)
    if status != 200:
        if isinstance(data, dict):
            code = data.get("code")
            message = str(data.get("message") or data.get("error") or f"HTTP {status}")
            return status, message, code if isinstance(code, int) else None
        return status, f"HTTP {status}", None
    if not isinstance(data, dict):
        return 502, "the answer is not a JSON object", None
    return None


def _retryable(status: int, grpc_code: int | None) -> bool:
    return status >= 500 or status in _RETRY_STATUSES or grpc_code == _GRPC_UNAVAILABLE


def _error(message: str, endpoint: str, status: int, grpc_code: int | None) -> EtcdError:
    cls = LeaseNotFound if "lease not found" in message else EtcdError
    return cls(message, endpoint=endpoint, http_status=status, grpc_code=grpc_code)


def _parse(text: str) -> object:
    """A unary answer is one JSON object; a streaming one (keepalive) is JSON lines, of
    which a single request gets exactly one."""
    text = text.strip()
    if not text:
        raise ValueError("empty answer")
    return json.loads(text.splitlines()[0])


class _Body(httpx.AsyncByteStream):
    """A JSON request body handed over in one piece by a plain iterator. httpx's own body
    stream is an async generator, and a send cancelled after its first chunk leaves it
    suspended for the garbage collector (which trio reports as a ResourceWarning)."""

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data


def _normalize(endpoint: str) -> str:
    url = httpx.URL(endpoint)
    if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/"):
        raise ValueError(f"an etcd endpoint is http(s)://HOST:PORT, not {endpoint!r}")
    return str(url.copy_with(path="")).rstrip("/")


class Watch:
    """One watch stream on one key. Iterating yields events and never ends quietly: when
    the stream breaks or ends it raises `EtcdUnavailable` (or `EtcdCompacted`/`EtcdError`
    when etcd cancels it), and the caller re-reads the key before watching again."""

    def __init__(self, response: httpx.Response, lines: AsyncGenerator[str, None],
                 endpoint: str, revision: int) -> None:
        self._response = response
        self._lines = lines
        self._pending: collections.deque[WatchEvent] = collections.deque()
        self.endpoint = endpoint
        self.revision = revision  # the store revision when the watch was created

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        while not self._pending:
            message = await self._next_message()
            self._pending.extend(self._events(message))
        return self._pending.popleft()

    async def _next_message(self) -> dict[str, Any]:
        """The next `result` of the stream, with errors and cancellations raised."""
        while True:
            try:
                line = await self._lines.__anext__()
            except StopAsyncIteration:
                raise EtcdUnavailable("the watch stream ended",
                                      endpoint=self.endpoint) from None
            except httpx.HTTPError as e:
                raise EtcdUnavailable(f"the watch stream broke: {type(e).__name__} {e}",
                                      endpoint=self.endpoint) from e
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except ValueError as e:
                raise EtcdUnavailable("the watch stream sent something that is not JSON",
                                      endpoint=self.endpoint) from e
            failure = _failure(200, data)
            if failure is not None:
                status, message, code = failure
                if _retryable(status, code):
                    raise EtcdUnavailable(message, endpoint=self.endpoint,
                                          http_status=status, grpc_code=code)
                raise _error(message, self.endpoint, status, code)
            result = data.get("result")
            if not isinstance(result, dict):
                continue
            if result.get("canceled"):
                compact = _int(result.get("compact_revision"))
                if compact:
                    raise EtcdCompacted(f"revision compacted up to {compact}", compact,
                                        endpoint=self.endpoint)
                reason = str(result.get("cancel_reason") or "etcd cancelled the watch")
                raise EtcdUnavailable(reason, endpoint=self.endpoint)
            return result

    @staticmethod
    def _events(result: dict[str, Any]) -> list[WatchEvent]:
        out = []
        for raw in result.get("events") or ():
            kv = _kv(raw.get("kv") or {})
            if raw.get("type") == "DELETE":
                out.append(WatchEvent("delete", kv.key, None, 0, kv.mod_revision, 0))
            else:
                out.append(WatchEvent("put", kv.key, kv.value, kv.create_revision,
                                      kv.mod_revision, kv.lease))
        return out

    async def aclose(self) -> None:
        """Close the stream. Shielded and bounded: closing a socket needs no answer.

        httpx reads a stream through a chain of nested async generators; closing the
        outermost one leaves the inner ones to the garbage collector (and trio warns).
        Reading once more under a cancelled scope unwinds the whole chain instead: the
        first checkpoint raises Cancelled through every layer, which closes the
        connection on its way out."""
        with trio.CancelScope(shield=True), trio.move_on_after(DEFAULT_TIMEOUT):
            try:
                with trio.CancelScope() as drain:
                    drain.cancel()
                    while True:
                        await self._lines.__anext__()
            except (StopAsyncIteration, Exception):
                pass  # finished, or broke on the way out: either way, unwound
            finally:
                await self._lines.aclose()
                await self._response.aclose()


class EtcdClient:
    """A client over one or more endpoints of one etcd cluster (`http://HOST:PORT`).

    `timeout` bounds every request to one endpoint; one call tries each endpoint at most
    once, starting from the one that answered last. Use it as an async context manager,
    or call `aclose`."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        if not timeout > 0:
            raise ValueError("the timeout must be positive")
        self.endpoints = [_normalize(e) for e in endpoints]
        self.timeout = timeout
        self._current = 0
        # trust_env=False: a proxy from the environment has no business between the
        # daemon and its cluster. No cap on connections: every open watch holds one.
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), trust_env=False,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=16))

    @property
    def endpoint(self) -> str:
        """The endpoint the next call tries first."""
        return self.endpoints[self._current]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()

    # -- transport ---------------------------------------------------------------------
    def _request(self, url: str, body: dict[str, Any], *, hasleader: bool = True,
                 stream: bool = False) -> httpx.Request:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(HASLEADER if hasleader else {})}
        # A watch is quiet for as long as its key is: no read timeout on streams.
        timeout = (httpx.Timeout(self.timeout, read=None) if stream
                   else httpx.USE_CLIENT_DEFAULT)
        request = self._http.build_request("POST", url, content=data, headers=headers,
                                           timeout=timeout)
        request.stream = _Body(data)
        return request

    async def _call(self, path: str, body: dict[str, Any], *,
                    stream: bool = False) -> dict[str, Any]:
        """POST to each endpoint in turn until one answers; the answer (unwrapped from
        `result` for streaming endpoints) or its error."""
        failures: list[str] = []
        start = self._current
        for i in range(len(self.endpoints)):
            index = (start + i) % len(self.endpoints)
            endpoint = self.endpoints[index]
            try:
                with trio.fail_after(self.timeout):
                    response = await self._http.send(
                        self._request(f"{endpoint}/v3/{path}", body))
            except trio.TooSlowError:
                failures.append(f"{endpoint}: no answer within {self.timeout:g} s")
                continue
            except httpx.HTTPError as e:
                failures.append(f"{endpoint}: {type(e).__name__} {e}".rstrip())
                continue
            try:
                data = _parse(response.text)
            except ValueError:
                failures.append(f"{endpoint}: HTTP {response.status_code}, not JSON")
                continue
            failure = _failure(response.status_code, data)
            if failure is None:
                self._current = index
                result = cast("dict[str, Any]", data)
                if stream:
                    inner = result.get("result")
                    return inner if isinstance(inner, dict) else {}
                return result
            status, message, code = failure
            if _retryable(status, code):
                failures.append(f"{endpoint}: {message}")
                continue
            self._current = index
            raise _error(message, endpoint, status, code)
        raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(failures))

    # -- leases ------------------------------------------------------------------------
    async def grant(self, ttl: int) -> Lease:
        """A new lease; etcd may round the TTL up to its minimum."""
        if ttl < 1:
            raise ValueError("a lease TTL is a whole number of seconds, at least 1")
        data = await self._call("lease/grant", {"TTL": int(ttl)})
        if data.get("error"):
            raise EtcdError(str(data["error"]))
        return Lease(id=_int(data.get("ID")), ttl=_int(data.get("TTL")))

    async def keepalive(self, lease_id: int) -> int:
        """Renew the lease once; its TTL, or 0 when the lease is gone."""
        result = await self._call("lease/keepalive", {"ID": str(lease_id)}, stream=True)
        return max(0, _int(result.get("TTL")))

    async def revoke(self, lease_id: int) -> bool:
        """Revoke the lease and delete its keys; False when it was gone already."""
        try:
            await self._call("lease/revoke", {"ID": str(lease_id)})
        except LeaseNotFound:
            return False
        return True

    async def lease_ttl(self, lease_id: int) -> int | None:
        """The seconds the lease has left, or None when it is gone."""
        data = await self._call("lease/timetolive", {"ID": str(lease_id)})
        ttl = _int(data.get("TTL"))
        return None if ttl < 0 else ttl

    # -- keys --------------------------------------------------------------------------
    async def put_if_absent(self, key: str, value: str, *, lease: int = 0) -> PutResult:
        """Create `key` only if it does not exist, in one txn (create_revision == 0).

        With a lease, a put that a timed-out attempt already applied is recognized as ours
        by its lease, so a retry on another endpoint still reports `won`."""
        k = _b64(key)
        put: dict[str, Any] = {"key": k, "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        data = await self._call("kv/txn", {
            "compare": [{"key": k, "result": "EQUAL", "target": "CREATE",
                         "create_revision": "0"}],
            "success": [{"request_put": put}],
            "failure": [{"request_range": {"key": k}}],
        })
        revision = _revision(data)
        if data.get("succeeded"):
            return PutResult(True, revision, value, lease, revision)
        try:
            kvs = data["responses"][0]["response_range"].get("kvs") or []
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise EtcdError("etcd's txn answer has no range response") from e
        if not kvs:
            raise EtcdError("the put-if-absent txn failed, yet the key is absent")
        kv = _kv(kvs[0])
        return PutResult(bool(lease) and kv.lease == lease, kv.create_revision, kv.value,
                         kv.lease, revision)

    async def put(self, key: str, value: str, *, lease: int = 0) -> int:
        """Set `key` unconditionally; the store revision of the write."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return _revision(await self._call("kv/put", body))

    async def range(self, key: str) -> tuple[KeyValue | None, int]:
        """The key (None when absent) and the store revision it was read at, which is
        where a watch that must miss nothing starts (+1)."""
        data = await self._call("kv/range", {"key": _b64(key)})
        kvs = data.get("kvs") or []
        return (_kv(kvs[0]) if kvs else None), _revision(data)

    async def get(self, key: str) -> KeyValue | None:
        """The key (value, create/mod revision, lease), or None; a linearizable read."""
        return (await self.range(key))[0]

    async def delete(self, key: str) -> int:
        """Delete `key`; how many keys went (0 or 1)."""
        return _int((await self._call("kv/deleterange", {"key": _b64(key)})).get("deleted"))

    # -- watch -------------------------------------------------------------------------
    @asynccontextmanager
    async def watch(self, key: str, *,
                    start_revision: int | None = None) -> AsyncIterator[Watch]:
        """A watch on one key, from `start_revision` (default: from now on):

            async with client.watch(key, start_revision=rev + 1) as events:
                async for event in events: ...

        The stream has no read timeout (etcd sends nothing while the key is quiet), so a
        caller that must notice a silent, frozen member re-reads the key now and then."""
        watch = await self._open_watch(key, start_revision)
        try:
            yield watch
        finally:
            await watch.aclose()

    async def _open_watch(self, key: str, start_revision: int | None) -> Watch:
        create: dict[str, Any] = {"key": _b64(key)}
        if start_revision:
            create["start_revision"] = str(start_revision)
        body = {"create_request": create}
        failures: list[str] = []
        start = self._current
        for i in range(len(self.endpoints)):
            index = (start + i) % len(self.endpoints)
            endpoint = self.endpoints[index]
            request = self._request(f"{endpoint}/v3/watch", body, stream=True)
            response: httpx.Response | None = None
            opened = False
            try:
                with trio.fail_after(self.timeout):
                    response = await self._http.send(request, stream=True)
                    if response.status_code != 200:
                        await response.aread()
                        failure = _failure(response.status_code, _parse(response.text))
                        assert failure is not None
                        raise _error(failure[1], endpoint, failure[0], failure[2])
                    lines = cast("AsyncGenerator[str, None]", response.aiter_lines())
                    watch = Watch(response, lines, endpoint, 0)
                    try:
                        watch.revision = _revision(await watch._next_message())
                    except BaseException:
                        await watch.aclose()
                        raise
                    self._current = index
                    opened = True
                    return watch
            except trio.TooSlowError:
                failures.append(f"{endpoint}: no answer within {self.timeout:g} s")
            except (httpx.HTTPError, ValueError) as e:
                failures.append(f"{endpoint}: {type(e).__name__} {e}".rstrip())
            except EtcdUnavailable as e:
                failures.append(f"{endpoint}: {e.message}")
            except EtcdError as e:
                if e.http_status is not None and _retryable(e.http_status, e.grpc_code):
                    failures.append(f"{endpoint}: {e.message}")
                else:
                    self._current = index
                    raise
            finally:
                if not opened and response is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(self.timeout):
                        await response.aclose()
        raise EtcdUnavailable("no etcd endpoint accepted the watch: " + "; ".join(failures))

    # -- cluster -----------------------------------------------------------------------
    async def status(self) -> list[MemberStatus]:
        """Each endpoint's view, asked concurrently and without the hasleader header (a
        member without quorum still says what it knows): reachable, member id, the leader
        it follows and its raft term. One list entry per endpoint, in order."""
        out: list[MemberStatus] = [MemberStatus(e, False) for e in self.endpoints]

        async def ask(i: int, endpoint: str) -> None:
            try:
                with trio.fail_after(self.timeout):
                    response = await self._http.send(self._request(
                        f"{endpoint}/v3/maintenance/status", {}, hasleader=False))
                data = _parse(response.text)
            except trio.TooSlowError:
                out[i] = MemberStatus(endpoint, False,
                                      error=f"no answer within {self.timeout:g} s")
                return
            except (httpx.HTTPError, ValueError) as e:
                out[i] = MemberStatus(endpoint, False,
                                      error=f"{type(e).__name__} {e}".rstrip())
                return
            failure = _failure(response.status_code, data)
            if failure is not None:
                out[i] = MemberStatus(endpoint, True, error=failure[1])
                return
            d = cast("dict[str, Any]", data)
            header = d.get("header") if isinstance(d.get("header"), dict) else {}
            assert isinstance(header, dict)
            try:
                out[i] = MemberStatus(
                    endpoint, True, member_id=_int(header.get("member_id")),
                    leader=_int(d.get("leader")) or None,
                    raft_term=_int(d.get("raftTerm") or header.get("raft_term")),
                    version=str(d.get("version") or "") or None)
            except EtcdError as e:
                out[i] = MemberStatus(endpoint, True, error=e.message)

        async with trio.open_nursery() as nursery:
            for i, endpoint in enumerate(self.endpoints):
                nursery.start_soon(ask, i, endpoint)
        return out
