"""The cluster's routes: what this node knows of the cluster and of its terms."""

from __future__ import annotations

from ctl.api.routes import API, BOOL, STR, Route, _out
from ctl.api.server import Request, Response
from ctl.cluster.registry import EtcdRegistry
from ctl.roles import LeadershipRegistry

STATUS = _out(["mode"], mode={"enum": ["etcd", "single-node"]}, node_id=STR, quorum=BOOL,
              reason={"type": ["string", "null"]}, members={"type": "array"},
              terms={"type": "object"}, endpoints={"type": "array", "items": STR})


def cluster_routes(registry: LeadershipRegistry) -> list[Route]:
    async def status(req: Request) -> Response:
        if isinstance(registry, EtcdRegistry):
            return Response(200, await registry.status())
        return Response(200, {"mode": "single-node", "quorum": True, "reason": None})

    return [Route("GET", f"{API}/cluster", status,
                  "Cluster status: members reachable, this node, the terms it holds, and "
                  "why there is no quorum when there is none", STATUS)]
