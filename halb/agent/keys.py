"""etcd key layout shared by the agent and the CLI (``P`` = ``<prefix>/<cluster>``).

P/config                 the cluster config (YAML) every agent applies
P/status/<node>          the node's status document (JSON), on the node's status
                         lease: it disappears when the agent dies
P/groups/<group>/...     election keys (halb.ha.coord.GroupKeys)
P/drain/<node>           operator drain of a node (halb.ha.coord)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ClusterKeys"]


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
