"""The config schema: one pydantic model per section, frozen, unknown fields refused."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
)

from halb import timing
from halb.config.types import IP, Endpoint, HostPort, IPInterface, Mac, Model, Name, Port, Seconds
from halb.model import (
    Backend,
    DataplaneKind,
    FlowTimeouts,
    Forwarding,
    Protocol,
    Scheduler,
    Service,
    ServiceKey,
)

__all__ = [
    "AnnounceConfig",
    "BackendConfig",
    "ClusterConfig",
    "DampingConfig",
    "DataplaneConfig",
    "EtcdAuth",
    "EtcdConfig",
    "EtcdTls",
    "FailoverConfig",
    "FlowTimeoutsConfig",
    "HealthCheckConfig",
    "HealthConfig",
    "NatConfig",
    "NodeConfig",
    "ServiceConfig",
    "ServiceTlsConfig",
    "TlsFiles",
    "VipConfig",
    "VipGroupConfig",
    "group_services",
]


# --- schema ---------------------------------------------------------------------------


class TlsFiles(Model):
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


class EtcdTls(Model):
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


class EtcdAuth(Model):
    """etcd user; the password comes from ``password_file`` or HALB_ETCD_PASSWORD
    (never the config itself, which is stored in etcd, nor the command line)."""

    user: str = Field(min_length=1)
    password_file: str | None = Field(default=None, min_length=1)


class EtcdConfig(Model):
    endpoints: list[Endpoint] = Field(min_length=1)
    tls: EtcdTls | None = None
    auth: EtcdAuth | None = None
    lease_ttl: float = Field(default=2.0, description="Leader lease TTL in seconds (>= 1).")
    prefix: str = "/halb"
    # Lab only: the agent never needs it; the CLI uses it to reach a lab etcd.
    dial_timeout: Seconds = 2.0


_WEEK = 7 * 24 * 3600.0
_FLOW_DEFAULTS = FlowTimeouts()


class FlowTimeoutsConfig(Model):
    """Idle timeouts of the xdp dataplane's flows, in seconds (halb.model.FlowTimeouts):
    a flow idle longer is forgotten by the active and, through sync, the standbys."""

    tcp_established: float = Field(default=_FLOW_DEFAULTS.tcp_established, gt=0, le=_WEEK)
    tcp_closing: float = Field(default=_FLOW_DEFAULTS.tcp_closing, gt=0, le=_WEEK)
    udp: float = Field(default=_FLOW_DEFAULTS.udp, gt=0, le=_WEEK)

    def model(self) -> FlowTimeouts:
        return FlowTimeouts(self.tcp_established, self.tcp_closing, self.udp)


class DataplaneConfig(Model):
    kind: DataplaneKind
    xdp_mode: Literal["native", "generic"] = "native"
    flow_timeouts: FlowTimeoutsConfig = FlowTimeoutsConfig()


class NodeConfig(Model):
    name: Name
    address: IPInterface
    interface: str = Field(min_length=1, max_length=15)
    priority: int = Field(ge=1, le=255)
    sync_address: HostPort
    admin_address: HostPort | None = None
    metrics_address: HostPort | None = None
    # Interface toward the backends for the NAT modes (floating gateway / SNAT address).
    backend_interface: str | None = Field(default=None, min_length=1, max_length=15)


class HealthCheckConfig(Model):
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


class BackendConfig(Model):
    address: IP
    port: Port | None = None
    weight: int = Field(default=1, ge=0, le=10000)
    mac: Mac | None = None


class ServiceConfig(Model):
    port: Port
    protocol: Protocol = Protocol.TCP
    scheduler: Scheduler = Scheduler.MAGLEV
    forwarding: Forwarding
    ring_size: int = Field(default=65537, ge=7, le=1_000_003)
    backends: list[BackendConfig] = Field(min_length=1)
    sorry_backend: BackendConfig | None = None
    health_check: HealthCheckConfig = HealthCheckConfig()


class VipConfig(Model):
    address: IP
    services: list[ServiceConfig] = Field(min_length=1)


class AnnounceConfig(Model):
    """Gratuitous ARP / unsolicited NA: ``count`` rounds ``interval`` apart when a term
    starts, then one round every ``refresh`` seconds for as long as the node holds the
    VIPs (keepalived's garp_master_refresh), so switches and neighbours that missed the
    move (a flap, a healed partition) learn it again; 0 turns the refresh off."""

    count: int = Field(default=3, ge=1, le=100)
    interval: Seconds = 0.2
    refresh: float = Field(default=5.0, ge=0, le=3600)


class NatConfig(Model):
    """Floating backend-side addresses that move with the VIPs (NAT modes)."""

    gateway: IPInterface | None = None
    snat: IPInterface | None = None


class VirtualMacConfig(Model):
    """keepalived's ``use_vmac``: the group's VIPs live on a macvlan interface whose MAC,
    ``00:00:5e:00:01:<id>`` (the VRRP virtual router MAC), moves with the term, so the
    clients' ARP / neighbour entries stay valid across a failover and only the switch
    learns the move. Taken at agent start (a change applies when the agents restart)."""

    id: int = Field(ge=1, le=255, description="Virtual router id: the MAC's last byte.")
    interface: str | None = Field(
        default=None,
        min_length=1,
        max_length=15,
        description="The macvlan's name (default halb-vmac<id>).",
    )

    @property
    def ifname(self) -> str:
        return self.interface or f"halb-vmac{self.id}"

    @property
    def mac(self) -> str:
        return f"00:00:5e:00:01:{self.id:02x}"


class VipGroupConfig(Model):
    name: Name
    nodes: list[str] | None = None
    preempt: bool = True
    preempt_delay: float = Field(default=3.0, ge=0)
    announce: AnnounceConfig = AnnounceConfig()
    nat: NatConfig | None = None
    virtual_mac: VirtualMacConfig | None = None
    vips: list[VipConfig] = Field(min_length=1)


class DampingConfig(Model):
    """A backend whose verdict changes more than ``max_changes`` times within ``window``
    seconds is held down for ``hold`` seconds (0 changes disables damping)."""

    max_changes: int = Field(default=4, ge=0, le=1000)
    window: Seconds = 60.0
    hold: float = Field(default=120.0, ge=0)


class HealthConfig(Model):
    damping: DampingConfig = DampingConfig()


class FailoverConfig(Model):
    """Fast takeover (DESIGN.md "Direction"): the active node heartbeats into etcd every
    ``heartbeat_interval`` seconds and arms its dataplane's dead-man switch on each
    success; a standby that sees no heartbeat for ``heartbeat_timeout`` revokes the
    leader's lease, waits out the fence, and takes over. Unplanned failover then takes
    about twice the timeout instead of the lease TTL. Needs a dataplane with a dead-man
    switch (xdp, nft). ``heartbeat_interval`` unset: 0.1 s with those, off with ipvs; 0:
    off (failover waits for the lease TTL)."""

    heartbeat_interval: float | None = Field(default=None, ge=0, le=10)
    heartbeat_timeout: float = Field(default=0.5, gt=0, le=60)
    # When no node reaches etcd: ``hold`` keeps the VIP on the active while every peer
    # promises not to campaign (halb.ha.hold); ``fence`` drops it. Unset: hold on xdp
    # and nft (a dead-man switch fences a frozen holder), fence on ipvs.
    coordinator_outage: Literal["hold", "fence"] | None = None

    def outage_mode_for(self, kind: DataplaneKind) -> str:
        return timing.outage_mode_for(self.coordinator_outage, kind)

    def interval_for(self, kind: DataplaneKind) -> float:
        return timing.heartbeat_interval_for(self.heartbeat_interval, kind)

    def fence_wait(self, kind: DataplaneKind) -> float:
        """How long a standby waits after revoking a silent leader's lease
        (halb.timing.fence_wait)."""
        return timing.fence_wait(self.interval_for(kind), self.heartbeat_timeout)


class ServiceTlsConfig(Model):
    tls: TlsFiles | None = None
    insecure: bool = False


class ClusterConfig(Model):
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
            coordinator_outage=self.failover.coordinator_outage,
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
