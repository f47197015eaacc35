"""Real etcd members (Debian's etcd-server) on loopback, for tests of cluster leadership.

`EtcdCluster(base_dir, members=3)` starts every member as a child process bound to
127.0.0.1 only, on free ports (a client and a peer port each), with its data directory
under `base_dir`, and waits (bounded) until every member reports healthy. Members can be
stopped, killed, frozen (SIGSTOP) and started again on the same ports and data. Leaving
the context stops every process by its pid and reaps it: nothing is left running.

Raft timing defaults to a 50 ms heartbeat and a 500 ms election timeout: a lost raft
leader is replaced within about a second, which keeps tests with a 2 s lease TTL
meaningful (with etcd's default 100/1000 ms every raft election can outlast such a lease).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

START_TIMEOUT = 20.0
STOP_TIMEOUT = 3.0
CLOSE_GRACE = 1.0  # at close, SIGKILL what SIGTERM has not ended by then
PORT_ATTEMPTS = 5
LOOPBACK = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 right now (held open together while picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _listens(pid: int, port: int) -> bool:
    """True when process `pid` itself listens on 127.0.0.1:`port`."""
    want = f"0100007F:{port:04X}"
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == want and fields[3] == "0A":  # state LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    try:
        owned = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except (FileNotFoundError, ProcessLookupError):
        return False
    return bool(inodes & owned)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def healthy(url: str, timeout: float = 1.0) -> bool:
    """etcd's /health says true: the member has a leader and serves a quorum read."""
    try:
        with _NO_PROXY.open(f"{url}/health", timeout=timeout) as r:
            return bool(json.loads(r.read()).get("health") == "true")
    except (OSError, ValueError):
        return False


class EtcdCluster:
    def __init__(self, base_dir: Path, members: int = 3, *, heartbeat_ms: int = 50,
                 election_ms: int = 500, token: str = "piccolo-test") -> None:
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd is not installed (apt install etcd-server)")
        if members < 1:
            raise ValueError("an etcd cluster has at least one member")
        self.base_dir = Path(base_dir)
        self.size = members
        self.names = [f"m{i}" for i in range(members)]
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.token = token
        self.client_ports: list[int] = []
        self.peer_ports: list[int] = []
        self.pids: list[int] = []  # every process ever started, for leak checks
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * members
        self._paused: set[int] = set()

    # -- addresses -----------------------------------------------------------------------
    @property
    def endpoints(self) -> list[str]:
        return [f"http://{LOOPBACK}:{p}" for p in self.client_ports]

    def endpoint(self, i: int) -> str:
        return self.endpoints[i]

    def data_dir(self, i: int) -> Path:
        return self.base_dir / self.names[i]

    def log_path(self, i: int) -> Path:
        return self.base_dir / f"{self.names[i]}.log"

    def log(self, i: int) -> str:
        try:
            return self.log_path(i).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> EtcdCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        """Start a new cluster on fresh ports; on a port clash, start over on others."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        last = ""
        for _ in range(PORT_ATTEMPTS):
            ports = free_ports(2 * self.size)
            self.client_ports, self.peer_ports = ports[:self.size], ports[self.size:]
            for i in range(self.size):
                shutil.rmtree(self.data_dir(i), ignore_errors=True)
                self._spawn(i)
            if self._wait_listening(range(self.size)):
                self.wait_healthy()
                return
            last = "\n".join(self.log(i)[-1500:] for i in range(self.size))
            self.close()
        raise RuntimeError(f"etcd did not start after {PORT_ATTEMPTS} attempts:\n{last}")

    def _spawn(self, i: int) -> None:
        if self.running(i):
            raise RuntimeError(f"member {i} is already running")
        client = f"http://{LOOPBACK}:{self.client_ports[i]}"
        peer = f"http://{LOOPBACK}:{self.peer_ports[i]}"
        initial = ",".join(f"{n}=http://{LOOPBACK}:{p}"
                           for n, p in zip(self.names, self.peer_ports, strict=True))
        cmd = ["etcd", "--name", self.names[i], "--data-dir", str(self.data_dir(i)),
               "--listen-client-urls", client, "--advertise-client-urls", client,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", initial, "--initial-cluster-state", "new",
               "--initial-cluster-token", self.token,
               "--heartbeat-interval", str(self.heartbeat_ms),
               "--election-timeout", str(self.election_ms),
               "--logger", "zap", "--log-level", "warn"]
        # No ETCD_* variable from the environment may reconfigure a member.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.log_path(i), "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=env, start_new_session=True)
        self._procs[i] = proc
        self.pids.append(proc.pid)

    def _wait_listening(self, members: range | list[int]) -> bool:
        """Wait until each member listens on its ports; False when one exited (a clash)."""
        deadline = time.monotonic() + START_TIMEOUT
        waiting = set(members)
        while waiting:
            for i in sorted(waiting):
                proc = self._procs[i]
                if proc is None or proc.poll() is not None:
                    return False
                if (_listens(proc.pid, self.client_ports[i])
                        and _listens(proc.pid, self.peer_ports[i])):
                    waiting.discard(i)
            if waiting:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd members {sorted(waiting)} did not listen "
                                       f"within {START_TIMEOUT} s")
                time.sleep(0.02)
        return True

    def wait_healthy(self, members: list[int] | None = None,
                     timeout: float = START_TIMEOUT) -> None:
        """Wait (bounded) until the given members (default: every running one) are
        healthy, which needs a quorum of the cluster up."""
        todo = set(range(self.size) if members is None else members)
        todo = {i for i in todo if self.running(i) and i not in self._paused}
        deadline = time.monotonic() + timeout
        while todo:
            todo = {i for i in todo if not healthy(self.endpoint(i), timeout=0.5)}
            if todo:
                if time.monotonic() > deadline:
                    logs = "\n".join(self.log(i)[-1500:] for i in sorted(todo))
                    raise RuntimeError(f"etcd members {sorted(todo)} not healthy within "
                                       f"{timeout} s:\n{logs}")
                time.sleep(0.05)

    def running(self, i: int) -> bool:
        proc = self._procs[i]
        return proc is not None and proc.poll() is None

    def pid(self, i: int) -> int:
        proc = self._procs[i]
        if proc is None:
            raise RuntimeError(f"member {i} is not running")
        return proc.pid

    def start_member(self, i: int, *, wait: bool = True) -> None:
        """Start a stopped member again, on its ports and data; with `wait`, until it is
        healthy (which needs quorum)."""
        self._spawn(i)
        if not self._wait_listening([i]):
            raise RuntimeError(f"etcd member {i} exited at start:\n{self.log(i)[-2000:]}")
        if wait:
            self.wait_healthy([i])

    def stop_member(self, i: int, sig: int = signal.SIGTERM) -> None:
        """Stop member `i` by its pid and reap it (SIGKILL if it lingers). Idempotent."""
        proc, self._procs[i] = self._procs[i], None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if i in self._paused:
                    os.kill(proc.pid, signal.SIGCONT)
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT)
        else:
            proc.wait()
        self._paused.discard(i)

    def kill_member(self, i: int) -> None:
        """SIGKILL: a crash or a power cut of that member."""
        self.stop_member(i, signal.SIGKILL)

    def pause_member(self, i: int) -> None:
        """SIGSTOP: the member is frozen; its sockets stay open and silent."""
        os.kill(self.pid(i), signal.SIGSTOP)
        self._paused.add(i)

    def resume_member(self, i: int) -> None:
        os.kill(self.pid(i), signal.SIGCONT)
        self._paused.discard(i)

    def close(self) -> None:
        """Stop every member: SIGTERM to all, then reap each, with SIGKILL after a short
        grace (members that lose quorum as the others go can take seconds to exit)."""
        live = [i for i in range(self.size) if self.running(i)]
        for i in live:
            with contextlib.suppress(ProcessLookupError):
                if i in self._paused:
                    os.kill(self.pid(i), signal.SIGCONT)
                os.kill(self.pid(i), signal.SIGTERM)
        deadline = time.monotonic() + CLOSE_GRACE
        for i in live:
            proc = self._procs[i]
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for i in range(self.size):
            self.stop_member(i, signal.SIGKILL)
        self._paused.clear()

    def leftover_pids(self) -> list[int]:
        """Pids started here that still exist (unreaped or running): should be none."""
        out = []
        for pid in self.pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            out.append(pid)
        return out
