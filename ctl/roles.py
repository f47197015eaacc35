"""The leadership registry: "may this node write volume X?".

`LocalRegistry` is the single-node implementation: it grants leadership for every resource
unless told otherwise (an operator, or a future consensus module, calls `set_role`). Every
change is published as `leadership_role_changed {resource, role}`; the volume manager
follows those events to flip mounted volumes live.
"""

from __future__ import annotations

from typing import Protocol

from ctl.errors import InvalidInput
from ctl.events import EventBus

LEADER = "leader"
FOLLOWER = "follower"
ROLES = (LEADER, FOLLOWER)


class LeadershipRegistry(Protocol):
    def role(self, resource: str) -> str: ...

    def may_lead(self, resource: str) -> bool: ...

    def set_role(self, resource: str, role: str) -> bool: ...

    def snapshot(self) -> dict[str, str]: ...


class LocalRegistry:
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
        if role not in ROLES:
            raise InvalidInput(f"role must be one of {', '.join(ROLES)}")
        if self.role(resource) == role and resource in self._roles:
            return False
        changed = self.role(resource) != role
        self._roles[resource] = role
        if changed:
            self._bus.publish("leadership_role_changed", {"resource": resource, "role": role})
        return changed

    def snapshot(self) -> dict[str, str]:
        return dict(self._roles)
