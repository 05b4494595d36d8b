"""A two-node cluster document for FlowSync tests and benchmarks (one DSR service on
10.0.0.100:80, backends on port 8080, sync over loopback)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["NODES", "two_node_doc"]

NODES = ["lb1", "lb2"]


def two_node_doc(
    cluster: str,
    backends: Sequence[str],
    *,
    sync_port: int | None = None,
    sync_insecure: bool = True,
) -> dict[str, Any]:
    """``sync_port`` None: sync addresses are placeholders (tests that pass addresses
    themselves); else lb1 and lb2 listen on consecutive ports from it."""
    return {
        "cluster": cluster,
        "etcd": {"endpoints": ["http://127.0.0.1:2379"]},
        "dataplane": {"kind": "xdp"},
        "nodes": [
            {
                "name": name,
                "address": f"10.0.0.{11 + i}/24",
                "interface": "eth0",
                "priority": 100 - i,
                "sync_address": "127.0.0.1:1"
                if sync_port is None
                else f"127.0.0.1:{sync_port + i}",
            }
            for i, name in enumerate(NODES)
        ],
        "vip_groups": [
            {
                "name": "g",
                "vips": [
                    {
                        "address": "10.0.0.100",
                        "services": [
                            {
                                "port": 80,
                                "forwarding": "dsr",
                                "backends": [{"address": b, "port": 8080} for b in backends],
                            }
                        ],
                    }
                ],
            }
        ],
        "sync": {"insecure": sync_insecure},
        "admin": {"insecure": True},
    }
