"""The leadership registry: "may this node write volume X?".

`LocalRegistry` is the single-node implementation: it grants leadership for every resource
unless told otherwise (an operator calls `set_role`); a cluster's registry
(ctl.cluster.registry) takes leadership from etcd and fences leaders with their term. Every
change is published as `leadership_role_changed {resource, role}`; the volume manager
follows those events to flip mounted volumes live.

Resources are named like volumes (NAME_PATTERN) and the registry holds at most
MAX_RESOURCES of them: what a client may make the daemon remember is bounded.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ctl.errors import Conflict, InvalidInput
from ctl.events import EventBus

LEADER = "leader"
FOLLOWER = "follower"
ROLES = (LEADER, FOLLOWER)

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# Volume ids, app names and leadership resources: one shape, here at the bottom layer so
# that every layer above (and the API document) can state and check the same rule.
NAME_PATTERN = f"^{_NAME.pattern}$"
MAX_RESOURCES = 1024


def valid_name(name: object) -> bool:
    """Whether `name` is a resource name (fullmatch: no trailing newline slips through)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class Fence:
    """A leadership term as a mount sees it: the term's fencing token, and until when the
    mount may write unless the lease is renewed — an instant on the machine's monotonic
    clock (`time.monotonic()`, shared by every process), so that no delay in passing it
    on can lengthen it."""

    token: int
    until: float


Renewal = Callable[[str, Fence], Awaitable[bool]]


class LeadershipRegistry(Protocol):
    fenced: bool  # leaders' mounts are fenced by a term (a cluster)

    def role(self, resource: str) -> str: ...

    def may_lead(self, resource: str) -> bool: ...

    def set_role(self, resource: str, role: str) -> bool: ...

    def snapshot(self) -> dict[str, str]: ...

    def fence(self, resource: str) -> Fence | None:
        """The term to fence a leader's mount with; None: unfenced (a single node)."""

    def track(self, resource: str) -> None:
        """This node serves the volume now: campaign for it (a cluster)."""

    def untrack(self, resource: str) -> None:
        """This node no longer serves it: step down and stop campaigning."""

    def on_renewal(self, callback: Renewal) -> None:
        """`callback(resource, fence)` after every renewal of a term this node holds."""

    def leader(self, resource: str) -> tuple[str | None, int | None]:
        """The node holding `resource`'s current term and its token, as far as known."""


class LocalRegistry:
    fenced = False

    def __init__(self, bus: EventBus, default: str = LEADER) -> None:
        self._bus = bus
        self._default = default
        self._roles: dict[str, str] = {}

    def role(self, resource: str) -> str:
        return self._roles.get(resource, self._default)

    def may_lead(self, resource: str) -> bool:
        return self.role(resource) == LEADER

    def set_role(self, resource: str, role: str) -> bool:
        """Record a role; returns True (and publishes) when it changed."""
        if not valid_name(resource):
            raise InvalidInput(f"resource must match {NAME_PATTERN}")
        if role not in ROLES:
            raise InvalidInput(f"role must be one of {', '.join(ROLES)}")
        if resource not in self._roles and len(self._roles) >= MAX_RESOURCES:
            raise Conflict(f"the leadership registry holds {MAX_RESOURCES} resources, "
                           "its limit; set the role of a resource it already holds")
        if self.role(resource) == role and resource in self._roles:
            return False
        changed = self.role(resource) != role
        self._roles[resource] = role
        if changed:
            self._bus.publish("leadership_role_changed", {"resource": resource, "role": role})
        return changed

    def snapshot(self) -> dict[str, str]:
        return dict(self._roles)

    def fence(self, resource: str) -> Fence | None:
        return None  # one node: nobody else can write, nothing to fence

    def track(self, resource: str) -> None:
        pass

    def untrack(self, resource: str) -> None:
        pass

    def on_renewal(self, callback: Renewal) -> None:
        pass

    def leader(self, resource: str) -> tuple[str | None, int | None]:
        return None, None
