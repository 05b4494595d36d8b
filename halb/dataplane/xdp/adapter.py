"""XdpDataplane: the halb.dataplane.base.Dataplane protocol over the XDP balancer.

Holds, per service, its index (service entry, counters, ring region) and its current
ring as backend ids; per (service, backend) pair an id (backend entry, counters). An
apply computes the Maglev tables, then writes only what differs: backend entries first,
then the changed ring slots (batched), then the service entry, so a service becomes
visible only with a complete ring. Removal goes the other way. Backend entries carry
their service's index and tunnel flag (a flow hit reads no service entry). The VIP
addresses go to ``vip_addrs`` (fenced for ARP / ND past the dead-man deadline) and
``vip_filter`` (the program's first test), added before their services, removed after.

Backends with weight 0 drain: no ring slots, but their existing flows continue. When no
backend can take new flows the ring holds the sorry backends, or NO_BACKEND (drop).
Backend MACs come from ``Backend.mac`` or the neighbour table (halb.dataplane.xdp.neigh);
a backend whose MAC cannot be resolved is left out of the ring (and logged) until an
apply resolves it. dsr and tunnel keep the destination port: a backend port that differs
from the service port is only a label.

The state is kept in this process: a restarted agent loads fresh maps (the flows of the
previous instance are lost; Maglev, being identical, still maps most of them alike).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from halb.dataplane.base import ApplyResult, Counter, Counters, KernelStats
from halb.dataplane.xdp import flowrecords
from halb.dataplane.xdp.build import build_bpf
from halb.dataplane.xdp.clock import CLOCK_MONOTONIC_COARSE, calibrate
from halb.dataplane.xdp.expiry import set_timeouts
from halb.dataplane.xdp.flowsource import XdpFlowSource
from halb.dataplane.xdp.layout import (
    BACKEND_F_TUNNEL,
    BACKEND_F_VALID,
    CFG_F_FLOW_EVENTS,
    FAMILY_V4,
    FAMILY_V6,
    NO_BACKEND,
    STATS,
    SVC_F_TUNNEL,
    BackendInfo,
    LbConfig,
    ServiceInfo,
    VipAddr,
    VipKey,
    addr_to_words,
    mac_to_bytes,
)
from halb.dataplane.xdp.layout import Counter as RawCounter
from halb.dataplane.xdp.loader import BpfMap, BpfObject, XdpMode
from halb.dataplane.xdp.neigh import interface_mac, resolve_mac
from halb.flows.records import from_flows, service_backend_key, to_flows
from halb.lb.maglev import build_table, changed_slots
from halb.model import (
    Backend,
    Flow,
    FlowTimeouts,
    Forwarding,
    IPAddress,
    Scheduler,
    Service,
    ServiceKey,
)
from halb.timing import DEADMAN_EARLY_TICKS

__all__ = [
    "PROGRAM",
    "XdpDataplane",
    "XdpDataplaneError",
    "deadline_granularity_ns",
    "default_pin_dir",
]

log = logging.getLogger(__name__)

PROGRAM = "halb_balancer"


# The coarse clock trails CLOCK_MONOTONIC by up to a tick, a little more when the tick
# itself runs late (measured here, a VM at HZ=250: up to 5.1 ms), so set_deadline takes
# halb.timing.DEADMAN_EARLY_TICKS ticks off.


DEFAULT_FLOW_TIMEOUTS = FlowTimeouts()


def deadline_granularity_ns() -> int:
    """Resolution of the program's dead-man clock (CLOCK_MONOTONIC_COARSE): one tick,
    e.g. 4 ms at HZ=250."""
    return max(1, round(time.clock_getres(CLOCK_MONOTONIC_COARSE) * 1e9))


class XdpDataplaneError(ValueError):
    pass


def default_pin_dir(cluster: str, node: str) -> Path:
    """Where the agent of ``node`` pins its maps (and where `halb dataplane show` and
    `halb flows` look). The cluster is part of it: two lab instances on one machine
    both have a node lb1."""
    return Path("/run/halb/bpffs") / cluster / node


def net16(port: int) -> int:
    """A port as the program stores it: network byte order in a native u16."""
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def _family(addr: IPAddress) -> int:
    return FAMILY_V4 if addr.version == 4 else FAMILY_V6


def vip_key(key: ServiceKey) -> VipKey:
    return VipKey(addr_to_words(key.vip), net16(key.port), key.protocol.number, _family(key.vip))


def vip_addr(addr: IPAddress) -> VipAddr:
    return VipAddr(addr_to_words(addr), _family(addr))


@dataclass
class _ServiceState:
    index: int
    service: Service
    info: bytes
    ring: list[int] | None
    ring_inputs: tuple[tuple[tuple[str, int], ...], int] | None = None
    backend_ids: dict[tuple[IPAddress, int], int] = field(default_factory=dict)


class XdpDataplane:
    name = "xdp"

    def __init__(
        self,
        interface: str,
        node_address: IPAddress,
        mode: XdpMode = "native",
        pin_dir: Path | None = None,
        netns: str | None = None,
        *,
        node_address6: IPv6Address | None = None,
        object_path: Path | None = None,
        resolve_timeout: float = 1.0,
        flow_timeouts: FlowTimeouts | None = DEFAULT_FLOW_TIMEOUTS,
    ) -> None:
        """flow_timeouts: idle timeouts of the program's flows (None: never expire)."""
        self.interface = interface
        self.netns = netns
        self.pin_dir = pin_dir
        self.resolve_timeout = resolve_timeout
        self.closed = False
        self._obj = BpfObject(object_path or build_bpf())
        try:
            self._maps = self._obj.maps
            self.max_services = self._maps["stats_service"].max_entries
            self.max_backends = self._maps["backends"].max_entries
            self.ring_stride = self._maps["ring"].max_entries // self.max_services
            self._config = LbConfig(local_mac=tuple(mac_to_bytes(interface_mac(interface, netns))))
            v6 = node_address6
            if isinstance(node_address, IPv4Address):
                self._config.local_v4 = addr_to_words(node_address)[0]
            else:
                v6 = node_address
            if v6 is not None:
                self._config.local_v6 = addr_to_words(v6)
            # The program's clock (jiffies) beside CLOCK_MONOTONIC_COARSE: timeouts and
            # the deadline are converted with it (halb.dataplane.xdp.clock).
            calibrate(self._obj).store(self._config)
            set_timeouts(self._config, flow_timeouts)
            self._maps["config"].update(0, self._config)
            # The config entry is written whole, by set_deadline (the runtime),
            # set_flow_events (a flow source, from a worker thread) and set_flow_timeouts:
            # one at a time, so none writes back a stale copy of another's field.
            self._config_lock = threading.Lock()
            self._event_listeners = 0
            # Bumped before and after every write of a backends row (odd: a write in
            # progress), so a flow source can tell its cached id -> backend table is stale.
            self.backends_generation = 0
            self._services: dict[ServiceKey, _ServiceState] = {}
            self._free_services = list(range(self.max_services - 1, -1, -1))
            self._free_backends = list(range(self.max_backends - 1, -1, -1))
            self._backend_rows: dict[int, bytes] = {}
            self._backend_of: dict[int, tuple[ServiceKey, Backend]] = {}
            self._macs: dict[tuple[IPAddress, bool], str] = {}
            self._vip_addrs: dict[IPAddress, int] = {}  # as written to the vip_addrs map
            self._vip_filter: dict[int, int] = {}  # last address byte -> as written
            self._deadline_slack_ns = DEADMAN_EARLY_TICKS * deadline_granularity_ns()
            if pin_dir is not None:
                self._obj.pin_maps(pin_dir)
            self.mode = self._obj.attach(PROGRAM, interface, mode, netns)
        except BaseException:
            self._teardown()
            raise

    # -- apply ---------------------------------------------------------------------------

    def apply(self, services: Sequence[Service]) -> ApplyResult:
        want: dict[ServiceKey, Service] = {}
        for svc in services:
            self._validate(svc)
            if svc.key in want:
                raise XdpDataplaneError(f"service {svc.key} appears twice")
            want[svc.key] = svc
        new_keys = [k for k in want if k not in self._services]
        if len(self._services) - sum(k not in want for k in self._services) + len(new_keys) > (
            self.max_services
        ):
            raise XdpDataplaneError(f"more than {self.max_services} services")

        # New VIP addresses enter the program's VIP filter before their services, old
        # ones leave after theirs, so no service is ever hidden behind the filter.
        writes = self._sync_vip_addrs([*self._services, *new_keys])
        removed = tuple(k for k in self._services if k not in want)
        for key in removed:
            writes += self._remove_service(key)
        updated: list[ServiceKey] = []
        for key, svc in want.items():
            state = self._services.get(key)
            if state is not None and state.service != svc:
                updated.append(key)
            writes += self._apply_service(svc)
        writes += self._sync_vip_addrs(self._services)
        return ApplyResult(tuple(new_keys), removed, tuple(updated), writes)

    def _validate(self, svc: Service) -> None:
        if svc.scheduler is not Scheduler.MAGLEV:
            raise XdpDataplaneError(f"{svc.key}: the xdp dataplane only schedules with maglev")
        if svc.forwarding not in (Forwarding.DSR, Forwarding.TUNNEL):
            raise XdpDataplaneError(f"{svc.key}: xdp forwards with dsr or tunnel only")
        if svc.ring_size > self.ring_stride:
            raise XdpDataplaneError(
                f"{svc.key}: ring_size {svc.ring_size} exceeds this build's "
                f"HALB_RING_STRIDE {self.ring_stride}"
            )

    def _apply_service(self, svc: Service) -> int:
        tunnel = svc.forwarding is Forwarding.TUNNEL
        state = self._services.get(svc.key)
        if state is None:
            index = self._free_services.pop()
            self._maps["stats_service"].update(index, RawCounter())
            state = _ServiceState(index, svc, b"", None)  # ring None: write every slot
            self._services[svc.key] = state
            writes = 1
        else:
            writes = 0
        state.service = svc

        # Backend entries: one id per (service, address, port); drop the ones that left.
        wanted = {(b.address, b.port): b for b in (*svc.backends, *svc.sorry)}
        for bkey in [k for k in state.backend_ids if k not in wanted]:
            writes += self._free_backend(state.backend_ids.pop(bkey))
        usable: dict[tuple[IPAddress, int], bool] = {}
        for bkey, backend in wanted.items():
            mac = backend.mac or self._mac(backend.address, tunnel)
            bid = state.backend_ids.get(bkey)
            if bid is None:
                if mac is None:
                    usable[bkey] = False
                    continue
                if not self._free_backends:
                    raise XdpDataplaneError(f"more than {self.max_backends} backends")
                bid = self._free_backends.pop()
                state.backend_ids[bkey] = bid
                self._maps["stats_backend"].update(bid, RawCounter())
                writes += 1
            self._backend_of[bid] = (svc.key, backend)
            # The row names its service and forwarding, so a flow hit needs no
            # services lookup; it is rewritten when either changes.
            flags = (BACKEND_F_VALID if mac else 0) | (BACKEND_F_TUNNEL if tunnel else 0)
            row = BackendInfo(
                addr=addr_to_words(backend.address),
                mac=tuple(mac_to_bytes(mac)) if mac else (0,) * 6,
                port=backend.port,
                family=_family(backend.address),
                flags=flags,
                service=state.index,
            )
            usable[bkey] = mac is not None
            if self._backend_rows.get(bid) != bytes(row):
                self._write_backend(bid, row)
                self._backend_rows[bid] = bytes(row)
                writes += 1

        # Ring: regular backends with weight, else the sorry ones.
        def weights(group: Iterable[Backend]) -> dict[str, int]:
            return {str(b): b.weight for b in group if b.weight > 0 and usable[(b.address, b.port)]}

        table_in = weights(svc.backends) or weights(svc.sorry)
        inputs = (tuple(sorted(table_in.items())), svc.ring_size)
        if inputs != state.ring_inputs:
            ids = {str(b): state.backend_ids.get((b.address, b.port)) for b in wanted.values()}
            table = build_table(table_in, svc.ring_size)
            new_ring = [NO_BACKEND if v is None else v for v in table.mapped(ids.__getitem__)]
            changes = changed_slots(state.ring, new_ring)
            if changes:
                base = state.index * self.ring_stride
                self._maps["ring"].update_batch(
                    [base + slot for slot, _ in changes], [v for _, v in changes]
                )
                writes += len(changes)
            state.ring = new_ring
            state.ring_inputs = inputs

        info = bytes(ServiceInfo(state.index, svc.ring_size, SVC_F_TUNNEL if tunnel else 0))
        if info != state.info:
            self._maps["services"].update(vip_key(svc.key), ServiceInfo.from_buffer_copy(info))
            state.info = info
            writes += 1
        return writes

    def _sync_vip_addrs(self, keys: Iterable[ServiceKey]) -> int:
        """Make vip_addrs (the ARP / ND fence's list) hold exactly the VIP addresses of
        ``keys``, each with its number of services, and vip_filter, per last address
        byte, the number of those addresses ending in it."""
        want = Tally(key.vip for key in keys)
        writes = 0
        ends = Tally(addr.packed[-1] for addr in want)
        for byte in set(self._vip_filter) | set(ends):
            if self._vip_filter.get(byte, 0) != ends.get(byte, 0):
                self._maps["vip_filter"].update(byte, ends.get(byte, 0))
                self._vip_filter[byte] = ends.get(byte, 0)
                writes += 1
        for addr in [a for a in self._vip_addrs if a not in want]:
            self._maps["vip_addrs"].delete(vip_addr(addr))
            del self._vip_addrs[addr]
            writes += 1
        for addr, n in want.items():
            if self._vip_addrs.get(addr) != n:
                self._maps["vip_addrs"].update(vip_addr(addr), n)
                self._vip_addrs[addr] = n
                writes += 1
        return writes

    def _mac(self, addr: IPAddress, tunnel: bool) -> str | None:
        mac = self._macs.get((addr, tunnel))
        if mac is None:
            mac = resolve_mac(
                addr, self.interface, self.netns, via_route=tunnel, timeout=self.resolve_timeout
            )
            if mac is None:
                log.warning(
                    "no MAC for backend %s on %s; left out of the ring", addr, self.interface
                )
                return None
            self._macs[(addr, tunnel)] = mac
        return mac

    def _write_backend(self, bid: int, row: BackendInfo) -> None:
        self.backends_generation += 1
        try:
            self._maps["backends"].update(bid, row)
        finally:
            self.backends_generation += 1

    def _remove_service(self, key: ServiceKey) -> int:
        state = self._services.pop(key)
        self._maps["services"].delete(vip_key(key))
        writes = 1
        for bid in state.backend_ids.values():
            writes += self._free_backend(bid)
        self._free_services.append(state.index)
        return writes

    def _free_backend(self, bid: int) -> int:
        """Invalidate the entry and forget its flows, so a reused id inherits none."""
        self._write_backend(bid, BackendInfo())
        self._backend_rows.pop(bid, None)
        self._backend_of.pop(bid, None)
        stale = [k for k, v in self._maps["flows"].items() if v.backend_id == bid]
        self._maps["flows"].delete_batch(stale)
        self._free_backends.append(bid)
        return 1 + len(stale)

    # -- flows -----------------------------------------------------------------------------

    # Flows go through packed records (halb.flows.records) converted in bulk
    # (halb.dataplane.xdp.flowrecords): FlowSync hands records over as they came off the
    # wire, and the Flow methods are the same path with one conversion at the edge.

    def dump_records(self) -> bytes:
        """Every flow whose backend this adapter holds, as packed records."""
        keys, values = flowrecords.read_all(self._maps["flows"])
        table = flowrecords.BackendTable.build(
            {bid: (b.address, b.port) for bid, (_, b) in self._backend_of.items()}
        )
        out, _ = flowrecords.map_to_records(keys, values, table)
        return out

    def record_backend_ids(self) -> dict[bytes, int]:
        """Record bytes [18, 56) (service and backend) -> backend id, for every backend
        this node holds an entry for."""
        return {
            service_backend_key(key.protocol, key.vip, key.port, addr, port): bid
            for key, state in self._services.items()
            for (addr, port), bid in state.backend_ids.items()
            if bid in self._backend_rows
        }

    def install_records(self, records: bytes) -> int:
        """Write flows whose service and backend this node holds; others are skipped."""
        keys, values = flowrecords.records_to_map(records, self.record_backend_ids())
        return flowrecords.update(self._maps["flows"], keys, values)

    def delete_records(self, records: bytes) -> int:
        return flowrecords.delete(self._maps["flows"], flowrecords.records_to_keys(records))

    def dump_flows(self) -> list[Flow]:
        return sorted(to_flows(self.dump_records()))

    def install_flows(self, flows: Iterable[Flow]) -> int:
        """Write flows whose service and backend this node holds; others are skipped."""
        return self.install_records(from_flows(flows))

    def delete_flows(self, flows: Iterable[Flow]) -> int:
        return self.delete_records(from_flows(flows))

    # -- counters and the dead-man switch ---------------------------------------------------

    def counters(self) -> Counters:
        per_service: dict[ServiceKey, Counter] = {}
        per_backend: dict[tuple[ServiceKey, Backend], Counter] = {}
        for key, state in self._services.items():
            per_service[key] = self._sum("stats_service", state.index)
        for bid, owner in self._backend_of.items():
            per_backend[owner] = self._sum("stats_backend", bid)
        return Counters(per_service, per_backend)

    def _sum(self, map_name: str, index: int) -> Counter:
        per_cpu = self._maps[map_name].lookup(index) or []
        return Counter(sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu))

    def flow_source(self) -> XdpFlowSource:
        """halb.dataplane.base.Dataplane.flow_source: ring-buffer creation events plus
        scans of the flow map (halb.dataplane.xdp.flowsource)."""
        return XdpFlowSource.from_dataplane(self)

    def set_deadline(self, monotonic_ns: int | None) -> None:
        """Past ``monotonic_ns`` (CLOCK_MONOTONIC), VIP traffic and ARP / neighbour
        solicitations for VIP addresses drop; None disarms. The program's clock (jiffies)
        moves with the coarse clock, which trails by up to a tick, so two ticks are taken
        off here, and the conversion to jiffies rounds down and takes one more: fencing
        starts at most three ticks (12 ms at HZ=250) before the deadline, and after it
        only if the kernel's tick itself ran more than a tick late."""
        with self._config_lock:
            if monotonic_ns:
                self._config.deadline_ns = max(1, monotonic_ns - self._deadline_slack_ns)
                # Re-read beside the coarse clock each time (one test run, microseconds):
                # the conversion never rests on an old pair.
                clock = calibrate(self._obj)
                clock.store(self._config)
                self._config.deadline_jiffies = clock.deadline(self._config.deadline_ns)
            else:
                self._config.deadline_ns = self._config.deadline_jiffies = 0
            self._maps["config"].update(0, self._config)

    def set_flow_timeouts(self, timeouts: FlowTimeouts | None) -> None:
        """New idle timeouts (None: flows never expire); the program applies them from
        its next packet, the active's flow source from its next scan."""
        with self._config_lock:
            set_timeouts(self._config, timeouts)
            self._maps["config"].update(0, self._config)

    def set_flow_events(self, on: bool) -> None:
        """Arm (on) or release one listener's claim on the flow_events ring buffer: the
        program writes each new flow to it while at least one listener is armed. Only
        the active's flow source listens; a standby's program (hot standby) writes none,
        so nothing fills a ring nobody reads and no event_lost is counted there."""
        if self.closed:  # a source stopping after its dataplane: nothing to disarm
            return
        with self._config_lock:
            self._event_listeners = max(0, self._event_listeners + (1 if on else -1))
            flags = CFG_F_FLOW_EVENTS if self._event_listeners else 0
            if (self._config.flags & CFG_F_FLOW_EVENTS) != flags:
                self._config.flags = (self._config.flags & ~CFG_F_FLOW_EVENTS) | flags
                self._maps["config"].update(0, self._config)

    def flow_events_fd(self) -> int:
        """A new fd of the flow_events ring buffer map; the caller closes it."""
        return os.dup(self._obj.ring_fds["flow_events"])

    def global_stats(self) -> dict[str, int]:
        return {name: self._sum("stats_global", i).packets for i, name in STATS.items()}

    def kernel_stats(self) -> KernelStats:
        return KernelStats(events=self.global_stats())

    def map(self, name: str) -> BpfMap:
        """One of the program's maps (flow source, inspection, tests): the adapter
        keeps owning it, callers must not close it."""
        return self._maps[name]

    @property
    def bpf(self) -> BpfObject:
        """The loaded object (BPF_PROG_TEST_RUN in benchmarks and tests)."""
        return self._obj

    # -- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._teardown()

    def _teardown(self) -> None:
        try:
            self._obj.detach()
        finally:
            self._obj.unpin_maps()
            self._obj.close()
