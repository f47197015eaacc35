"""The leadership registry of a cluster: leadership of each stateful volume comes from an
etcd campaign, its fencing token goes down to the volume's mount.

A node campaigns for a volume only while it serves it (attached, unlocked): a locked node
must not hold a term it cannot use. The bootstrap and control volumes are each node's own
and always led locally. Every change of a term is published as
`leadership_role_changed {resource, role, node, holder, term, token}`; the volume manager
promotes or demotes the mount live. Every renewal of a term this node holds extends the
mount's write lease by what the campaign's local deadline allows — so the mount stops
writing by its own clock before another node can be granted the volume.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import trio

from ctl.cluster.election import Campaign
from ctl.cluster.etcd import EtcdClient, EtcdError
from ctl.errors import Conflict
from ctl.events import EventBus
from ctl.roles import FOLLOWER, LEADER, Fence, Renewal

log = logging.getLogger("ctl.cluster")

LOCAL = ("bootstrap", "control")  # each node's own volumes


class EtcdRegistry:
    fenced = True

    def __init__(self, bus: EventBus, node_id: str, endpoints: Sequence[str],
                 ttl: float = 5.0) -> None:
        self.bus = bus
        self.node_id = node_id
        self.endpoints = list(endpoints)
        self.ttl = ttl
        self.client = EtcdClient(self.endpoints)
        self._campaigns: dict[str, tuple[Campaign, trio.CancelScope]] = {}
        self._renewal: Renewal | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Own the etcd client and every campaign; cancelling steps down everywhere."""
        async with self.client, trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # -- the registry protocol -----------------------------------------------------------
    def role(self, resource: str) -> str:
        if resource in LOCAL:
            return LEADER
        entry = self._campaigns.get(resource)
        return LEADER if entry is not None and entry[0].is_leader() else FOLLOWER

    def may_lead(self, resource: str) -> bool:
        return self.role(resource) == LEADER

    def set_role(self, resource: str, role: str) -> bool:
        raise Conflict("in a cluster, leadership comes from etcd: it cannot be set by hand")

    def snapshot(self) -> dict[str, str]:
        return {r: self.role(r) for r in sorted(self._campaigns)}

    def fence(self, resource: str) -> Fence | None:
        entry = self._campaigns.get(resource)
        if entry is None or not entry[0].is_leader():
            return None
        c = entry[0]
        assert c.token is not None and c.deadline is not None
        return Fence(c.token, time.monotonic() + (c.deadline - trio.current_time()))

    def leader(self, resource: str) -> tuple[str | None, int | None]:
        if resource in LOCAL:
            return self.node_id, None
        entry = self._campaigns.get(resource)
        return (entry[0].holder, entry[0].token) if entry is not None else (None, None)

    def on_renewal(self, callback: Renewal) -> None:
        self._renewal = callback

    def track(self, resource: str) -> None:
        if resource in LOCAL or resource in self._campaigns or self._nursery is None:
            return
        scope = trio.CancelScope()
        campaign = Campaign(
            self.client, resource, self.node_id, self.ttl,
            on_change=lambda role, token, holder: self._changed(resource, role, token, holder),
            on_renew=lambda: self._renewed(resource))
        self._campaigns[resource] = (campaign, scope)
        self._nursery.start_soon(self._campaign, campaign, scope)
        log.info("campaigning for %s as %s", resource, self.node_id)

    def untrack(self, resource: str) -> None:
        entry = self._campaigns.pop(resource, None)
        if entry is not None:
            entry[1].cancel()

    # -- plumbing ------------------------------------------------------------------------
    async def _campaign(self, campaign: Campaign, scope: trio.CancelScope) -> None:
        with scope:
            await campaign.run()

    def _changed(self, resource: str, role: str, token: int | None,
                 holder: str | None) -> None:
        log.info("%s: %s (term %s, held by %s)", resource, role, token, holder)
        self.bus.publish("leadership_role_changed", {
            "resource": resource, "role": role, "node": self.node_id, "holder": holder,
            "term": token, "token": token})

    def _renewed(self, resource: str) -> None:
        fence = self.fence(resource)
        if fence is not None and self._renewal is not None and self._nursery is not None:
            self._nursery.start_soon(self._renewal, resource, fence)

    async def status(self) -> dict[str, Any]:
        """Members reachable, this node, the terms it campaigns for — and why not, when
        there is no quorum."""
        reason: str | None = None
        try:
            members = await self.client.status()
        except EtcdError as exc:
            members, reason = [], exc.message
        reachable = [m for m in members if m.reachable]
        quorum = any(m.leader for m in reachable)
        if not quorum and reason is None:
            reason = (f"no etcd leader among {len(reachable)} reachable of "
                      f"{len(self.endpoints)} endpoints: no quorum")
        now = trio.current_time()
        return {
            "mode": "etcd", "node_id": self.node_id, "endpoints": self.endpoints,
            "lease_ttl": self.ttl, "quorum": quorum, "reason": reason,
            "members": [{"endpoint": m.endpoint, "reachable": m.reachable,
                         "leader": m.is_leader, "raft_term": m.raft_term, "error": m.error}
                        for m in members],
            "terms": {r: {"role": self.role(r), "holder": c.holder, "token": c.token,
                          "deadline_in": (round(c.deadline - now, 3)
                                          if c.deadline is not None else None),
                          "last_error": c.last_error, "step_down_reason": c.step_down_reason}
                      for r, (c, _) in sorted(self._campaigns.items())},
        }
