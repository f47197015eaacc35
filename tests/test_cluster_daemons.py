"""Three real daemons, three real etcd members, one volume on shared storage: one leader,
two read-only followers; takeover after the leader's daemon is killed or frozen, step-down
on quorum loss — and never a write accepted from a deposed leader.

The cipher dir is shared the way shared storage would be: the first node creates the
volume, the others see the same directory. Every node shares the first node's keyset (a
node joins with a copy of it)."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import VOLUME, form, leaders, wait_leader
from tests.daemon import Daemon
from tests.etcd import EtcdCluster

pytestmark = pytest.mark.timeout(300)
TTL = "2"


class Writer(threading.Thread):
    """Appends sequence-numbered records through one node's mount; remembers when each
    accepted write started and ended (this process's monotonic clock)."""

    def __init__(self, node: str, path: Path) -> None:
        super().__init__(daemon=True)
        self.node, self.path = node, path
        self.stop = threading.Event()
        self.accepted: list[tuple[float, float, int]] = []

    def run(self) -> None:
        seq = 0
        while not self.stop.is_set() and seq < 1_000_000:
            seq += 1
            started = time.monotonic()
            try:
                with open(self.path / f"{self.node}.log", "a") as f:
                    f.write(f"{self.node} {seq}\n")
            except OSError:
                time.sleep(0.005)
                continue
            self.accepted.append((started, time.monotonic(), seq))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[EtcdCluster, list[Daemon]]]:
    with EtcdCluster(tmp_path / "etcd", members=3) as etcd:
        nodes: list[Daemon] = []
        try:
            for i, name in enumerate(("a", "b", "c")):
                (tmp_path / name).mkdir()
                # Each node talks to its own member, as on separate boxes: cutting a member
                # off cuts its node off from the cluster.
                nodes.append(Daemon(tmp_path / name, [
                    "--node-id", name, "--etcd", etcd.endpoints[i], "--lease-ttl", TTL]))
            form(nodes)
            yield etcd, nodes
        finally:
            for d in nodes:
                if d.proc is not None:
                    os.kill(d.proc.pid, signal.SIGCONT)
                d.stop()


def _switches(writers: list[Writer]) -> int:
    """How often the node whose writes were accepted changes, in start order."""
    seq = sorted((s, w.node) for w in writers for s, _, _ in w.accepted)
    return sum(1 for (_, a), (_, b) in itertools.pairwise(seq) if a != b)


def test_failover_fencing_and_quorum(cluster: tuple[EtcdCluster, list[Daemon]],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    etcd, nodes = cluster
    leader, _ = wait_leader(nodes)
    info = leader.volume(VOLUME)
    assert info["leader_node"] == leader.extra[1] and info["token"] == info["term"] > 0
    for d in nodes:
        if d is not leader:
            assert d.volume(VOLUME)["read_only"] is True
            assert d.volume(VOLUME)["leader_node"] == leader.extra[1]
    status = leader.call("GET", "/cluster")
    assert status["quorum"] and [m["reachable"] for m in status["members"]] == [True]
    assert status["terms"][VOLUME]["role"] == "leader"
    shown = leader.ctl("cluster", "status")
    assert shown.returncode == 0 and f"volume {VOLUME}: leader" in shown.stdout, shown
    writers = [Writer(d.extra[1], d.mount(VOLUME)) for d in nodes]
    for w in writers:
        w.start()
    takeovers: dict[str, float] = {}
    try:
        # 1. kill -9 of the leader's daemon: its mount process leaves, its lease runs out.
        time.sleep(0.5)
        t0 = time.monotonic()
        leader.kill9()
        second, t1 = wait_leader(nodes, exclude=leader)
        takeovers["daemon kill -9"] = t1 - t0
        time.sleep(0.5)

        # 2. the new leader's daemon frozen: its mount stops writing by itself.
        assert second.proc is not None
        t0 = time.monotonic()
        os.kill(second.proc.pid, signal.SIGSTOP)
        frozen_pid = second.proc.pid
        live = [d for d in nodes if d is not leader and d is not second]
        third, t1 = wait_leader(live)
        takeovers["daemon SIGSTOP"] = t1 - t0
        os.kill(frozen_pid, signal.SIGCONT)
        second.wait_for(lambda: second.volume(VOLUME)["read_only"] is True,
                        what="the resumed ex-leader to be a follower")
        assert leaders([d for d in nodes if d.proc is not None]) == [third]
        time.sleep(0.5)

        # 3. the leader cut off from the cluster (its etcd member frozen; the other two
        #    keep quorum): it steps down by its own deadline, another node takes over.
        cut = nodes.index(third)
        t0 = time.monotonic()
        etcd.pause_member(cut)
        fourth, t1 = wait_leader([d for d in nodes if d is not third and d.proc is not None])
        takeovers["leader cut off from etcd"] = t1 - t0
        assert third.volume(VOLUME)["read_only"] is True
        etcd.resume_member(cut)
        time.sleep(0.5)

        # 4. quorum loss: every leader steps down within the TTL, and says why.
        t0 = time.monotonic()
        lost = [nodes.index(fourth), (nodes.index(fourth) + 1) % 3]
        for i in lost:
            etcd.stop_member(i)
        fourth.wait_for(lambda: fourth.volume(VOLUME)["read_only"] is True, timeout=10,
                        what="the leader to step down without quorum")
        takeovers["quorum loss: step-down"] = time.monotonic() - t0
        status = fourth.call("GET", "/cluster")
        assert not status["quorum"] and status["reason"]
        assert "quorum: NO" in fourth.ctl("cluster", "status").stdout
        for i in lost:
            etcd.start_member(i)
        t0 = time.monotonic()
        _, t1 = wait_leader([d for d in nodes if d.proc is not None])
        takeovers["quorum back: new leader"] = t1 - t0
        time.sleep(0.5)
    finally:
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join(timeout=30)

    # Zero writes from a deposed leader: the node whose writes are accepted changes only
    # at takeovers, at most five here (a deposed leader writing on would interleave with
    # its successor, and each interleaving adds two changes).
    accepted_nodes = [w.node for w in writers if w.accepted]
    assert len(accepted_nodes) >= 2, "the writers must have run under several leaders"
    assert _switches(writers) <= 5, [(w.node, len(w.accepted)) for w in writers]
    # Every acknowledged record is on the shared storage, in order; past them at most the
    # one write in flight when its node's daemon was killed (applied, never answered).
    final = leaders([d for d in nodes if d.proc is not None])[0]
    for w in writers:
        if not w.accepted:
            continue
        lines = (final.mount(VOLUME) / f"{w.node}.log").read_text().splitlines()
        stored = [int(x.split()[1]) for x in lines]
        acked = [s for _, _, s in w.accepted]
        assert stored[:len(acked)] == acked, w.node
        assert len(stored) - len(acked) <= 1 and all(x > acked[-1] for x in stored[len(acked):])
    with capsys.disabled():
        print("\ntakeover times (TTL 2 s): " + ", ".join(
            f"{k} {v:.2f} s" for k, v in takeovers.items()))
