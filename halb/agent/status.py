"""Status documents: what each agent publishes, and the cluster view `halb status` shows.

Pure: building, serialising and merging documents. The etcd I/O is in
halb.agent.etcdio; the agent publishes its document on its own lease so a dead agent's
document disappears with it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from halb.config import ClusterConfig

__all__ = ["GroupStatus", "NodeStatus", "cluster_view", "parse_status"]


@dataclass(slots=True)
class GroupStatus:
    state: str = "init"
    term: str | None = None
    leader: str | None = None
    vips: list[str] = field(default_factory=list)
    since: float | None = None  # wall-clock time of the last state change
    cause: str = ""  # why the last state change happened
    # The peer-witnessed hold: holder side (holding since, promises, refusals) and
    # peer side (bound for, granted, refused); empty when coordinator_outage is fence.
    hold: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class NodeStatus:
    node: str
    pid: int
    started: float
    dataplane: str
    config_revision: int = 0
    groups: dict[str, GroupStatus] = field(default_factory=dict)
    last_failover: dict[str, Any] | None = None  # {"time", "group", "cause", "from", "to"}
    sync: dict[str, Any] = field(default_factory=dict)
    # The etcd client: member in use, rotations, last outage (halb.etcd EtcdClient.report).
    etcd: dict[str, Any] = field(default_factory=dict)
    updated: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


def parse_status(raw: bytes) -> NodeStatus | None:
    """A node's document, or None when it is unreadable (never raises)."""
    try:
        data = json.loads(raw)
        groups = {k: GroupStatus(**v) for k, v in data.pop("groups", {}).items()}
        return NodeStatus(groups=groups, **data)
    except (ValueError, TypeError):
        return None


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    node: str
    term: str
    ttl_left: float | None  # seconds left on the leader's lease, None if unknown


def _role(
    node: str, status: NodeStatus | None, leaders: dict[str, LeaderInfo], drained: set[str]
) -> str:
    if node in drained:
        return "drained"
    if any(li.node == node for li in leaders.values()):
        return "active"
    if status is None:
        return "down"
    return "standby"


def cluster_view(
    cfg: ClusterConfig,
    leaders: dict[str, LeaderInfo],
    statuses: dict[str, NodeStatus],
    drained: set[str],
) -> dict[str, Any]:
    """The document `halb status --output json` prints (a stable interface).

    ``nodes`` is a list of objects with at least ``name`` and ``role`` (active, standby,
    drained, or down when the node publishes no status and leads nothing).
    """
    nodes = []
    for n in cfg.nodes:
        st = statuses.get(n.name)
        nodes.append(
            {
                "name": n.name,
                "role": _role(n.name, st, leaders, drained),
                "priority": n.priority,
                "address": str(n.address.ip),
                "alive": st is not None,
                "groups": {g: asdict(gs) for g, gs in st.groups.items()} if st else {},
                "dataplane": st.dataplane if st else None,
                "config_revision": st.config_revision if st else None,
                "last_failover": st.last_failover if st else None,
                "sync": st.sync if st else {},
            }
        )
    groups = []
    for g in cfg.vip_groups:
        li = leaders.get(g.name)
        groups.append(
            {
                "name": g.name,
                "active": li.node if li else None,
                "term": li.term if li else None,
                "lease_ttl_left": li.ttl_left if li else None,
                "vips": [str(v.address) for v in g.vips],
                "preempt": g.preempt,
                "virtual_mac": g.virtual_mac.mac if g.virtual_mac is not None else None,
            }
        )
    failovers = [st.last_failover for st in statuses.values() if st.last_failover]
    last = max(failovers, key=lambda f: float(f.get("time", 0)), default=None)
    return {
        "cluster": cfg.cluster,
        "dataplane": cfg.dataplane.kind.value,
        "lease_ttl": cfg.etcd.lease_ttl,
        "groups": groups,
        "nodes": nodes,
        "last_failover": last,
    }
