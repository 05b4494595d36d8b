"""The nft dataplane: nftables NAT rules + nf_conntrack flow state.

    dp = NftDataplane.from_config(cfg)            # or NftDataplane(snat={vip: addr})
    dp.apply(cfg.services())                      # atomic: in place or a table swap
    dp.install_flows(flows)                       # standby: synced flows -> conntrack
    async for delta in dp.flow_events(): ...      # active: conntrack events -> deltas

One table owned by halb is rendered whole (halb.dataplane.nft.ruleset) and loaded with
one `nft -f` at start and when its layout changes; backend, weight and health changes
rewrite only what changed (halb.dataplane.nft.delta) in one transaction: a raw
nf_tables batch when only ring slots move (halb.dataplane.nft.nfnl), else libnftables.
Either way the kernel applies it completely or not at all. `netns` runs everything
in a named network namespace (tests, the lab); the agent leaves it None.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence

from halb.config import ClusterConfig, NodeConfig
from halb.dataplane.base import ApplyResult, Counter, Counters, FlowObjectRecords, KernelStats
from halb.dataplane.nft import delta, nftcmd, ruleset
from halb.dataplane.nft.conntrack import Conntrack, InstallReport, ReconcileReport, Timeouts
from halb.dataplane.nft.ctstats import TableStats, read_table_stats
from halb.dataplane.nft.events import FlowEvents
from halb.dataplane.nft.fence import NftFence
from halb.dataplane.nft.flows import FlowEntry, FlowMap
from halb.dataplane.nft.libnft import Nft
from halb.dataplane.nft.netns import read_sysctl, write_sysctl
from halb.dataplane.nft.nfnl import NfTables
from halb.dataplane.nft.source import NftFlowSource
from halb.model import Backend, Flow, IPAddress, Service, ServiceKey

log = logging.getLogger(__name__)

__all__ = ["NftDataplane", "snat_addresses"]

TCP_LOOSE = "net.netfilter.nf_conntrack_tcp_loose"
# A balancer forwards: without this nothing reaches a backend. Strict reverse-path
# filtering drops client packets whose route back leaves by another interface (common
# on multi-homed balancers); loose mode (2) keeps the spoofing check without that.
COUNTER_MIN_INTERVAL = 1.0  # seconds
FORWARD4 = "net.ipv4.ip_forward"
FORWARD6 = "net.ipv6.conf.all.forwarding"
RP_FILTER = "net.ipv4.conf.all.rp_filter"
# Conntrack events feed the flow source: 0 (off) is turned on; 2 (on while someone
# listens) is fine as it is.
CT_EVENTS = "net.netfilter.nf_conntrack_events"


def snat_addresses(cfg: ClusterConfig) -> dict[IPAddress, IPAddress]:
    """VIP -> its group's floating SNAT address (fullnat), from the config."""
    out: dict[IPAddress, IPAddress] = {}
    for g in cfg.vip_groups:
        if g.nat is not None and g.nat.snat is not None:
            for vip in g.vips:
                out[vip.address] = g.nat.snat.ip
    return out


class NftDataplane(FlowObjectRecords):
    """halb.dataplane.base.Dataplane on nftables + conntrack. Blocking; one caller at a
    time (the agent calls it from a worker thread)."""

    name = "nft"

    def __init__(
        self,
        snat: Mapping[IPAddress, IPAddress] | None = None,
        *,
        netns: str | None = None,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.netns = netns
        self.snat: dict[IPAddress, IPAddress] = dict(snat or {})
        self.services: dict[ServiceKey, Service] = {}
        self.flowmap = FlowMap((), self.snat)
        self._nft: Nft | None = None  # in-process libnftables for in-place updates
        self._nfnl_sock: NfTables | None = None  # raw batches for ring-only updates
        self._rendered: ruleset.Rendered | None = None
        self._counter_cache: tuple[float, dict[str, Counter]] | None = None  # (until, values)
        self.conntrack = Conntrack(netns, timeouts)
        # The agent reaches the conntrack socket from several worker threads (sync
        # snapshots, the flow source's reconcile, a sync client's installs): a second
        # dump on a socket with one in flight fails with EBUSY.
        self._ct_lock = threading.Lock()
        self.last_install = InstallReport()
        # The dead-man switch: tables of its own, so table reloads never reset it.
        self.fence = NftFence(netns)

    @classmethod
    def from_config(
        cls,
        cfg: ClusterConfig,
        node: NodeConfig | None = None,
        *,
        netns: str | None = None,
        timeouts: Timeouts | None = None,
    ) -> NftDataplane:
        """The adapter for a node. The floating gateway and SNAT addresses themselves
        are added by the HA runtime on ``node.backend_interface``; the rules only need
        the SNAT address of each VIP."""
        if node is not None and node.backend_interface is None:
            log.warning("node %s has no backend_interface; NAT modes need one", node.name)
        return cls(snat_addresses(cfg), netns=netns, timeouts=timeouts)

    # -- rules --------------------------------------------------------------------------

    def apply(self, services: Sequence[Service]) -> ApplyResult:
        """Make halb's table hold exactly ``services``: in place (one transaction of
        just the changed ring slots, chains, counters and elements) while the layout
        stays, else by replacing the whole table.

        Raises RenderError (before touching the kernel) or NftError (the kernel kept the
        previous rules) and leaves this object's view unchanged in both cases.
        """
        new = {s.key: s for s in services}
        old = self.services
        added = tuple(sorted((k for k in new if k not in old), key=str))
        removed = tuple(sorted((k for k in old if k not in new), key=str))
        updated = tuple(sorted((k for k in new if k in old and old[k] != new[k]), key=str))
        upd = None if self._rendered is None else delta.update(self._rendered, services, self.snat)
        if upd is not None:
            writes = 0
            if not upd.empty:
                t0 = time.monotonic()
                if upd.raw:
                    self._nfnl().update(ruleset.TABLE, upd)
                else:
                    self._libnft().run(upd.script())
                writes = 1
                log.info(
                    "nft table updated in place: %d services changed, %d ring slots, "
                    "%d other commands, %.1f ms",
                    len(updated),
                    upd.slots,
                    len(upd.head) + len(upd.tail),
                    (time.monotonic() - t0) * 1000,
                )
            self._rendered = upd.rendered
            self.services = new
            self.flowmap = FlowMap(services, self.snat)
            return ApplyResult(updated=updated, writes=writes)
        # Replacing the table re-creates its counters: carry their values over (packets
        # counted between this read and the load are lost; a few at most).
        carry = self._nfnl().counters(ruleset.TABLE)
        self._counter_cache = None
        rendered = ruleset.render(services, self.snat, carry)
        nftcmd.load(self.netns, rendered.script)
        self.fence.set_vips(s.key.vip for s in services)
        self._ensure_sysctls(services)
        self._rendered = rendered
        self.services = new
        self.flowmap = FlowMap(services, self.snat)
        log.info(
            "nft table loaded: %d services (added %d, removed %d, updated %d)",
            len(new),
            len(added),
            len(removed),
            len(updated),
        )
        return ApplyResult(added=added, removed=removed, updated=updated, writes=1)

    def _nfnl(self) -> NfTables:
        if self._nfnl_sock is None:
            self._nfnl_sock = NfTables(self.netns)
        return self._nfnl_sock

    def _libnft(self) -> Nft:
        if self._nft is None:
            self._nft = Nft(self.netns)
        return self._nft

    def _ensure_sysctls(self, services: Sequence[Service]) -> None:
        """What a balancer needs from the kernel, set by the adapter itself (never
        only by a lab or an installer)."""
        want = {
            # With loose tracking a mid-flow TCP packet without state would become a new
            # connection to whatever backend the scheduler picks (which answers RST).
            # Strict: it is `ct state invalid`, dropped, and retransmitted until state
            # is synced.
            TCP_LOOSE: "0",
            FORWARD4: "1",
        }
        if any(s.key.vip.version == 6 for s in services):
            want[FORWARD6] = "1"
        for key, value in want.items():
            if read_sysctl(self.netns, key) != value:
                write_sysctl(self.netns, key, value)
                log.info("set %s=%s", key, value)
        if read_sysctl(self.netns, CT_EVENTS) == "0":
            write_sysctl(self.netns, CT_EVENTS, "1")
            log.info("set %s=1: flow sync follows conntrack events", CT_EVENTS)
        if read_sysctl(self.netns, RP_FILTER) == "1":
            write_sysctl(self.netns, RP_FILTER, "2")
            log.info("set %s=2 (loose): strict filtering can drop balanced traffic", RP_FILTER)

    def _counter_values(self) -> dict[str, Counter]:
        """Counter values, re-read at most every COUNTER_MIN_INTERVAL or 10 times the
        last read's cost (a dump of the counter objects: milliseconds; `nft list`
        would fetch the rings too, seconds)."""
        now = time.monotonic()
        cached = self._counter_cache
        if cached is not None and now < cached[0]:
            return cached[1]
        values = self._nfnl().counters(ruleset.TABLE)
        cost = time.monotonic() - now
        self._counter_cache = (now + max(COUNTER_MIN_INTERVAL, 10 * cost), values)
        return values

    def counters(self) -> Counters:
        if self._rendered is None:
            return Counters()
        values = self._counter_values()
        per_service: dict[ServiceKey, Counter] = {}
        per_backend: dict[tuple[ServiceKey, Backend], Counter] = {}
        for name, key in self._rendered.service_counters.items():
            per_service[key] = values.get(name, Counter())
        for name, pair in self._rendered.backend_counters.items():
            per_backend[pair] = values.get(name, Counter())
        return Counters(per_service=per_service, per_backend=per_backend)

    def invalid_dropped(self) -> Counter:
        """Packets dropped as `ct state invalid` (mid-flow without state)."""
        return self._nfnl().counters(ruleset.TABLE).get(ruleset.INVALID_COUNTER, Counter())

    def table_stats(self) -> TableStats:
        """How full the conntrack table is, and what it refused (metrics, `halb
        dataplane show`)."""
        with self._ct_lock:
            return read_table_stats(self.conntrack.sock, self.netns)

    def kernel_stats(self) -> KernelStats:
        return KernelStats(conntrack=self.table_stats().doc())

    def set_deadline(self, monotonic_ns: int | None) -> None:
        """Past ``monotonic_ns`` (CLOCK_MONOTONIC) this node drops VIP traffic and ARP
        requests for the VIPs, whether or not the agent still runs; None disarms."""
        self.fence.set_deadline(monotonic_ns)

    # -- flows --------------------------------------------------------------------------

    def dump_flows(self) -> list[Flow]:
        return [fe.flow for fe in self.dump_entries()]

    def snapshot_records(self) -> bytes:
        """halb.dataplane.base.FlowSnapshot: every current flow, with its source NAT
        port (fullnat) so the standby binds the same one."""
        with self._ct_lock:
            return self.conntrack.dump_records(self.flowmap)

    def dump_records(self) -> bytes:
        return self.snapshot_records()

    def install_records(self, recs: bytes) -> int:
        """Install records with their source NAT ports (see install_flows), their
        create messages built in bulk."""
        with self._ct_lock:
            self.last_install = self.conntrack.install_records(recs, self.flowmap)
        return self.last_install.written

    def dump_entries(self) -> list[FlowEntry]:
        """Flows with their fullnat SNAT binding (address and port)."""
        with self._ct_lock:
            return self.conntrack.dump(self.flowmap)

    def install_flows(self, flows: Iterable[Flow | FlowEntry]) -> int:
        """Create conntrack entries for flows learned from a peer; flows whose service
        or backend this node does not hold, or that the kernel refuses, are counted in
        ``last_install.refused`` and skipped. Returns how many entries were written."""
        with self._ct_lock:
            self.last_install = self.conntrack.install(flows, self.flowmap)
        return self.last_install.written

    def delete_flows(self, flows: Iterable[Flow]) -> int:
        with self._ct_lock:
            return self.conntrack.delete(flows, self.flowmap)

    def reconcile_flows(self, desired: Iterable[Flow | FlowEntry]) -> ReconcileReport:
        """Delete halb flows not in ``desired`` and install the missing ones."""
        with self._ct_lock:
            return self.conntrack.reconcile(desired, self.flowmap)

    def flow_events(self, rcvbuf: int = 64 << 20) -> FlowEvents:
        """Conntrack NEW/UPDATE/DESTROY for halb's services as an async iterator of
        FlowDelta (upsert/delete) and Resync (events were lost: dump in full).

        Subscribe before taking the snapshot (dump_entries) so nothing falls between.
        Events caused by this adapter's own installs and deletes are skipped.
        """
        return FlowEvents(
            self.netns,
            lambda: self.flowmap,
            ignore_portids=frozenset({self.conntrack.portid}),
            rcvbuf=rcvbuf,
        )

    def flow_source(self) -> NftFlowSource:
        """halb.dataplane.base.Dataplane.flow_source: conntrack events plus periodic and
        on-overflow reconciles (halb.dataplane.nft.source)."""
        return NftFlowSource(self)

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Remove halb's table. Conntrack entries stay: they belong to live connections
        and expire by themselves."""
        try:
            nftcmd.load(self.netns, ruleset.delete_script())
            log.info("nft table removed")
        finally:
            self.fence.close()
            self.conntrack.close()
            if self._nft is not None:
                self._nft.close()
                self._nft = None
            if self._nfnl_sock is not None:
                self._nfnl_sock.close()
                self._nfnl_sock = None
            self._rendered = None
            self.services = {}
