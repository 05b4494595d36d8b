"""Pure description of the lab: namespaces, links, addresses, MACs and the lab config.

Nothing here touches the system; halb.lab.builder turns a LabPlan into namespaces.
See docs/lab-layout.md for the picture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ECHO_PORT",
    "HTTP_PORT",
    "LAB_DIR",
    "NS_PREFIX",
    "UDP_PORT",
    "Host",
    "LabPlan",
    "Link",
    "lab_config",
    "plan",
]

NS_PREFIX = "halb-"
LAB_DIR = Path("/run/halb-lab")
SWITCH_NS = "halb-sw"
HOST_LINK = "halb-mgmt"  # the root namespace's leg into the management bridge
ECHO_PORT = 9000
HTTP_PORT = 80
UDP_PORT = 9001
SYNC_PORT = 7700
ADMIN_PORT = 7701
METRICS_PORT = 9700

FRONT, BACK, MGMT = 0, 1, 2
BRIDGES = {FRONT: "br-front", BACK: "br-back", MGMT: "br-mgmt"}
ROLE_CODE = {"client": 1, "lb": 2, "be": 3, "host": 4}
MAX_NODES = 9
MAX_BACKENDS = 50


@dataclass(frozen=True, slots=True)
class Link:
    """One veth: ``ifname`` inside the host namespace, ``peer`` on a bridge in halb-sw."""

    ifname: str
    peer: str
    segment: int
    mac: str
    addresses: tuple[str, ...]  # address/prefix

    @property
    def bridge(self) -> str:
        return BRIDGES[self.segment]


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    role: str  # client | lb | be
    index: int
    links: tuple[Link, ...]
    # Addresses on lo (the VIPs on DSR backends).
    loopback: tuple[str, ...] = ()

    @property
    def namespace(self) -> str:
        return f"{NS_PREFIX}{self.name}"

    def link(self, segment: int) -> Link:
        for lk in self.links:
            if lk.segment == segment:
                return lk
        raise KeyError(f"{self.name} has no link on segment {segment}")

    @property
    def address(self) -> str:
        return self.link(FRONT).addresses[0].split("/")[0]

    @property
    def mac(self) -> str:
        return self.link(FRONT).mac


@dataclass(frozen=True, slots=True)
class LabPlan:
    client: Host
    nodes: tuple[Host, ...]
    backends: tuple[Host, ...]
    vip: str = "10.99.0.100"
    vip6: str = "fd99::100"
    nat_gateway: str = "10.99.1.1/24"
    snat: str = "10.99.1.2/24"
    host_address: str = "10.99.2.1/24"
    lab_dir: Path = LAB_DIR
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hosts(self) -> tuple[Host, ...]:
        return (self.client, *self.nodes, *self.backends)

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (SWITCH_NS, *(h.namespace for h in self.hosts))

    @property
    def etcd_endpoint(self) -> str:
        return f"http://{self.host_address.split('/')[0]}:2379"

    @property
    def config_path(self) -> Path:
        return self.lab_dir / "halb.yaml"


def _mac(segment: int, role: str, index: int) -> str:
    return f"02:99:{segment:02x}:00:{ROLE_CODE[role]:02x}:{index:02x}"


def _host(name: str, role: str, index: int, octet: int, segments: tuple[int, ...]) -> Host:
    short = "cl" if role == "client" else name
    suffix = {FRONT: "f", BACK: "b", MGMT: "m"}
    links = []
    for ifindex, seg in enumerate(segments):
        addrs = [f"10.99.{seg}.{octet}/24"]
        if seg == FRONT:
            addrs.append(f"fd99::{octet}/64")
        links.append(
            Link(
                ifname=f"eth{ifindex}",
                peer=f"{short}-{suffix[seg]}",
                segment=seg,
                mac=_mac(seg, role, index),
                addresses=tuple(addrs),
            )
        )
    return Host(name=name, role=role, index=index, links=tuple(links))


def plan(n_nodes: int = 2, n_backends: int = 3, lab_dir: Path = LAB_DIR) -> LabPlan:
    if not 1 <= n_nodes <= MAX_NODES:
        raise ValueError(f"--nodes must be between 1 and {MAX_NODES}, not {n_nodes}")
    if not 1 <= n_backends <= MAX_BACKENDS:
        raise ValueError(f"--backends must be between 1 and {MAX_BACKENDS}, not {n_backends}")
    client = _host("client", "client", 1, 2, (FRONT,))
    nodes = tuple(
        _host(f"lb{i}", "lb", i, 10 + i, (FRONT, BACK, MGMT)) for i in range(1, n_nodes + 1)
    )
    base = LabPlan(client=client, nodes=(), backends=(), lab_dir=lab_dir)
    backends = tuple(
        Host(
            name=h.name,
            role=h.role,
            index=h.index,
            links=h.links,
            loopback=(f"{base.vip}/32", f"{base.vip6}/128"),
        )
        for h in (_host(f"be{i}", "be", i, 20 + i, (FRONT, BACK)) for i in range(1, n_backends + 1))
    )
    return LabPlan(client=client, nodes=nodes, backends=backends, lab_dir=lab_dir)


def lab_config(p: LabPlan, dataplane: str = "xdp") -> dict[str, Any]:
    """The cluster config document for the lab (validated by the caller)."""
    nat = dataplane == "nft"
    nodes = []
    for i, n in enumerate(p.nodes):
        mgmt = n.link(MGMT).addresses[0].split("/")[0]
        node: dict[str, Any] = {
            "name": n.name,
            "address": n.link(FRONT).addresses[0],
            "interface": n.link(FRONT).ifname,
            "priority": 200 - 10 * i,
            "sync_address": f"{mgmt}:{SYNC_PORT}",
            "admin_address": f"{mgmt}:{ADMIN_PORT}",
            "metrics_address": f"{mgmt}:{METRICS_PORT}",
        }
        if nat:
            node["backend_interface"] = n.link(BACK).ifname
        nodes.append(node)

    def backends(segment: int) -> list[dict[str, Any]]:
        return [
            {
                "address": b.link(segment).addresses[0].split("/")[0],
                "mac": b.link(segment).mac,
            }
            for b in p.backends
        ]

    if nat:
        mode, seg = "nat", BACK
    else:
        mode, seg = "dsr", FRONT
    services = [
        {
            "port": port,
            "protocol": proto,
            "forwarding": mode,
            "backends": backends(seg),
            "health_check": {"type": check, **({"payload": "WHOAMI\n"} if proto == "udp" else {})},
        }
        for port, proto, check in (
            (ECHO_PORT, "tcp", "tcp"),
            (HTTP_PORT, "tcp", "http"),
            (UDP_PORT, "udp", "udp"),
        )
    ]
    group: dict[str, Any] = {
        "name": "lab",
        "preempt": True,
        "preempt_delay": 2.0,
        "announce": {"count": 3, "interval": 0.1},
        "vips": [{"address": p.vip, "services": services}],
    }
    if nat:
        group["nat"] = {"gateway": p.nat_gateway, "snat": p.snat}
    return {
        "cluster": "lab",
        "etcd": {"endpoints": [p.etcd_endpoint], "lease_ttl": 1.0},
        "dataplane": {"kind": dataplane, "xdp_mode": "native"},
        "nodes": nodes,
        "vip_groups": [group],
        "sync": {"insecure": True},
        "admin": {"insecure": True},
        "state_dir": str(p.lab_dir / "state"),
    }
