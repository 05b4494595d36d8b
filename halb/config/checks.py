"""Semantic checks that need the whole document: duplicates, dataplane capabilities,
priorities, subnets, TLS, timing (halb.timing's invariants)."""

from __future__ import annotations

from collections.abc import Iterator

from halb import timing
from halb.config.capabilities import (
    DEADMAN_DATAPLANES,
    MIN_LEASE_TTL,
    SUPPORTED_FORWARDING,
    SUPPORTED_SCHEDULERS,
)
from halb.config.errors import ConfigIssue
from halb.config.schema import ClusterConfig, EtcdConfig, HealthCheckConfig, NodeConfig
from halb.model import (
    DataplaneKind,
    Forwarding,
    IPAddress,
    Protocol,
    Scheduler,
)

__all__ = [
    "semantic_issues",
]


# --- semantic checks ------------------------------------------------------------------


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def _failover_issues(cfg: ClusterConfig) -> Iterator[ConfigIssue]:
    f, kind = cfg.failover, cfg.dataplane.kind
    if f.coordinator_outage == timing.OUTAGE_HOLD and kind not in DEADMAN_DATAPLANES:
        yield ConfigIssue(
            "failover.coordinator_outage",
            f"hold needs a dataplane dead-man switch, which {kind.value} has not: a frozen "
            "holder would keep forwarding after its peers' promises ran out (two owners); "
            "use fence, or one of: " + ", ".join(sorted(k.value for k in DEADMAN_DATAPLANES)),
        )
    interval = f.interval_for(kind)
    if interval <= 0:
        return
    if kind not in DEADMAN_DATAPLANES:
        yield ConfigIssue(
            "failover.heartbeat_interval",
            f"fast takeover needs a dataplane dead-man switch, which {kind.value} has not "
            "(supported: " + ", ".join(sorted(k.value for k in DEADMAN_DATAPLANES)) + "); "
            "set 0 to fail over on the lease TTL",
        )
    if f.heartbeat_timeout < 3 * interval:
        yield ConfigIssue(
            "failover.heartbeat_timeout",
            f"{f.heartbeat_timeout:g} s is less than 3 heartbeat intervals "
            f"({3 * interval:g} s): one late heartbeat would fail the group over",
        )
    if cfg.etcd.lease_ttl >= MIN_LEASE_TTL and f.heartbeat_timeout >= cfg.etcd.lease_ttl:
        yield ConfigIssue(
            "failover.heartbeat_timeout",
            f"{f.heartbeat_timeout:g} s is not below etcd.lease_ttl "
            f"({cfg.etcd.lease_ttl:g} s): the lease would expire first",
        )


def _virtual_mac_issues(cfg: ClusterConfig) -> Iterator[ConfigIssue]:
    """One MAC and one macvlan per group; the name must not be a node's interface."""
    ids: dict[int, str] = {}
    names: dict[str, str] = {}
    node_ifaces = {i for n in cfg.nodes for i in (n.interface, n.backend_interface) if i}
    for gi, g in enumerate(cfg.vip_groups):
        vm = g.virtual_mac
        if vm is None:
            continue
        path = f"vip_groups[{gi}].virtual_mac"
        if vm.id in ids:
            yield ConfigIssue(f"{path}.id", f"id {vm.id} is also the virtual MAC of {ids[vm.id]}")
        ids.setdefault(vm.id, path)
        if vm.ifname in names:
            yield ConfigIssue(
                f"{path}.interface", f"interface {vm.ifname!r} is also used by {names[vm.ifname]}"
            )
        names.setdefault(vm.ifname, path)
        if vm.ifname in node_ifaces:
            yield ConfigIssue(
                f"{path}.interface",
                f"{vm.ifname!r} is a node's own interface; the virtual MAC needs a macvlan "
                "of its own on top of it",
            )


def _etcd_issues(etcd: EtcdConfig) -> Iterator[ConfigIssue]:
    https = [ep.startswith("https://") for ep in etcd.endpoints]
    if any(https) and not all(https):
        first = https.index(not https[0])
        yield ConfigIssue(
            f"etcd.endpoints[{first}]",
            f"{etcd.endpoints[first]!r}: mixes http:// and https:// endpoints; one scheme for all",
        )
    elif all(https) and etcd.tls is None:
        yield ConfigIssue("etcd.tls", "https:// endpoints need etcd.tls (at least ca)")
    elif not any(https) and etcd.tls is not None:
        yield ConfigIssue(
            "etcd.endpoints[0]",
            f"{etcd.endpoints[0]!r}: etcd.tls is set, so the endpoints must be https://",
        )
    tls = etcd.tls
    if tls is not None and (tls.cert is None) != (tls.key is None):
        missing = "etcd.tls.key" if tls.key is None else "etcd.tls.cert"
        yield ConfigIssue(missing, "a client certificate needs both cert and key")


def _timing_issues(cfg: ClusterConfig) -> Iterator[ConfigIssue]:
    """The safety argument's invariants (halb.timing), once the fields are sane."""
    if timing.ttl_issue(cfg.etcd.lease_ttl) is not None or any(_failover_issues(cfg)):
        return  # already reported with their own field paths
    for problem in cfg.timings().violations():
        yield ConfigIssue("failover", f"derived timings are unsafe: {problem}")


def semantic_issues(cfg: ClusterConfig) -> Iterator[ConfigIssue]:
    kind = cfg.dataplane.kind
    yield from _etcd_issues(cfg.etcd)
    ttl_problem = timing.ttl_issue(cfg.etcd.lease_ttl)
    if ttl_problem is not None:
        yield ConfigIssue("etcd.lease_ttl", ttl_problem)

    yield from _failover_issues(cfg)
    yield from _timing_issues(cfg)

    node_index: dict[str, int] = {}
    for i, n in enumerate(cfg.nodes):
        if n.name in node_index:
            yield ConfigIssue(
                f"nodes[{i}].name",
                f"duplicate node name {n.name!r} (also nodes[{node_index[n.name]}])",
            )
        else:
            node_index[n.name] = i

    for attr, section in (("sync", cfg.sync), ("admin", cfg.admin)):
        if section.tls is None and not section.insecure:
            yield ConfigIssue(
                f"{attr}.tls",
                f"TLS files (ca, cert, key) are required unless {attr}.insecure is true (lab only)",
            )

    yield from _virtual_mac_issues(cfg)

    seen_groups: dict[str, int] = {}
    seen_services: dict[tuple[IPAddress, int, Protocol], str] = {}
    for gi, g in enumerate(cfg.vip_groups):
        gpath = f"vip_groups[{gi}]"
        if g.name in seen_groups:
            yield ConfigIssue(
                f"{gpath}.name",
                f"duplicate group name {g.name!r} (also vip_groups[{seen_groups[g.name]}])",
            )
        seen_groups.setdefault(g.name, gi)

        member_names = g.nodes if g.nodes is not None else [n.name for n in cfg.nodes]
        members: list[NodeConfig] = []
        for ni, name in enumerate(member_names):
            if name not in node_index:
                yield ConfigIssue(f"{gpath}.nodes[{ni}]", f"node {name!r} is not defined in nodes")
            else:
                members.append(cfg.nodes[node_index[name]])

        by_priority: dict[int, str] = {}
        for n in members:
            if n.priority in by_priority:
                yield ConfigIssue(
                    f"nodes[{node_index[n.name]}].priority",
                    f"{n.priority} equals the priority of node {by_priority[n.priority]!r} "
                    f"in group {g.name!r}; priorities must be distinct",
                )
            else:
                by_priority[n.priority] = n.name

        nat_modes: set[Forwarding] = set()
        for vi, vip in enumerate(g.vips):
            for si, s in enumerate(vip.services):
                spath = f"{gpath}.vips[{vi}].services[{si}]"
                key = (vip.address, s.port, s.protocol)
                if key in seen_services:
                    host = f"[{vip.address}]" if vip.address.version == 6 else str(vip.address)
                    yield ConfigIssue(
                        spath,
                        f"duplicate service {host}:{s.port}/{s.protocol} "
                        f"(also {seen_services[key]})",
                    )
                else:
                    seen_services[key] = spath
                if s.forwarding not in SUPPORTED_FORWARDING[kind]:
                    allowed = ", ".join(f.value for f in SUPPORTED_FORWARDING[kind])
                    yield ConfigIssue(
                        f"{spath}.forwarding",
                        f"{s.forwarding.value!r} is not supported by the {kind.value} "
                        f"dataplane (supported: {allowed})",
                    )
                if s.scheduler not in SUPPORTED_SCHEDULERS[kind]:
                    allowed = ", ".join(x.value for x in SUPPORTED_SCHEDULERS[kind])
                    yield ConfigIssue(
                        f"{spath}.scheduler",
                        f"{s.scheduler.value!r} is not supported by the {kind.value} "
                        f"dataplane (supported: {allowed})",
                    )
                if s.forwarding in (Forwarding.NAT, Forwarding.FULLNAT) and (
                    s.forwarding in SUPPORTED_FORWARDING[kind]
                ):
                    nat_modes.add(s.forwarding)
                if s.scheduler is Scheduler.MAGLEV:
                    if not _is_prime(s.ring_size):
                        yield ConfigIssue(
                            f"{spath}.ring_size", f"{s.ring_size} is not a prime number"
                        )
                    elif s.ring_size <= 100 * len(s.backends):
                        yield ConfigIssue(
                            f"{spath}.ring_size",
                            f"{s.ring_size} must exceed 100 x the number of backends "
                            f"({len(s.backends)})",
                        )
                yield from _check_health(f"{spath}.health_check", s.health_check)
                backends = [(f"backends[{bi}]", b) for bi, b in enumerate(s.backends)]
                if s.sorry_backend is not None:
                    backends.append(("sorry_backend", s.sorry_backend))
                for bname, b in backends:
                    bpath = f"{spath}.{bname}"
                    if b.address.version != vip.address.version and (
                        s.forwarding is not Forwarding.TUNNEL
                    ):
                        yield ConfigIssue(
                            f"{bpath}.address",
                            f"{b.address} is IPv{b.address.version} but the VIP "
                            f"{vip.address} is IPv{vip.address.version}",
                        )
                    if s.forwarding is Forwarding.DSR and kind is not DataplaneKind.IPVS:
                        for n in members:
                            if (
                                n.address.version == b.address.version
                                and b.address not in n.address.network
                            ):
                                yield ConfigIssue(
                                    f"{bpath}.address",
                                    f"{b.address} is outside the L2 subnet "
                                    f"{n.address.network} of node {n.name!r} "
                                    "(dsr needs backends on the same segment)",
                                )
        if nat_modes:
            if Forwarding.NAT in nat_modes and (g.nat is None or g.nat.gateway is None):
                yield ConfigIssue(
                    f"{gpath}.nat.gateway",
                    "required: nat forwarding needs a floating gateway address for "
                    "the backends' return route",
                )
            if Forwarding.FULLNAT in nat_modes and (g.nat is None or g.nat.snat is None):
                yield ConfigIssue(
                    f"{gpath}.nat.snat",
                    "required: fullnat forwarding needs a floating source address",
                )
            for n in members:
                if n.backend_interface is None:
                    yield ConfigIssue(
                        f"nodes[{node_index[n.name]}].backend_interface",
                        f"required: group {g.name!r} uses NAT forwarding",
                    )


def _check_health(path: str, hc: HealthCheckConfig) -> Iterator[ConfigIssue]:
    if hc.timeout > hc.interval:
        yield ConfigIssue(
            f"{path}.timeout",
            f"{hc.timeout:g} exceeds the interval ({hc.interval:g})",
        )
    if hc.type == "exec" and not hc.command:
        yield ConfigIssue(f"{path}.command", "required for an exec check")
    if hc.type in ("http", "https") and not hc.path.startswith("/"):
        yield ConfigIssue(f"{path}.path", f"{hc.path!r} must start with '/'")
