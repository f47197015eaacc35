"""The control socket under pressure: connection floods beyond the descriptor limit, slow
senders, oversized requests, crowds of concurrent clients, a restart under a client.

A real daemon throughout, on its Unix socket only. Every loop is bounded in count and time;
nothing asserts on how long anything took.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ctl.api.server import IDLE_TIMEOUT, MAX_BODY, MAX_REFUSING, connection_limit
from ctl.cli import ApiError, Client, UnixHTTPConnection
from tests.daemon import Daemon

pytestmark = pytest.mark.timeout(120)

LOW_NOFILE = 256
FLOOD = 400  # idle connections: well beyond LOW_NOFILE
PARTIAL_HEAD = b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\nX-Slow: "
NEWCOMERS = 2 * MAX_REFUSING  # refused at once: more than the daemon answers at a time
CLI_CROWD = 100  # CLI processes at once: beyond the old accept queue of 64
THREAD_CROWD = 200


# -- helpers -------------------------------------------------------------------------------
@contextlib.contextmanager
def soft_nofile(limit: int) -> Iterator[None]:
    """Lower this process's soft descriptor limit for a moment, so that a daemon started
    meanwhile inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    below = sum(int(fd) < limit for fd in os.listdir("/proc/self/fd"))
    assert below < limit - 32, f"{below} descriptors below {limit} already in use"
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.contextmanager
def own_fds(n: int) -> Iterator[None]:
    """Room for this process to hold `n` sockets at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 1024)), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def daemon_nofile(d: Daemon) -> int:
    assert d.proc is not None
    return resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE)[0]


def connect(path: Path, stack: contextlib.ExitStack, timeout: float = 10.0) -> socket.socket:
    """A raw connection, retrying a full accept queue (EAGAIN) for up to `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except BlockingIOError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
            continue
        stack.callback(s.close)
        return s


def read_response(s: socket.socket, limit: int = 1 << 20) -> tuple[int, dict[str, str], bytes]:
    """Everything the daemon sends until it closes: status, headers, body."""
    data = b""
    while len(data) < limit:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    assert data, "the connection was closed without an answer"
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def read_head(s: socket.socket) -> int:
    """The status of a response whose body keeps coming (an event stream)."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b"\r\n", 1)[0].split()[1])


def hung_up(socks: list[socket.socket]) -> list[socket.socket]:
    """Those of `socks` the daemon has closed (their end of file is readable now)."""
    poller = select.poll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLIN | select.POLLHUP)
    return [by_fd[fd] for fd, ev in poller.poll(0) if ev & select.POLLHUP]


def server_side_connections(path: Path) -> int:
    """Connections to the socket at `path`, accepted or still queued, as the kernel lists
    them (the listener itself excluded)."""
    n = 0
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == str(path) and fields[3] != "00010000":
                n += 1
    return n


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@contextlib.contextmanager
def stopped(d: Daemon) -> Iterator[None]:
    """The daemon frozen (SIGSTOP), as a daemon too busy to accept: connections pile up in
    its accept queue."""
    assert d.proc is not None
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)


def assert_healthy(d: Daemon) -> None:
    assert d.proc is not None and d.proc.poll() is None, d.log()[-3000:]
    assert d.call("GET", "/health")["status"] in ("ok", "degraded")
    assert "Traceback" not in d.log(), d.log()[-3000:]


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with Daemon(tmp_path) as d:
        yield d


@pytest.fixture
def low_fd_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon started with RLIMIT_NOFILE LOW_NOFILE (soft)."""
    d = Daemon(tmp_path)
    with soft_nofile(LOW_NOFILE):
        d.start()
    try:
        assert daemon_nofile(d) == LOW_NOFILE
        with own_fds(FLOOD + 64):
            yield d
    finally:
        d.stop()


# -- connection floods ---------------------------------------------------------------------
@pytest.mark.parametrize("partial", [b"", PARTIAL_HEAD], ids=["idle", "slowloris"])
def test_flood_beyond_fd_limit_does_not_lock_out_a_client(low_fd_daemon: Daemon,
                                                          partial: bytes) -> None:
    d = low_fd_daemon
    with contextlib.ExitStack() as stack:
        flood = []
        for _ in range(FLOOD):
            s = connect(d.socket, stack)
            if partial:
                s.sendall(partial)
            flood.append(s)
        if partial:  # keep trickling, as a slow sender does (one round)
            for s in flood:
                with contextlib.suppress(OSError):
                    s.send(b"a")
        # A client arriving during the flood is served: it displaces the longest-idle
        # connection rather than waiting for a slot or being refused.
        assert d.call("GET", "/health")["status"] in ("ok", "degraded")
        assert d.ctl("health").returncode == 0
        assert d.proc is not None and d.proc.poll() is None
        # The daemon held no more connections than its limit; the rest were closed.
        assert len(hung_up(flood)) >= FLOOD - connection_limit(LOW_NOFILE)
    assert_healthy(d)


def test_busy_connections_are_kept_and_a_newcomer_gets_503(low_fd_daemon: Daemon) -> None:
    d = low_fd_daemon
    with contextlib.ExitStack() as stack:
        streams: list[socket.socket] = []
        refused = False
        for _ in range(LOW_NOFILE):  # a followed event stream per connection until refused
            s = connect(d.socket, stack)
            s.sendall(b"GET /api/v1/events?follow=1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
            status = read_head(s)
            if status == 503:
                refused = True
                break
            assert status == 200
            streams.append(s)
        assert refused, "every stream was accepted: the daemon holds no limit"
        assert len(streams) <= connection_limit(LOW_NOFILE)
        # A crowd of newcomers: each one is answered, in the JSON error shape, and none is
        # dropped unanswered however many arrive at once.
        def newcomer() -> tuple[int, dict[str, str], bytes]:
            with contextlib.ExitStack() as own:
                s = connect(d.socket, own)
                s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
                return read_response(s)

        with ThreadPoolExecutor(max_workers=NEWCOMERS) as pool:
            answers = list(pool.map(lambda _: newcomer(), range(NEWCOMERS)))
        for status, headers, body in answers:
            assert status == 503 and headers["content-type"] == "application/json"
            assert "retry-after" in headers
            err = json.loads(body)["error"]
            assert err["code"] == "too_many_connections" and err["message"]
        # Event streams are busy connections: none was evicted for the newcomers.
        assert hung_up(streams) == []
        # A client with little patience gets the 503 once its retries run out ...
        with pytest.raises(ApiError) as exc_info:
            Client(str(d.socket), timeout=0.5).call("GET", "/health")
        assert exc_info.value.status == 503
        assert exc_info.value.code == "too_many_connections"
        # ... and one that waits is served as soon as a stream ends.
        streams.pop().close()
        assert d.call("GET", "/health")["status"] in ("ok", "degraded")
    assert_healthy(d)


def test_an_event_stream_outlives_a_half_close(daemon: Daemon) -> None:
    """A client that shuts only its sending side still reads its stream: the daemon's
    watch for departed clients tells that apart from a client that closed."""
    d = daemon
    with contextlib.ExitStack() as stack:
        s = connect(d.socket, stack)
        s.sendall(b"GET /api/v1/events?follow=1&topic=leadership_role_changed HTTP/1.1\r\n"
                  b"Host: localhost\r\n\r\n")
        assert read_head(s) == 200
        s.shutdown(socket.SHUT_WR)
        assert d.call("POST", "/leadership", {"resource": "half-close", "role": "follower"})[
            "changed"]
        seen = b""
        while b"half-close" not in seen and len(seen) < 65536:
            chunk = s.recv(4096)
            assert chunk, "the stream ended instead of delivering the event"
            seen += chunk
    assert_healthy(d)


def test_an_idle_connection_is_closed(daemon: Daemon) -> None:
    with contextlib.ExitStack() as stack:
        s = connect(daemon.socket, stack, timeout=IDLE_TIMEOUT + 30)
        assert s.recv(1) == b""  # end of file: the daemon let it go
    assert_healthy(daemon)


def test_accept_out_of_descriptors_is_survived(daemon: Daemon) -> None:
    """The limit lowered under a running daemon: accept() itself fails with EMFILE."""
    d = daemon
    assert d.proc is not None
    in_use = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
    hard = resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE, (in_use + 16, hard))
    with own_fds(128), contextlib.ExitStack() as stack:
        flood = [connect(d.socket, stack) for _ in range(64)]
        assert d.call("GET", "/health")["status"] in ("ok", "degraded")
        assert d.proc.poll() is None
        assert hung_up(flood)  # idle connections were shed to make room
    assert_healthy(d)
    # Logged once per burst of failures, not once per failed accept().
    assert 1 <= d.log().count("accept() failing") <= 10


# -- oversized and malformed requests ------------------------------------------------------
def test_oversized_header_gets_431_in_the_json_error_shape(daemon: Daemon) -> None:
    d = daemon
    with contextlib.ExitStack() as stack:
        s = connect(d.socket, stack)
        s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\nX-Big: "
                  + b"a" * 200_000 + b"\r\n\r\n")
        status, headers, body = read_response(s)  # read to the close: the daemon closes
        assert status == 431 and headers["content-type"] == "application/json"
        assert headers["connection"] == "close"
        err = json.loads(body)["error"]
        assert err["code"] == "headers_too_large" and err["message"]

    # The same through http.client, which sends the whole request before reading.
    conn = UnixHTTPConnection(str(d.socket), 10)
    try:
        conn.request("GET", "/api/v1/health", headers={"X-Big": "b" * 200_000})
        resp = conn.getresponse()
        assert resp.status == 431
        assert json.loads(resp.read())["error"]["code"] == "headers_too_large"
    finally:
        conn.close()
    assert_healthy(d)


def test_malformed_and_oversized_requests_are_answered_not_dropped(daemon: Daemon) -> None:
    d = daemon
    with contextlib.ExitStack() as stack:
        s = connect(d.socket, stack)
        s.sendall(b"NOT AN HTTP REQUEST\r\n\r\n")
        status, headers, body = read_response(s)
        assert status == 400 and headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == "invalid_request"

    conn = UnixHTTPConnection(str(d.socket), 10)
    try:
        conn.request("POST", "/api/v1/leadership", body=b" " * (2 * MAX_BODY),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 400
        assert json.loads(resp.read())["error"]["code"] == "invalid_request"
    finally:
        conn.close()
    assert_healthy(d)


# -- crowds of clients ---------------------------------------------------------------------
def test_a_crowd_of_cli_processes_all_succeed(daemon: Daemon) -> None:
    d = daemon
    d.call("GET", "/health")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with stopped(d):
            for _ in range(CLI_CROWD):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "ctl.cli", "--socket", str(d.socket), "status"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    stdin=subprocess.DEVNULL))
            # Until every CLI has queued its connection (or given up on it).
            wait_until(lambda: server_side_connections(d.socket)
                       + sum(p.poll() is not None for p in procs) >= CLI_CROWD, 60)
        outcomes = [(p.wait(timeout=90), p.stderr.read() if p.stderr else b"")
                    for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
            for f in (p.stdout, p.stderr):
                if f is not None:
                    f.close()
    failed = [err.decode(errors="replace") for rc, err in outcomes if rc != 0]
    assert not failed, f"{len(failed)} of {CLI_CROWD} failed, e.g. {failed[0]}"
    assert_healthy(d)


def test_a_crowd_of_client_threads_all_succeed(daemon: Daemon) -> None:
    d = daemon
    client = Client(str(d.socket), timeout=60)
    with own_fds(THREAD_CROWD + 64), ThreadPoolExecutor(max_workers=THREAD_CROWD) as pool:
        with stopped(d):
            futures = [pool.submit(client.call, "GET", "/crypto/status")
                       for _ in range(THREAD_CROWD)]
            wait_until(lambda: server_side_connections(d.socket)
                       + sum(f.done() for f in futures) >= THREAD_CROWD, 60)
        errors = [f.exception(timeout=90) for f in futures]
    failed = [e for e in errors if e is not None]
    assert not failed, f"{len(failed)} of {THREAD_CROWD} failed, e.g. {failed[0]!r}"
    assert_healthy(d)


def test_a_client_waits_through_a_daemon_restart(daemon: Daemon) -> None:
    """Killed, the daemon leaves its socket behind: connect() is refused until the next
    daemon listens. A client meanwhile is held up, not failed."""
    d = daemon
    d.kill9()
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(ConnectionRefusedError):
            probe.connect(str(d.socket))
    finally:
        probe.close()
    with ThreadPoolExecutor(max_workers=1) as pool:
        answer = pool.submit(Client(str(d.socket), timeout=60).call, "GET", "/crypto/status")
        d.start()
        assert "initialized" in answer.result(timeout=90)
    assert_healthy(d)


def test_an_absent_daemon_is_reported_at_once(tmp_path: Path) -> None:
    """No socket file at all: nothing to wait for, unreachable (6) straight away."""
    rc = subprocess.run([sys.executable, "-m", "ctl.cli", "--socket",
                         str(tmp_path / "none.sock"), "status"], capture_output=True,
                        timeout=60).returncode
    assert rc == 6

