"""Cluster coordination: an etcd client and leader election with fencing tokens.

etcd is the consensus engine; this package only talks to it. `EtcdClient` speaks etcd's v3
JSON gateway natively under trio, and `Campaign` holds leadership of one resource with a
lease, a fencing token and a local deadline that makes a leader give up before anyone
else can win.
"""

from __future__ import annotations

from ctl.cluster.election import KEY_PREFIX, Campaign
from ctl.cluster.etcd import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    Lease,
    LeaseNotFound,
    MemberStatus,
    PutResult,
    Watch,
    WatchEvent,
)

__all__ = [
    "KEY_PREFIX",
    "Campaign",
    "EtcdClient",
    "EtcdCompacted",
    "EtcdError",
    "EtcdUnavailable",
    "KeyValue",
    "Lease",
    "LeaseNotFound",
    "MemberStatus",
    "PutResult",
    "Watch",
    "WatchEvent",
]
