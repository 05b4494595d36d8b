"""Cluster configuration: schema, loading, validation with field-path errors.

One YAML file describes a whole cluster. Every error names the exact field path
(``vip_groups[0].vips[1].services[0].backends[2].address``) so an operator can fix it
without guessing. Structural errors come from pydantic; the semantic checks that need
the whole document (duplicates, dataplane capabilities, priorities, subnets) run after.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from halb import timing
from halb.model import (
    Backend,
    DataplaneKind,
    Forwarding,
    IPAddress,
    Protocol,
    Scheduler,
    Service,
    ServiceKey,
)

__all__ = [
    "MIN_LEASE_TTL",
    "SUPPORTED_FORWARDING",
    "SUPPORTED_SCHEDULERS",
    "ClusterConfig",
    "ConfigError",
    "ConfigIssue",
    "dump_config",
    "group_services",
    "load_config",
    "parse_config",
    "parse_config_text",
]

# Timing lives in halb.timing; these names stay importable from here.
MIN_LEASE_TTL = timing.MIN_LEASE_TTL
DEADMAN_DATAPLANES = timing.DEADMAN_DATAPLANES

SUPPORTED_FORWARDING: dict[DataplaneKind, tuple[Forwarding, ...]] = {
    DataplaneKind.XDP: (Forwarding.DSR, Forwarding.TUNNEL),
    DataplaneKind.NFT: (Forwarding.NAT, Forwarding.FULLNAT),
    DataplaneKind.IPVS: (Forwarding.NAT, Forwarding.DSR, Forwarding.TUNNEL),
}

SUPPORTED_SCHEDULERS: dict[DataplaneKind, tuple[Scheduler, ...]] = {
    DataplaneKind.XDP: (Scheduler.MAGLEV,),
    DataplaneKind.NFT: (Scheduler.MAGLEV, Scheduler.RR),
    DataplaneKind.IPVS: tuple(Scheduler),
}

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


# --- scalar types with operator-friendly messages -------------------------------------


def _err(kind: str, message: str) -> PydanticCustomError:
    # The message is a template to pydantic: pass user text through the context so
    # braces in it are never interpreted.
    return PydanticCustomError(kind, "{msg}", {"msg": message})


def _ip(value: Any) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise _err("ip_address", f"{value!r} is not an IP address") from None


def _ip_interface(value: Any) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if isinstance(value, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        return value
    text = str(value)
    if "/" not in text:
        raise _err(
            "ip_interface", f"{value!r} needs a prefix length (address/prefix, e.g. 10.0.0.11/24)"
        )
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise _err("ip_interface", f"{value!r} is not an address/prefix") from None


def _name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise _err(
            "name",
            f"{value!r} is not a valid name (lower-case letters, digits and '-', "
            f"at most 63 characters)",
        )
    return value


def _mac(value: Any) -> str:
    text = str(value).lower()
    if not _MAC_RE.match(text):
        raise _err("mac", f"{value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    return text


def _hostport(value: Any) -> str:
    text = str(value)
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    ok = bool(sep) and port.isdigit() and 0 < int(port) < 65536 and bool(host)
    if ok:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            ok = bool(re.match(r"^[A-Za-z0-9.-]+$", host))
    if not ok:
        raise _err("host_port", f"{value!r} is not host:port")
    return text


def _endpoint(value: Any) -> str:
    text = str(value)
    m = re.match(r"^(https?)://(.+)$", text)
    if not m:
        raise _err(
            "endpoint", f"{value!r} is not an etcd endpoint (http://host:port or https://host:port)"
        )
    _hostport(m.group(2))
    return text


IP = Annotated[IPAddress, BeforeValidator(_ip)]
IPInterface = Annotated[
    ipaddress.IPv4Interface | ipaddress.IPv6Interface, BeforeValidator(_ip_interface)
]
Name = Annotated[str, BeforeValidator(_name)]
Mac = Annotated[str, BeforeValidator(_mac)]
HostPort = Annotated[str, BeforeValidator(_hostport)]
Endpoint = Annotated[str, BeforeValidator(_endpoint)]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


# --- schema ---------------------------------------------------------------------------


class TlsFiles(_Model):
    """PEM files. ``{node}`` in a path is replaced by the node's name."""

    ca: str
    cert: str
    key: str

    def for_node(self, node: str) -> TlsFiles:
        return TlsFiles(
            ca=self.ca.format(node=node),
            cert=self.cert.format(node=node),
            key=self.key.format(node=node),
        )


class EtcdTls(_Model):
    """TLS to the etcd members: the CA that signed their certificates, this node's
    client certificate and key (etcd's --client-cert-auth), and the name every
    member's certificate carries (endpoints are dialled by address)."""

    ca: str = Field(min_length=1)
    cert: str | None = Field(default=None, min_length=1)
    key: str | None = Field(default=None, min_length=1)
    server_name: str | None = Field(default=None, min_length=1)

    def for_node(self, node: str) -> EtcdTls:
        """``{node}`` in a path replaced by the node's name."""
        return EtcdTls(
            ca=self.ca.format(node=node),
            cert=self.cert.format(node=node) if self.cert else None,
            key=self.key.format(node=node) if self.key else None,
            server_name=self.server_name,
        )


class EtcdAuth(_Model):
    """etcd user; the password comes from ``password_file`` or HALB_ETCD_PASSWORD
    (never the config itself, which is stored in etcd, nor the command line)."""

    user: str = Field(min_length=1)
    password_file: str | None = Field(default=None, min_length=1)


class EtcdConfig(_Model):
    endpoints: list[Endpoint] = Field(min_length=1)
    tls: EtcdTls | None = None
    auth: EtcdAuth | None = None
    lease_ttl: float = Field(default=2.0, description="Leader lease TTL in seconds (>= 1).")
    prefix: str = "/halb"
    # Lab only: the agent never needs it; the CLI uses it to reach a lab etcd.
    dial_timeout: Seconds = 2.0


class DataplaneConfig(_Model):
    kind: DataplaneKind
    xdp_mode: Literal["native", "generic"] = "native"


class NodeConfig(_Model):
    name: Name
    address: IPInterface
    interface: str = Field(min_length=1, max_length=15)
    priority: int = Field(ge=1, le=255)
    sync_address: HostPort
    admin_address: HostPort | None = None
    metrics_address: HostPort | None = None
    # Interface toward the backends for the NAT modes (floating gateway / SNAT address).
    backend_interface: str | None = Field(default=None, min_length=1, max_length=15)


class HealthCheckConfig(_Model):
    type: Literal["tcp", "http", "https", "udp", "exec", "none"] = "tcp"
    interval: Seconds = 1.0
    timeout: Seconds = 0.5
    rise: int = Field(default=2, ge=1, le=100)
    fall: int = Field(default=3, ge=1, le=100)
    path: str = "/"
    expect_status: int = Field(default=200, ge=100, le=599)
    expect_body: str | None = None
    verify_tls: bool = True
    payload: str | None = None
    command: list[str] | None = None
    port: Port | None = None


class BackendConfig(_Model):
    address: IP
    port: Port | None = None
    weight: int = Field(default=1, ge=0, le=10000)
    mac: Mac | None = None


class ServiceConfig(_Model):
    port: Port
    protocol: Protocol = Protocol.TCP
    scheduler: Scheduler = Scheduler.MAGLEV
    forwarding: Forwarding
    ring_size: int = Field(default=65537, ge=7, le=1_000_003)
    backends: list[BackendConfig] = Field(min_length=1)
    sorry_backend: BackendConfig | None = None
    health_check: HealthCheckConfig = HealthCheckConfig()


class VipConfig(_Model):
    address: IP
    services: list[ServiceConfig] = Field(min_length=1)


class AnnounceConfig(_Model):
    """Gratuitous ARP / unsolicited NA: ``count`` rounds ``interval`` apart when a term
    starts, then one round every ``refresh`` seconds for as long as the node holds the
    VIPs (keepalived's garp_master_refresh), so switches and neighbours that missed the
    move (a flap, a healed partition) learn it again; 0 turns the refresh off."""

    count: int = Field(default=3, ge=1, le=100)
    interval: Seconds = 0.2
    refresh: float = Field(default=5.0, ge=0, le=3600)


class NatConfig(_Model):
    """Floating backend-side addresses that move with the VIPs (NAT modes)."""

    gateway: IPInterface | None = None
    snat: IPInterface | None = None


class VipGroupConfig(_Model):
    name: Name
    nodes: list[str] | None = None
    preempt: bool = True
    preempt_delay: float = Field(default=3.0, ge=0)
    announce: AnnounceConfig = AnnounceConfig()
    nat: NatConfig | None = None
    vips: list[VipConfig] = Field(min_length=1)


class DampingConfig(_Model):
    """A backend whose verdict changes more than ``max_changes`` times within ``window``
    seconds is held down for ``hold`` seconds (0 changes disables damping)."""

    max_changes: int = Field(default=4, ge=0, le=1000)
    window: Seconds = 60.0
    hold: float = Field(default=120.0, ge=0)


class HealthConfig(_Model):
    damping: DampingConfig = DampingConfig()


class FailoverConfig(_Model):
    """Fast takeover (DESIGN.md "Direction"): the active node heartbeats into etcd every
    ``heartbeat_interval`` seconds and arms its dataplane's dead-man switch on each
    success; a standby that sees no heartbeat for ``heartbeat_timeout`` revokes the
    leader's lease, waits out the fence, and takes over. Unplanned failover then takes
    about twice the timeout instead of the lease TTL. Needs a dataplane with a dead-man
    switch (xdp, nft). ``heartbeat_interval`` unset: 0.1 s with those, off with ipvs; 0:
    off (failover waits for the lease TTL)."""

    heartbeat_interval: float | None = Field(default=None, ge=0, le=10)
    heartbeat_timeout: float = Field(default=0.5, gt=0, le=60)

    def interval_for(self, kind: DataplaneKind) -> float:
        return timing.heartbeat_interval_for(self.heartbeat_interval, kind)

    def fence_wait(self, kind: DataplaneKind) -> float:
        """How long a standby waits after revoking a silent leader's lease
        (halb.timing.fence_wait)."""
        return timing.fence_wait(self.interval_for(kind), self.heartbeat_timeout)


class ServiceTlsConfig(_Model):
    tls: TlsFiles | None = None
    insecure: bool = False


class ClusterConfig(_Model):
    cluster: Name
    etcd: EtcdConfig
    dataplane: DataplaneConfig
    nodes: list[NodeConfig] = Field(min_length=1)
    vip_groups: list[VipGroupConfig] = Field(min_length=1)
    sync: ServiceTlsConfig = ServiceTlsConfig()
    admin: ServiceTlsConfig = ServiceTlsConfig()
    health: HealthConfig = HealthConfig()
    failover: FailoverConfig = FailoverConfig()
    state_dir: str = "/var/lib/halb"

    # -- lookups used by the agent and planning -----------------------------------------

    def timings(self, rank: int = 0) -> timing.Timings:
        """Every derived interval for a node of priority ``rank`` (0 = the best) in a
        group: halb.timing owns the derivation and its safety argument."""
        return timing.derive(
            lease_ttl=self.etcd.lease_ttl,
            heartbeat_interval=self.failover.heartbeat_interval,
            heartbeat_timeout=self.failover.heartbeat_timeout,
            kind=self.dataplane.kind,
            rank=rank,
        )

    def node(self, name: str) -> NodeConfig:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"node {name!r} is not defined in nodes")

    def group_nodes(self, group: VipGroupConfig) -> list[NodeConfig]:
        names = group.nodes if group.nodes is not None else [n.name for n in self.nodes]
        return [self.node(n) for n in names]

    def services(self) -> list[Service]:
        """Every virtual service of every group, as the dataplane must hold it."""
        return [svc for g in self.vip_groups for svc in group_services(g)]


def _backend(b: BackendConfig, default_port: int) -> Backend:
    return Backend(address=b.address, port=b.port or default_port, weight=b.weight, mac=b.mac)


def group_services(group: VipGroupConfig) -> list[Service]:
    out: list[Service] = []
    for vip in group.vips:
        for s in vip.services:
            out.append(
                Service(
                    key=ServiceKey(vip.address, s.port, s.protocol),
                    scheduler=s.scheduler,
                    forwarding=s.forwarding,
                    backends=tuple(_backend(b, s.port) for b in s.backends),
                    ring_size=s.ring_size,
                    sorry=(_backend(s.sorry_backend, s.port),) if s.sorry_backend else (),
                )
            )
    return out


# --- errors ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """A config that cannot be used; carries every issue found, each with its path."""

    def __init__(self, issues: Sequence[ConfigIssue], source: str | None = None) -> None:
        self.issues = list(issues)
        self.source = source
        super().__init__("\n".join(str(i) for i in self.issues))


def _path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(err: Any) -> str:
    kind = err["type"]
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "enum":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{err['input']!r} is not one of {expected}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{err['input']!r} is not one of {expected}"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def _from_validation_error(exc: ValidationError) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors(include_url=False):
        issues.append(ConfigIssue(_path(err["loc"]), _message(err)))
    return issues


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


def _semantic(cfg: ClusterConfig) -> Iterator[ConfigIssue]:
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


# --- loading --------------------------------------------------------------------------


def parse_config(data: Any, source: str | None = None) -> ClusterConfig:
    """Validate a parsed document; raise ConfigError listing every issue."""
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigIssue("", "the config must be a YAML mapping at the top level")], source
        )
    try:
        cfg = ClusterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_from_validation_error(exc), source) from None
    issues = list(_semantic(cfg))
    if issues:
        raise ConfigError(issues, source)
    return cfg


def parse_config_text(text: str, source: str | None = None) -> ClusterConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"line {mark.line + 1}, column {mark.column + 1}: "
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            [ConfigIssue("", f"{where}YAML syntax error: {problem}")], source
        ) from None
    return parse_config(data, source)


def load_config(path: str | Path) -> ClusterConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read {p}: {exc.strerror}")], str(p)) from None
    return parse_config_text(text, str(p))


def dump_config(cfg: ClusterConfig) -> str:
    """Serialise to YAML that parse_config_text accepts (used by the lab and etcd store)."""
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    return yaml.safe_dump(data, sort_keys=False)
