"""Pure description of the lab: namespaces, links, addresses, MACs and the lab config.

Nothing here touches the system; halb.lab.builder turns a LabPlan into namespaces.
See docs/lab-layout.md for the picture.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ECHO_PORT",
    "ETCD_USER",
    "HTTP_PORT",
    "LAB_DIR",
    "NS_PREFIX",
    "UDP_PORT",
    "Host",
    "LabPlan",
    "LabSite",
    "Link",
    "lab_config",
    "plan",
    "second_group",
    "site_from_env",
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
# etcd members on the host's management link: .1 (the single member), then .5 and .6.
ETCD_OCTETS = (1, 5, 6)
ETCD_USER = "halb"

FRONT, BACK, MGMT = 0, 1, 2
BRIDGES = {FRONT: "br-front", BACK: "br-back", MGMT: "br-mgmt"}
ROLE_CODE = {"client": 1, "lb": 2, "be": 3, "host": 4}
MAX_NODES = 9
MAX_BACKENDS = 50
MAX_INSTANCE = 9


@dataclass(frozen=True, slots=True)
class LabSite:
    """Which lab: instance 0 is the lab of the README (namespaces halb-*, 10.99.0.0/16,
    /run/halb-lab); instance N (1-9) is a parallel lab with namespaces halb-N-*,
    10.(99-N).0.0/16 and /run/halb-lab-N, so several developers or test runs can each
    have one. Chosen with the HALB_LAB_INSTANCE environment variable."""

    instance: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.instance <= MAX_INSTANCE:
            raise ValueError(f"lab instance must be 0-{MAX_INSTANCE}, not {self.instance}")

    @property
    def prefix(self) -> str:
        return NS_PREFIX if self.instance == 0 else f"{NS_PREFIX}{self.instance}-"

    @property
    def lab_dir(self) -> Path:
        return LAB_DIR if self.instance == 0 else Path(f"{LAB_DIR}-{self.instance}")

    @property
    def cluster(self) -> str:
        # Distinct per instance: pinned maps live under /run/halb/bpffs/<cluster>/<node>.
        return "lab" if self.instance == 0 else f"lab{self.instance}"

    @property
    def switch_ns(self) -> str:
        return f"{self.prefix}sw"

    @property
    def host_link(self) -> str:
        return HOST_LINK if self.instance == 0 else f"{HOST_LINK}{self.instance}"

    @property
    def octet(self) -> int:
        return 99 - self.instance

    def net(self, segment: int) -> str:
        """The first three octets of a segment's IPv4 /24."""
        return f"10.{self.octet}.{segment}"

    @property
    def net6(self) -> str:
        return f"fd{self.octet}::"

    def owns(self, namespace: str) -> bool:
        if self.instance == 0:
            return namespace.startswith(NS_PREFIX) and not re.match(r"^halb-\d+-", namespace)
        return namespace.startswith(self.prefix)

    def ns(self, name: str) -> str:
        """The namespace of lab host ``name`` (``lb1``, ``client``, or already full)."""
        return name if self.owns(name) else f"{self.prefix}{name}"


def site_from_env() -> LabSite:
    raw = os.environ.get("HALB_LAB_INSTANCE", "0") or "0"
    if not raw.isdigit():
        raise ValueError(f"HALB_LAB_INSTANCE={raw!r}: must be a number 0-{MAX_INSTANCE}")
    return LabSite(int(raw))


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
    prefix: str
    name: str
    role: str  # client | lb | be
    index: int
    links: tuple[Link, ...]
    # Addresses on lo (the VIPs on DSR backends).
    loopback: tuple[str, ...] = ()

    @property
    def namespace(self) -> str:
        return f"{self.prefix}{self.name}"

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
    site: LabSite = LabSite()
    extra: dict[str, Any] = field(default_factory=dict)
    etcd_members: int = 1
    etcd_tls: bool = False  # TLS with client certificates, auth on, a prefix-limited role

    @property
    def vip(self) -> str:
        return f"{self.site.net(FRONT)}.100"

    @property
    def vip6(self) -> str:
        return f"{self.site.net6}100"

    @property
    def vip2(self) -> str:
        """The VIP of a second group (second_group()); the backends hold it too."""
        return f"{self.site.net(FRONT)}.101"

    @property
    def nat_gateway(self) -> str:
        return f"{self.site.net(BACK)}.1/24"

    @property
    def snat(self) -> str:
        return f"{self.site.net(BACK)}.2/24"

    @property
    def host_address(self) -> str:
        return f"{self.site.net(MGMT)}.1/24"

    @property
    def lab_dir(self) -> Path:
        return self.site.lab_dir

    @property
    def hosts(self) -> tuple[Host, ...]:
        return (self.client, *self.nodes, *self.backends)

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.site.switch_ns, *(h.namespace for h in self.hosts))

    @property
    def etcd_addresses(self) -> tuple[str, ...]:
        """The members' addresses on the management segment (on the host's link)."""
        net = self.site.net(MGMT)
        return tuple(f"{net}.{octet}" for octet in ETCD_OCTETS[: self.etcd_members])

    @property
    def etcd_endpoints(self) -> list[str]:
        scheme = "https" if self.etcd_tls else "http"
        return [f"{scheme}://{ip}:2379" for ip in self.etcd_addresses]

    @property
    def etcd_endpoint(self) -> str:
        return self.etcd_endpoints[0]

    @property
    def etcd_tls_dir(self) -> Path:
        return self.lab_dir / "etcd-tls"

    @property
    def etcd_server_name(self) -> str:
        return f"etcd.{self.site.cluster}"

    @property
    def etcd_role_prefix(self) -> str:
        """The keys the lab's etcd user may touch: this cluster's, nothing else."""
        return f"/halb/{self.site.cluster}/"

    @property
    def config_path(self) -> Path:
        return self.lab_dir / "halb.yaml"


def _mac(site: LabSite, segment: int, role: str, index: int) -> str:
    return f"02:{site.octet:02x}:{segment:02x}:00:{ROLE_CODE[role]:02x}:{index:02x}"


def _host(
    site: LabSite,
    name: str,
    role: str,
    index: int,
    octet: int,
    segments: tuple[int, ...],
    loopback: tuple[str, ...] = (),
) -> Host:
    short = "cl" if role == "client" else name
    suffix = {FRONT: "f", BACK: "b", MGMT: "m"}
    links = []
    for ifindex, seg in enumerate(segments):
        addrs = [f"{site.net(seg)}.{octet}/24"]
        if seg == FRONT:
            addrs.append(f"{site.net6}{octet}/64")
        links.append(
            Link(
                ifname=f"eth{ifindex}",
                peer=f"{short}-{suffix[seg]}",
                segment=seg,
                mac=_mac(site, seg, role, index),
                addresses=tuple(addrs),
            )
        )
    return Host(site.prefix, name, role, index, tuple(links), loopback)


def plan(
    n_nodes: int = 2,
    n_backends: int = 3,
    site: LabSite | None = None,
    *,
    etcd_members: int = 1,
    etcd_tls: bool = False,
) -> LabPlan:
    site = site or LabSite()
    if etcd_members not in (1, 3):
        raise ValueError(f"--etcd-members must be 1 or 3, not {etcd_members}")
    if not 1 <= n_nodes <= MAX_NODES:
        raise ValueError(f"--nodes must be between 1 and {MAX_NODES}, not {n_nodes}")
    if not 1 <= n_backends <= MAX_BACKENDS:
        raise ValueError(f"--backends must be between 1 and {MAX_BACKENDS}, not {n_backends}")
    base = LabPlan(
        client=_host(site, "client", "client", 1, 2, (FRONT,)), nodes=(), backends=(), site=site
    )
    nodes = tuple(
        _host(site, f"lb{i}", "lb", i, 10 + i, (FRONT, BACK, MGMT)) for i in range(1, n_nodes + 1)
    )
    vips = (f"{base.vip}/32", f"{base.vip6}/128", f"{base.vip2}/32")
    backends = tuple(
        _host(site, f"be{i}", "be", i, 20 + i, (FRONT, BACK), vips)
        for i in range(1, n_backends + 1)
    )
    return LabPlan(
        client=base.client,
        nodes=nodes,
        backends=backends,
        site=site,
        etcd_members=etcd_members,
        etcd_tls=etcd_tls,
    )


def _prime_above(n: int) -> int:
    """The smallest prime above ``n`` (a valid Maglev ring size for n / 100 backends)."""
    k = n + 1
    while any(k % d == 0 for d in range(2, int(k**0.5) + 1)):
        k += 1
    return k


def lab_config(p: LabPlan, dataplane: str = "xdp", virtual_mac: bool = False) -> dict[str, Any]:
    """The cluster config document for the lab (validated by the caller); with
    ``virtual_mac`` the group answers from 00:00:5e:00:01:01 on a macvlan."""
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
    # nft: backend and health changes rewrite only ring slots, but an agent's start and
    # each layout change (the lab tests switch nat <-> fullnat) load the whole table:
    # with 65537-slot rings that took tests/lab/test_nft_lab.py's first four tests from
    # 38 s to 55 s here, so the lab keeps its rings small.
    ring = {"ring_size": _prime_above(100 * len(p.backends))} if nat else {}
    services = [
        {
            "port": port,
            "protocol": proto,
            "forwarding": mode,
            **ring,
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
    if virtual_mac:
        group["virtual_mac"] = {"id": 1}
    cfg: dict[str, Any] = {
        "cluster": p.site.cluster,
        "etcd": {"endpoints": p.etcd_endpoints, "lease_ttl": 1.0},
        # Generic XDP: on veth, native XDP_TX needs a program on the peer too, and
        # both measure alike end to end (PLATFORM.md).
        "dataplane": {"kind": dataplane, "xdp_mode": "generic"},
        "nodes": nodes,
        "vip_groups": [group],
        # The lab exists to break backends on purpose: damp only real flapping.
        "health": {"damping": {"max_changes": 20, "window": 60.0, "hold": 10.0}},
        "sync": {"insecure": True},
        "admin": {"insecure": True},
        "state_dir": str(p.lab_dir / "state"),
    }
    if p.etcd_tls:
        d = p.etcd_tls_dir
        cfg["etcd"]["tls"] = {
            "ca": str(d / "ca.pem"),
            "cert": str(d / "client.pem"),
            "key": str(d / "client-key.pem"),
            "server_name": p.etcd_server_name,
        }
        # No etcd.auth: the client certificate's CN is the etcd user (etcd_members).
    # Fast takeover (the dataplane's dead-man switch fences a silent node): a local etcd
    # answers in milliseconds, so six missed heartbeats mean a dead or frozen agent.
    cfg["failover"] = {"heartbeat_interval": 0.05, "heartbeat_timeout": 0.3}
    return cfg


def second_group(cfg: dict[str, Any], vip: str, name: str = "lab2") -> dict[str, Any]:
    """A copy of the lab's config document with a second VIP group: ``vip`` with the
    first group's services, no preemption (so an active moved there stays), for tests
    of groups whose actives are on different nodes."""
    out = copy.deepcopy(cfg)
    group = copy.deepcopy(out["vip_groups"][0])
    group["name"] = name
    group["preempt"] = False
    group["vips"] = [{**group["vips"][0], "address": vip}]
    out["vip_groups"].append(group)
    return out
