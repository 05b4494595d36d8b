"""Every etcd key halb uses, in one place (``P`` = ``<etcd.prefix>/<cluster>``)::

    P/config                   the cluster config (YAML) every agent applies
    P/status/<node>            the node's status document (JSON), on the node's own
                               status lease: it disappears when the agent dies
    P/groups/<group>/leader    {"node": "lb1", "priority": 200, "lease": "<hex>"}
                               created only if absent (create-revision == 0), on the
                               node's lease. Term = (kv.lease, kv.create_revision).
    P/groups/<group>/handover  {"target": "lb2", "term": "<lease hex>@<rev>" | null,
                               "reason": "preempt" | "planned", "by": "lb1"}
                               Asks the leader of that term to hand over to target.
                               Written by a preempting node on its own lease (gone if
                               it dies), or by the CLI without a lease; whoever wins
                               the next term deletes it.
    P/groups/<group>/heartbeat {"term": "<lease hex>@<rev>", "seq": n}
                               put by the active every ``heartbeat_interval`` on its
                               lease, only while the leader key holds its term.
    P/drain/<node>             present = the node is drained (value: free text reason).
    P/health/view              the backend health view (halb.checks.publish), written by
                               the active node under its term
    P/drain-backend/<vip:port/proto>/<backend>
                               present = operator drain of a backend

The election keys' values are in halb.ha.values.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ClusterKeys", "GroupKeys"]


@dataclass(frozen=True, slots=True)
class ClusterKeys:
    prefix: str
    cluster: str

    @property
    def base(self) -> str:
        return f"{self.prefix.rstrip('/')}/{self.cluster}"

    @property
    def config(self) -> bytes:
        return f"{self.base}/config".encode()

    @property
    def status_prefix(self) -> bytes:
        return f"{self.base}/status/".encode()

    def status(self, node: str) -> bytes:
        return self.status_prefix + node.encode()

    @property
    def node_drain_prefix(self) -> bytes:
        return f"{self.base}/drain/".encode()

    @property
    def health_view(self) -> bytes:
        return f"{self.base}/health/view".encode()

    @property
    def backend_drain_prefix(self) -> bytes:
        return f"{self.base}/drain-backend/".encode()

    def group(self, name: str) -> GroupKeys:
        return GroupKeys(self.prefix, self.cluster, name)


@dataclass(frozen=True, slots=True)
class GroupKeys:
    prefix: str
    cluster: str
    group: str

    @property
    def base(self) -> str:
        return f"{self.prefix.rstrip('/')}/{self.cluster}"

    @property
    def group_prefix(self) -> bytes:
        return f"{self.base}/groups/{self.group}/".encode()

    @property
    def leader(self) -> bytes:
        return self.group_prefix + b"leader"

    @property
    def handover(self) -> bytes:
        return self.group_prefix + b"handover"

    @property
    def heartbeat(self) -> bytes:
        return self.group_prefix + b"heartbeat"

    def drain(self, node: str) -> bytes:
        return ClusterKeys(self.prefix, self.cluster).node_drain_prefix + node.encode()
