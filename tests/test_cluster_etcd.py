"""Cluster leadership against real etcd members on loopback (no mocks): the gateway client,
its fail-over, and elections under cancellation, quorum loss and a frozen member.

Timing assertions state safety only: a leader is a follower again before its deadline +
margin (when a successor could first win), no two nodes lead at once, tokens only grow.
Bounds on how long a takeover may take are liveness guards against hangs, set loosely.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from ctl.cluster import (
    Campaign,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    LeaseNotFound,
)
from ctl.roles import FOLLOWER, LEADER
from tests.etcd import EtcdCluster

pytestmark = pytest.mark.timeout(60)

TTL = 2.0
LIVENESS = 20.0  # a generous bound for anything that must eventually happen


# -- fixtures and helpers ------------------------------------------------------------------
@pytest.fixture(scope="module")
def etcd1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd1"), members=1)
    with cluster:
        yield cluster
    assert cluster.leftover_pids() == []


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd3", members=3)
    with cluster:
        yield cluster
    assert cluster.leftover_pids() == []


@dataclass
class Recorder:
    """on_change, recorded with trio times; leadership intervals derived from it."""

    name: str
    changes: list[tuple[float, str, int | None, str | None]] = field(default_factory=list)

    def __call__(self, role: str, token: int | None, holder: str | None) -> None:
        self.changes.append((trio.current_time(), role, token, holder))

    def terms(self) -> list[tuple[float, float, int]]:
        """(won at, stepped down at (inf while leading), token) per term."""
        out: list[tuple[float, float, int]] = []
        start: tuple[float, int] | None = None
        for t, role, token, _ in self.changes:
            if role == LEADER and start is None:
                assert token is not None
                start = (t, token)
            elif role == FOLLOWER and start is not None:
                out.append((start[0], t, start[1]))
                start = None
        if start is not None:
            out.append((start[0], float("inf"), start[1]))
        return out


class Safety:
    """Samples every campaign often: never two at once that consider themselves leader;
    also keeps the last deadline each leader had, to check its step-down against."""

    def __init__(self, campaigns: list[Campaign]) -> None:
        self.campaigns = campaigns
        self.violations: list[str] = []
        self.last_deadline: dict[str, float] = {}

    async def run(self) -> None:
        while True:
            leaders = [c.node_id for c in self.campaigns if c.is_leader()]
            if len(leaders) > 1:
                self.violations.append(f"{trio.current_time():.3f}: leaders {leaders}")
            for c in self.campaigns:
                if c.deadline is not None:
                    self.last_deadline[c.node_id] = c.deadline
            await trio.sleep(0.005)


def assert_no_overlap(recorders: list[Recorder]) -> None:
    """Terms of different nodes never overlap, and tokens grow with time."""
    terms = sorted((t0, t1, token, r.name) for r in recorders for t0, t1, token in r.terms())
    for (_a0, a1, at, an), (b0, _b1, bt, bn) in itertools.pairwise(terms):
        assert a1 <= b0, f"{an} led until {a1:.3f}, but {bn} won at {b0:.3f}"
        assert bt > at, f"token {bt} of {bn} is not above {at} of {an}"


async def wait_until(pred: Callable[[], bool], timeout: float = LIVENESS) -> float:
    """Wait (bounded) for `pred`; the trio time it became true."""
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.005)
    return trio.current_time()


def leader_of(campaigns: list[Campaign]) -> Campaign | None:
    leaders = [c for c in campaigns if c.is_leader()]
    assert len(leaders) <= 1
    return leaders[0] if leaders else None


_counter = iter(range(1_000_000))


def fresh(prefix: str = "r") -> str:
    """A resource name no other test in this module uses (the 1-member cluster is shared)."""
    return f"{prefix}{next(_counter)}"


# -- the client ----------------------------------------------------------------------------
async def test_client_operations(etcd1: EtcdCluster) -> None:
    async with EtcdClient(etcd1.endpoints) as client:
        key = f"/test/{fresh()}/ключ"  # not ASCII: base64 is the client's business
        assert await client.get(key) is None

        lease = await client.grant(2)
        assert lease.id > 0 and lease.ttl >= 2
        assert await client.keepalive(lease.id) == lease.ttl
        left = await client.lease_ttl(lease.id)
        assert left is not None and 0 < left <= lease.ttl

        won = await client.put_if_absent(key, "nœud-a", lease=lease.id)
        assert won.won and won.holder == "nœud-a" and won.create_revision == won.revision
        # The same put again, as a retry after a lost answer would do: still ours.
        again = await client.put_if_absent(key, "nœud-a", lease=lease.id)
        assert again.won and again.create_revision == won.create_revision

        other = await client.grant(2)
        lost = await client.put_if_absent(key, "b", lease=other.id)
        assert not lost.won
        assert (lost.create_revision, lost.holder, lost.holder_lease) == (
            won.create_revision, "nœud-a", lease.id)
        assert lost.revision >= won.revision

        kv = await client.get(key)
        assert kv is not None
        assert (kv.value, kv.create_revision, kv.mod_revision, kv.lease) == (
            "nœud-a", won.create_revision, won.create_revision, lease.id)
        got, at = await client.range(key)
        assert got == kv and at >= kv.mod_revision

        # Revoking deletes the key; a second revoke finds nothing; keepalive says gone.
        assert await client.revoke(lease.id) is True
        assert await client.get(key) is None
        assert await client.revoke(lease.id) is False
        assert await client.keepalive(lease.id) == 0
        assert await client.lease_ttl(lease.id) is None
        with pytest.raises(LeaseNotFound, match="lease not found"):
            await client.put_if_absent(key, "c", lease=lease.id)
        assert await client.revoke(other.id) is True

        rev = await client.put(key, "plain")
        kv = await client.get(key)
        assert kv is not None and kv.value == "plain" and kv.mod_revision == rev
        assert kv.lease == 0
        assert await client.delete(key) == 1
        assert await client.delete(key) == 0

        # An answer that is an error keeps etcd's own message, and is not "unavailable".
        with pytest.raises(EtcdError, match="too large lease TTL") as info:
            await client.grant(10**12)
        assert not isinstance(info.value, EtcdUnavailable)
        assert info.value.endpoint == etcd1.endpoint(0)

        [member] = await client.status()
        assert member.reachable and member.is_leader and member.raft_term
        assert member.version and member.version.startswith("3.")


async def test_failover_across_dead_endpoints(etcd1: EtcdCluster) -> None:
    """A refused port and a port that accepts but never answers come first: calls and
    watches still succeed, on the live endpoint, which the client then sticks to."""
    with socket.socket() as silent, socket.socket() as refused:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        refused.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        dead = [f"http://127.0.0.1:{refused.getsockname()[1]}",
                f"http://127.0.0.1:{silent.getsockname()[1]}"]
        key = f"/test/{fresh()}"
        async with EtcdClient([*dead, etcd1.endpoint(0)], timeout=0.5) as client:
            assert client.endpoint == dead[0]
            assert (await client.put_if_absent(key, "x")).won
            assert client.endpoint == etcd1.endpoint(0)
            kv = await client.get(key)
            assert kv is not None and kv.value == "x"
            statuses = await client.status()
            assert [s.reachable for s in statuses] == [False, False, True]
            assert "no answer" in (statuses[1].error or "")

        # A watch fails over too.
        async with (EtcdClient([*dead, etcd1.endpoint(0)], timeout=0.5) as client,
                    client.watch(key) as events):
            assert events.endpoint == etcd1.endpoint(0)
            await client.delete(key)
            event = await events.__anext__()
            assert (event.kind, event.key) == ("delete", key)

        # No endpoint answers: unavailable, saying why for each, within the timeouts.
        async with EtcdClient(dead, timeout=0.5) as client:
            with trio.fail_after(5):
                with pytest.raises(EtcdUnavailable) as info:
                    await client.get(key)
            assert dead[0] in info.value.message and dead[1] in info.value.message
            with pytest.raises(EtcdUnavailable):
                async with client.watch(key):
                    pass


# -- elections on one member ---------------------------------------------------------------
async def test_three_campaigners_exactly_one_leader(etcd1: EtcdCluster) -> None:
    resource = fresh()
    recs = [Recorder(n) for n in ("a", "b", "c")]
    clients = [EtcdClient(etcd1.endpoints) for _ in recs]
    campaigns = [Campaign(cl, resource, r.name, TTL, on_change=r)
                 for cl, r in zip(clients, recs, strict=True)]
    safety = Safety(campaigns)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(safety.run)
            async with trio.open_nursery() as starting:  # campaign all at once
                for c in campaigns:
                    starting.start_soon(nursery.start, c.run)
            await wait_until(lambda: leader_of(campaigns) is not None)
            await trio.sleep(TTL * 1.5)  # several keepalive rounds: still one leader
            leader = leader_of(campaigns)
            assert leader is not None and leader.token is not None
            for c in campaigns:
                assert c.holder == leader.node_id and c.token == leader.token
                assert (c.role == LEADER) == (c is leader)
            kv = await clients[0].get(leader.key)
            assert kv is not None and kv.value == leader.node_id
            assert kv.create_revision == leader.token and kv.lease == leader.lease_id
            nursery.cancel_scope.cancel()
    finally:
        for cl in clients:
            await cl.aclose()
    assert safety.violations == []
    assert_no_overlap(recs)
    assert all(c.role == FOLLOWER and c.deadline is None for c in campaigns)


async def test_cancelled_leader_hands_over_by_revoke(etcd1: EtcdCluster) -> None:
    """Cancelling the leader's run steps down and revokes its lease: another node wins
    long before the old lease could have expired, with a higher token."""
    resource = fresh()
    ttl = 6.0  # so that a takeover by expiry could not hide in the measurement
    recs = [Recorder("a"), Recorder("b")]
    async with EtcdClient(etcd1.endpoints) as ca, EtcdClient(etcd1.endpoints) as cb:
        a = Campaign(ca, resource, "a", ttl, on_change=recs[0])
        b = Campaign(cb, resource, "b", ttl, on_change=recs[1])
        safety = Safety([a, b])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(safety.run)
            scope_a = trio.CancelScope()

            async def run_a(task_status: trio.TaskStatus[None]) -> None:
                with scope_a:
                    await a.run(task_status=task_status)

            await nursery.start(run_a)
            await nursery.start(b.run)
            assert a.is_leader() and b.role == FOLLOWER and b.holder == "a"
            old_token, old_lease = a.token, a.lease_id
            assert old_token is not None and old_lease is not None
            left = await cb.lease_ttl(old_lease)  # whole seconds, rounded down by etcd
            assert left is not None
            cancelled = trio.current_time()
            scope_a.cancel()
            won = await wait_until(b.is_leader)
            takeover = won - cancelled
            print(f"\ntakeover after cancel: {takeover:.3f} s (lease had >= {left} s left)")
            assert takeover < left, "the successor waited for expiry, not for the revoke"
            assert b.token is not None and b.token > old_token
            assert a.role == FOLLOWER and not a.is_leader()
            assert await cb.lease_ttl(old_lease) is None
            nursery.cancel_scope.cancel()
    assert safety.violations == []
    assert_no_overlap(recs)


async def test_watch_sees_the_holder_change(etcd1: EtcdCluster) -> None:
    resource = fresh()
    async with (EtcdClient(etcd1.endpoints) as ca, EtcdClient(etcd1.endpoints) as cb,
                EtcdClient(etcd1.endpoints) as watcher):
        a = Campaign(ca, resource, "a", TTL)
        b = Campaign(cb, resource, "b", TTL)
        async with trio.open_nursery() as nursery:
            scope_a = trio.CancelScope()

            async def run_a(task_status: trio.TaskStatus[None]) -> None:
                with scope_a:
                    await a.run(task_status=task_status)

            await nursery.start(run_a)
            await nursery.start(b.run)
            kv, at = await watcher.range(a.key)
            assert kv is not None and kv.value == "a"
            seen = []
            async with watcher.watch(a.key, start_revision=at + 1) as events:
                scope_a.cancel()
                with trio.fail_after(LIVENESS):
                    async for event in events:
                        seen.append(event)
                        if event.kind == "put":
                            break
            assert [e.kind for e in seen] == ["delete", "put"]
            assert seen[1].value == "b" and seen[1].create_revision > kv.create_revision
            await wait_until(b.is_leader)
            assert b.token == seen[1].create_revision
            nursery.cancel_scope.cancel()


class StuckRenewals(EtcdClient):
    """A client whose lease renewals never come back, as if the leader's node could not
    reach etcd: the rest of etcd works, only keepalive answers are lost."""

    async def keepalive(self, lease_id: int) -> int:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_leader_without_renewals_steps_down_by_its_deadline(etcd1: EtcdCluster) -> None:
    resource = fresh()
    recs = [Recorder("a"), Recorder("b")]
    async with StuckRenewals(etcd1.endpoints) as ca, EtcdClient(etcd1.endpoints) as cb:
        a = Campaign(ca, resource, "a", TTL, on_change=recs[0])
        b = Campaign(cb, resource, "b", TTL, on_change=recs[1])
        safety = Safety([a, b])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(safety.run)
            await nursery.start(a.run)
            assert a.is_leader() and a.deadline is not None
            deadline = a.deadline
            await nursery.start(b.run)
            await wait_until(lambda: a.role == FOLLOWER)
            # The deadline never moved (no renewal came back); the step-down ran right
            # at it, without any answer from etcd, before a successor could win.
            down = recs[0].terms()[0][1]
            assert deadline <= down < deadline + a.margin
            await wait_until(b.is_leader)
            assert a.step_down_reason == "no lease renewal answered before the local deadline"
            nursery.cancel_scope.cancel()
    assert safety.violations == []
    assert_no_overlap(recs)


async def test_deleted_leader_key_makes_the_leader_step_down(etcd1: EtcdCluster) -> None:
    resource = fresh()
    rec = Recorder("a")
    async with EtcdClient(etcd1.endpoints) as ca, EtcdClient(etcd1.endpoints) as operator:
        a = Campaign(ca, resource, "a", TTL, on_change=rec)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            first = a.token
            assert a.is_leader() and first is not None
            assert await operator.delete(a.key) == 1
            # It notices, steps down, revokes, and (alone) wins a new term.
            await wait_until(lambda: len(rec.terms()) >= 2 and a.is_leader())
            assert a.step_down_reason == "the leader key was deleted or replaced"
            assert a.token is not None and a.token > first
            nursery.cancel_scope.cancel()
    assert [t for _, _, t in rec.terms()] == sorted({t for _, _, t in rec.terms()})


async def test_unreachable_etcd_counts_as_follower() -> None:
    with socket.socket() as refused:
        refused.bind(("127.0.0.1", 0))
        async with EtcdClient([f"http://127.0.0.1:{refused.getsockname()[1]}"],
                              timeout=0.5) as client:
            rec = Recorder("a")
            a = Campaign(client, fresh(), "a", TTL, on_change=rec)
            async with trio.open_nursery() as nursery:
                await nursery.start(a.run)
                assert a.role == FOLLOWER and not a.is_leader()
                assert a.token is None and a.holder is None and a.deadline is None
                assert a.last_error and "no etcd endpoint answered" in a.last_error
                nursery.cancel_scope.cancel()
            assert rec.changes == []


async def test_campaign_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="endpoint"):
        EtcdClient(["127.0.0.1:2379"])
    async with EtcdClient(["http://127.0.0.1:2379"]) as client:
        with pytest.raises(ValueError, match="resource"):
            Campaign(client, "Bad/Name", "a")
        with pytest.raises(ValueError, match="node id"):
            Campaign(client, "vol", "")
        with pytest.raises(ValueError, match="TTL"):
            Campaign(client, "vol", "a", ttl=0.5)
        with pytest.raises(ValueError, match="margin"):
            Campaign(client, "vol", "a", ttl=2, margin=1.0)
        c = Campaign(client, "vol", "a", ttl=2)
        assert c.key == "/piccolo/leader/vol" and 0 < c.margin < 1


# -- elections on three members ------------------------------------------------------------
async def test_quorum_loss_leader_steps_down_and_campaigns_resume(etcd3: EtcdCluster) -> None:
    """Two of three members die: etcd cannot answer, the leader steps down by its local
    deadline, nobody leads while quorum is gone; when the members come back the same
    campaigns elect a leader with a higher token."""
    resource = fresh()
    recs = [Recorder("a"), Recorder("b")]
    async with (EtcdClient(etcd3.endpoints) as ca, EtcdClient(etcd3.endpoints) as cb,
                EtcdClient([etcd3.endpoint(0)]) as pinned):
        a = Campaign(ca, resource, "a", TTL, on_change=recs[0])
        b = Campaign(cb, resource, "b", TTL, on_change=recs[1])
        safety = Safety([a, b])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(safety.run)
            await nursery.start(a.run)
            await nursery.start(b.run)
            assert a.is_leader() and b.holder == "a"
            old_token = a.token
            assert old_token is not None

            async with pinned.watch("/test/quiet") as quiet:
                killed = trio.current_time()
                etcd3.kill_member(1)
                etcd3.kill_member(2)
                # The member left alone drops its watches once it knows it has no leader.
                with trio.fail_after(LIVENESS), pytest.raises(EtcdUnavailable):
                    await quiet.__anext__()

            await wait_until(lambda: a.role == FOLLOWER)
            down = recs[0].terms()[0][1]
            print(f"\nquorum loss: leader stepped down {down - killed:.3f} s after the kill")
            assert down < safety.last_deadline["a"] + a.margin
            with pytest.raises(EtcdUnavailable):
                await ca.get(a.key)
            statuses = await ca.status()
            assert [s.reachable for s in statuses] == [True, False, False]

            # Nobody leads while there is no quorum (sampled for two TTLs).
            with trio.move_on_after(2 * TTL):
                while True:
                    assert leader_of([a, b]) is None
                    await trio.sleep(0.01)
            [alone, *_] = await ca.status()
            assert alone.reachable and alone.leader is None

            back = trio.current_time()
            await trio.to_thread.run_sync(etcd3.start_member, 1)
            await trio.to_thread.run_sync(lambda: etcd3.start_member(2, wait=False))
            won = await wait_until(lambda: leader_of([a, b]) is not None)  # +5 ms at most
            print(f"quorum back: a leader {won - back:.3f} s after the restart began")
            leader = leader_of([a, b])
            assert leader is not None and leader.token is not None
            assert leader.token > old_token
            nursery.cancel_scope.cancel()
    assert safety.violations == []
    assert_no_overlap(recs)


async def test_leader_pinned_to_a_frozen_member_steps_down_first(etcd3: EtcdCluster) -> None:
    """The leader reaches etcd only through member 0, which is frozen (SIGSTOP): its
    requests hang. It steps down by its deadline, and only after that does the other node
    (talking to the two healthy members) win, with a higher token."""
    resource = fresh()
    recs = [Recorder("a"), Recorder("b")]
    async with (EtcdClient([etcd3.endpoint(0)]) as ca,
                EtcdClient([etcd3.endpoint(1), etcd3.endpoint(2)]) as cb):
        a = Campaign(ca, resource, "a", TTL, on_change=recs[0])
        b = Campaign(cb, resource, "b", TTL, on_change=recs[1])
        safety = Safety([a, b])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(safety.run)
            await nursery.start(a.run)
            await nursery.start(b.run)
            assert a.is_leader() and b.holder == "a"
            old_token = a.token
            assert old_token is not None
            frozen = trio.current_time()
            etcd3.pause_member(0)
            try:
                await wait_until(lambda: a.role == FOLLOWER)
                down = recs[0].terms()[0][1]
                assert down < safety.last_deadline["a"] + a.margin
                await wait_until(b.is_leader)
                won = recs[1].terms()[0][0]
                print(f"\nfrozen member: leader down after {down - frozen:.3f} s, "
                      f"successor after {won - frozen:.3f} s")
                assert down < won
                assert b.token is not None and b.token > old_token
            finally:
                etcd3.resume_member(0)
            # Once its member answers again, the old leader follows the new one.
            await wait_until(lambda: a.holder == "b" and a.token == b.token)
            assert not a.is_leader()
            nursery.cancel_scope.cancel()
    assert safety.violations == []
    assert_no_overlap(recs)
