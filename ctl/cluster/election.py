"""Leader election for one resource over etcd, with a fencing token and a local deadline.

To campaign, a node grants itself a lease and puts `/piccolo/leader/<resource>` = its node
id under that lease, only if the key is absent (one txn). The winner's **fencing token** is
the key's create revision: it grows across the whole cluster and is new for every term, so
a store that remembers the highest token it has seen can refuse a deposed leader's writes.

The leader renews its lease every TTL/3, but it never relies on etcd answering in time.
Its **deadline** is the *send* time of its last successful renewal (or of the grant) +
TTL - margin. etcd starts the TTL when it handles that request, later than the send, so
the key cannot expire, and nobody else can win, before deadline + margin. When the
deadline passes the leader steps down by itself, with no answer needed: partitioned, out
of quorum, slow or frozen, it is a follower before anyone else can be a leader. `margin`
is the time the step-down itself may take (stopping writers, remounting read-only).

A follower watches the key and campaigns again when it goes away. The watch is re-armed
with a fresh read at least once per TTL, since a frozen etcd member keeps a watch open and
silent. Not knowing (no quorum, no answer) counts as follower.

A deposed leader revokes its lease so that a successor need not wait out the TTL; when
etcd does not answer, it tries again before every later campaign attempt.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ctl.cluster.etcd import EtcdClient, EtcdError, KeyValue
from ctl.roles import FOLLOWER, LEADER, valid_name

KEY_PREFIX = "/piccolo/leader/"
MIN_MARGIN = 0.3
MAX_ABANDONED = 32  # revoking only speeds up a takeover: unrevoked leases expire anyway
OnChange = Callable[[str, int | None, str | None], None]


@dataclass(frozen=True)
class _Term:
    lease: int
    ttl: int  # as granted
    token: int  # the key's create revision
    revision: int  # the store revision of the winning txn
    sent: float  # trio time the grant was sent


class Campaign:
    """Campaigns for `resource` as `node_id` for as long as `run` runs.

    State, for anyone to read: `role` ("leader"/"follower"); `token` and `holder` (the
    current term's fencing token and leader, as etcd last said; None when unknown, and
    for a leader its own); `deadline` (trio time a leader steps down by, None for a
    follower); `last_error` (the last failure talking to etcd, None after a success);
    `step_down_reason` (why the last term ended).
    `on_change(role, token, holder)` is called on every change of those three; it must
    not block or raise. Before acting as leader, check `is_leader()`: it also compares
    the deadline with the clock, so it is right even before the step-down has run.
    """

    def __init__(self, client: EtcdClient, resource: str, node_id: str, ttl: float = 5.0,
                 *, margin: float | None = None, on_change: OnChange | None = None,
                 retry: float | None = None, revoke_timeout: float = 2.0,
                 prefix: str = KEY_PREFIX, on_renew: Callable[[], None] | None = None
                 ) -> None:
        if not valid_name(resource):
            raise ValueError(f"not a resource name: {resource!r}")
        if not node_id or not node_id.isprintable() or len(node_id) > 253:
            raise ValueError(f"not a node id: {node_id!r}")
        if ttl < 1:
            raise ValueError("the lease TTL is at least 1 s (etcd counts whole seconds)")
        if margin is None:
            margin = max(MIN_MARGIN, ttl / 10)
        if not 0 < margin < ttl / 2:
            raise ValueError("the margin must be positive and under half the TTL")
        self.client = client
        self.resource = resource
        self.node_id = node_id
        self.key = prefix + resource
        self.ttl = math.ceil(ttl)
        self.margin = margin
        self.retry = retry if retry is not None else min(1.0, self.ttl / 3)
        self.revoke_timeout = revoke_timeout
        self._on_change = on_change
        self._on_renew = on_renew  # after every renewal that moved a leader's deadline
        self.role: str = FOLLOWER
        self.token: int | None = None
        self.holder: str | None = None
        self.deadline: float | None = None
        self.last_error: str | None = None
        self.lease_id: int | None = None  # the lease of the current term, when leader
        self._abandoned: list[int] = []  # leases to revoke once etcd answers
        self.step_down_reason: str | None = None
        self._lost: str | None = None  # why the current term ended early

    # -- state -------------------------------------------------------------------------
    def is_leader(self) -> bool:
        """Leader, and still before the local deadline."""
        return (self.role == LEADER and self.deadline is not None
                and trio.current_time() < self.deadline)

    def _set(self, role: str, token: int | None, holder: str | None) -> None:
        if (role, token, holder) == (self.role, self.token, self.holder):
            return
        self.role, self.token, self.holder = role, token, holder
        if self._on_change is not None:
            self._on_change(role, token, holder)

    def _note(self, error: EtcdError) -> None:
        self.last_error = error.message

    def _retry_delay(self) -> float:
        return self.retry * random.uniform(0.5, 1.0)  # spread, so campaigners don't collide

    # -- the loop ----------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Campaign until cancelled. `nursery.start` returns once the first attempt has
        settled (won, lost, or etcd unreachable: bounded by the client's timeouts).
        Cancelling steps down at once, then revokes the lease (shielded, bounded by
        `revoke_timeout`; if etcd does not answer, the lease expires by itself)."""
        started = False
        try:
            while True:
                await self._revoke_abandoned()
                term, watch_from = await self._attempt()
                if not started:
                    started = True
                    task_status.started()
                if term is not None:
                    await self._lead(term)
                    # A node that just lost its term (renewals failing, key deleted) would
                    # usually win the race again at once; give the followers, woken by
                    # the revoke, a head start instead of flapping.
                    await self._revoke_abandoned()
                    await trio.sleep(self._retry_delay())
                elif watch_from is not None:
                    await self._follow(watch_from)
                else:
                    await trio.sleep(self._retry_delay())
        finally:
            self.deadline = None
            self._set(FOLLOWER, None, None)
            with trio.CancelScope(shield=True), trio.move_on_after(self.revoke_timeout):
                await self._revoke_abandoned()

    async def _attempt(self) -> tuple[_Term | None, int | None]:
        """One campaign: the term when won; else the revision to watch the holder from
        (None when etcd did not answer)."""
        sent = trio.current_time()
        try:
            lease = await self.client.grant(self.ttl)
        except EtcdError as e:
            self._note(e)
            return None, None
        self._abandon(lease.id)  # until it proves to be a term's lease
        try:
            result = await self.client.put_if_absent(self.key, self.node_id, lease=lease.id)
        except EtcdError as e:
            self._note(e)
            return None, None
        self.last_error = None
        if result.won:
            if trio.current_time() < sent + lease.ttl - self.margin:
                self._abandoned.remove(lease.id)
                return _Term(lease.id, lease.ttl, result.create_revision, result.revision,
                             sent), None
            # Won, but too late to trust the lease: let it go, as a lost term.
            self.last_error = "the campaign took longer than the lease allows"
            await self._revoke_abandoned()
            return None, None
        await self._revoke_abandoned()
        self._set(FOLLOWER, result.create_revision, result.holder)
        return None, result.revision + 1

    def _abandon(self, lease: int) -> None:
        self._abandoned.append(lease)
        del self._abandoned[:-MAX_ABANDONED]

    async def _revoke_abandoned(self) -> None:
        """Revoke every lease we no longer use; stop at the first etcd failure."""
        while self._abandoned:
            try:
                await self.client.revoke(self._abandoned[0])
            except EtcdError as e:
                self._note(e)
                return
            self._abandoned.pop(0)

    # -- leader --------------------------------------------------------------------------
    async def _lead(self, term: _Term) -> None:
        """Hold the term until the deadline passes, the lease or the key is lost, or we
        are cancelled; then step down, leaving the lease to be revoked."""
        self._lost = None
        self.lease_id = term.lease
        self.deadline = term.sent + term.ttl - self.margin
        self._set(LEADER, term.token, self.node_id)
        try:
            with trio.CancelScope(deadline=self.deadline) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_alive, term, scope)
                    nursery.start_soon(self._guard_key, term, scope)
            if scope.cancelled_caught and self._lost is None:
                self._lost = "no lease renewal answered before the local deadline"
        finally:
            self.step_down_reason = self._lost or "the campaign was cancelled"
            self.deadline = None
            self.lease_id = None
            self._abandon(term.lease)
            self._set(FOLLOWER, None, None)

    async def _keep_alive(self, term: _Term, scope: trio.CancelScope) -> None:
        """Renew every TTL/3 (sooner after a failure); each answer moves the deadline to
        its request's send time + TTL - margin."""
        period = term.ttl / 3
        next_send = term.sent + period
        while True:
            await trio.sleep_until(next_send)
            sent = trio.current_time()
            try:
                ttl = await self.client.keepalive(term.lease)
            except EtcdError as e:
                self._note(e)
                next_send = trio.current_time() + period / 4
                continue
            if scope.cancel_called:
                return
            if ttl <= 0:
                self._lost = "the lease expired"
                scope.cancel()
                return
            self.last_error = None
            deadline = sent + ttl - self.margin
            if deadline > scope.deadline:
                scope.deadline = self.deadline = deadline
                if self._on_renew is not None:
                    self._on_renew()
            next_send = sent + period

    async def _guard_key(self, term: _Term, scope: trio.CancelScope) -> None:
        """Step down when the key is deleted or replaced behind our back."""
        def gone(kv: KeyValue | None) -> bool:
            return kv is None or kv.create_revision != term.token

        await self._wait_for(term.revision + 1, gone)
        self._lost = "the leader key was deleted or replaced"
        scope.cancel()

    # -- follower ------------------------------------------------------------------------
    async def _follow(self, revision: int) -> None:
        """Track the holder until the key goes away."""
        def gone(kv: KeyValue | None) -> bool:
            if kv is None:
                return True
            self._set(FOLLOWER, kv.create_revision, kv.value)
            return False

        await self._wait_for(revision, gone)

    async def _wait_for(self, revision: int, done: Callable[[KeyValue | None], bool]) -> None:
        """Return once `done(key)` holds (None: absent), as seen by a watch from `revision`
        or by a fresh read, which happens after any watch failure and at least every TTL."""
        while True:
            with trio.move_on_after(self.ttl):
                try:
                    async with self.client.watch(self.key, start_revision=revision) as events:
                        async for ev in events:
                            kv = None if ev.kind == "delete" else KeyValue(
                                ev.key, ev.value or "", ev.create_revision, ev.mod_revision,
                                0, ev.lease)
                            if done(kv):
                                return
                            revision = ev.mod_revision + 1
                except EtcdError as e:
                    self._note(e)
                    await trio.sleep(self._retry_delay())
            while True:
                try:
                    kv, at = await self.client.range(self.key)
                    break
                except EtcdError as e:
                    self._note(e)
                    await trio.sleep(self._retry_delay())
            if done(kv):
                return
            revision = at + 1
