"""A two-node cluster document for FlowSync tests and benchmarks (one DSR service on
10.0.0.100:80, backends on port 8080, sync over loopback), and XDP dataplanes to play
its two ends without a lab."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any

from halb.model import Service

if TYPE_CHECKING:
    from halb.dataplane.xdp.adapter import XdpDataplane

__all__ = ["NODES", "two_node_doc", "validation_doc", "veth_dataplanes"]

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


def validation_doc() -> dict[str, Any]:
    """The two-node cluster with the cases flow validation must tell apart: 10.0.0.100
    tcp/80 (backends 10.0.0.21:8080 and 10.0.0.22 on the service port, sorry backend
    10.0.0.29:9000), udp/53 (10.0.0.21:53), and 2001:db8::100 tcp/443 through a tunnel
    to 2001:db8:1::21."""
    doc = two_node_doc("t", [])
    v4_services = [
        {
            "port": 80,
            "forwarding": "dsr",
            "backends": [{"address": "10.0.0.21", "port": 8080}, {"address": "10.0.0.22"}],
            "sorry_backend": {"address": "10.0.0.29", "port": 9000},
        },
        {
            "port": 53,
            "protocol": "udp",
            "forwarding": "dsr",
            "backends": [{"address": "10.0.0.21"}],
        },
    ]
    v6_services = [
        {"port": 443, "forwarding": "tunnel", "backends": [{"address": "2001:db8:1::21"}]}
    ]
    doc["vip_groups"] = [
        {
            "name": "g",
            "vips": [
                {"address": "10.0.0.100", "services": v4_services},
                {"address": "2001:db8::100", "services": v6_services},
            ],
        }
    ]
    return doc


MakeDataplane = Callable[[Sequence[Service], str], "XdpDataplane"]


@contextlib.contextmanager
def veth_dataplanes(prefix: str) -> Iterator[MakeDataplane]:
    """make(services, node_address): an XdpDataplane (generic XDP, maps not pinned) on
    veth0 of a network namespace of its own, with these services applied. Every
    namespace and dataplane made is removed on exit. Root only."""
    made: list[tuple[str, XdpDataplane | None]] = []

    def make(services: Sequence[Service], address: str) -> XdpDataplane:
        from halb.dataplane.xdp.adapter import XdpDataplane

        ns = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        made.append((ns, None))
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", ns, "link", "add", "veth0", "type", "veth",
                        "peer", "name", "veth1"], check=True)  # fmt: skip
        subprocess.run(["ip", "-n", ns, "link", "set", "veth0", "up"], check=True)
        dp = XdpDataplane("veth0", ip_address(address), "generic", None, ns)
        made[-1] = (ns, dp)
        dp.apply(services)
        return dp

    try:
        yield make
    finally:
        for ns, dp in made:
            if dp is not None:
                dp.close()
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
