"""`halb agent`: one process per balancer node.

It loads and validates the config (the cluster's revision in etcd wins over the local
file once one is stored), programs the dataplane with every service (standbys are hot:
same services, same rings), runs one GroupRuntime per VIP group this node belongs to
(election, VIP ownership, announcements, sync roles), publishes its status document,
and applies config revisions as they are stored.

Signals: SIGTERM / SIGINT hand over (remove VIPs, revoke the lease: a standby takes
over in milliseconds) and exit; SIGHUP re-reads the config file and stores it in etcd
so every agent applies the same revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from halb.agent import etcdio, sdnotify
from halb.agent.causes import ObservedMachine, change_cause
from halb.agent.factory import make_dataplane
from halb.agent.floating import FloatingVips
from halb.agent.health import HealthRole, TermRoles
from halb.agent.linkwatch import watch_link
from halb.agent.metrics import AgentMetrics
from halb.agent.status import GroupStatus, NodeStatus
from halb.agent.statuspub import publish_status
from halb.agent.syncroles import (
    AgentSyncRoles,
    SyncFactory,
    sync_close,
    sync_stats,
    sync_update_config,
    tune_gc,
)
from halb.agent.vmacport import VirtualMacVips
from halb.agent.witness import PeerWitness
from halb.aio import within
from halb.checks.view import HealthView
from halb.config import (
    ClusterConfig,
    ConfigError,
    NodeConfig,
    VipGroupConfig,
    load_config,
    parse_config_text,
)
from halb.dataplane.base import ApplyResult, Dataplane
from halb.etcd import EtcdClient, EtcdError
from halb.ha.coord import Coordinator
from halb.ha.deadline import DeadlineMux
from halb.ha.machine import (
    Drain,
    Event,
    LeaderObserved,
    Machine,
    MachineConfig,
    PromiseGiven,
    State,
    Undrain,
)
from halb.ha.runtime import GroupRuntime, SyncRoles, VipPort
from halb.keys import GroupKeys
from halb.net.vip import InterfaceVips
from halb.sync.promise import PromiseClient

__all__ = ["Agent", "AgentError"]

log = logging.getLogger("halb.agent")


class AgentError(RuntimeError):
    """A reason the agent cannot start, already worded for the operator."""


@dataclass
class _Group:
    cfg: VipGroupConfig
    runtime: GroupRuntime
    status: GroupStatus
    previous_leader: str | None = None
    # The drain key's state, apart from a drain the agent applies itself (link down).
    operator_drained: bool = False


class Agent:
    def __init__(
        self,
        config_path: Path,
        node: str,
        sync: SyncRoles | None = None,
        *,
        sync_factory: SyncFactory | None = None,
    ) -> None:
        """sync_factory builds the sync roles once the config and dataplane are known
        (halb.agent.syncroles.make_sync_roles); neither given: no flow sync."""
        self.config_path = config_path
        self.node_name = node
        self.sync = sync
        self.sync_factory = sync_factory
        self.cfg: ClusterConfig | None = None
        self.node: NodeConfig | None = None
        self.config_revision = 0
        self.rejected_configs = 0
        self.dataplane: Dataplane | None = None
        self.groups: dict[str, _Group] = {}
        self.started = time.time()
        self.last_failover: dict[str, Any] | None = None
        self.health: HealthRole | None = None
        self.etcd: EtcdClient | None = None
        self.metrics = AgentMetrics(node)
        self.link_down = False
        # The peer-witnessed hold (failover.coordinator_outage: hold): the peer side
        # answering Promise calls and the holder side's channel to the peers.
        self.witness: PeerWitness | None = None
        self.promise_client: PromiseClient | None = None
        self._status_dirty = asyncio.Event()
        self._stop = asyncio.Event()
        # Config reloads and health views both reprogram the dataplane: one at a time.
        self._apply_lock = asyncio.Lock()

    # -- start-up ------------------------------------------------------------------------

    def _load_local(self) -> ClusterConfig:
        cfg = load_config(self.config_path)
        self._node_of(cfg)
        return cfg

    def _validated(self, text: str, source: str) -> ClusterConfig:
        """A config this agent can run: valid, and naming this node."""
        cfg = parse_config_text(text, source)
        self._node_of(cfg)
        return cfg

    def _node_of(self, cfg: ClusterConfig) -> NodeConfig:
        try:
            return cfg.node(self.node_name)
        except KeyError:
            raise AgentError(
                f"node {self.node_name!r} is not defined in the config's nodes "
                f"({', '.join(n.name for n in cfg.nodes)})"
            ) from None

    async def _stored_config(self, client: EtcdClient, cfg: ClusterConfig) -> None:
        """Adopt the cluster's stored config revision if there is a valid one."""
        try:
            stored = await within(
                etcdio.read_config(client, etcdio.keys_of(cfg)), cfg.etcd.dial_timeout
            )
        except (TimeoutError, EtcdError, OSError) as exc:
            log.warning(
                "cannot read the stored config from etcd (%s); using %s", exc, self.config_path
            )
            return
        if stored is None:
            log.info("no config stored in etcd yet; using %s", self.config_path)
            return
        try:
            new = self._validated(stored.text, "etcd")
        except (ConfigError, AgentError) as exc:
            self.rejected_configs += 1
            log.error(
                "stored config revision %d rejected, using %s: %s",
                stored.revision,
                self.config_path,
                exc,
            )
            return
        log.info("using cluster config revision %d from etcd", stored.revision)
        self.cfg, self.config_revision = new, stored.revision

    # -- status --------------------------------------------------------------------------

    def _on_change(self, group: str, old: State, new: State, ev: Event, m: Machine) -> None:
        g = self.groups.get(group)
        if g is None:
            return
        before = m.before if isinstance(m, ObservedMachine) else m.st
        down = self.node.interface if self.link_down and self.node is not None else None
        cause = change_cause(ev, old, new, before, down)
        g.status.state = new.value
        g.status.term = str(m.st.term) if m.st.term else None
        g.status.since = time.time()
        g.status.cause = cause
        leader = m.st.leader
        if new is State.ACTIVE and old is not State.ACTIVE:
            self.last_failover = {
                "time": time.time(),
                "group": group,
                "from": g.previous_leader,
                "to": self.node_name,
                "cause": cause,
            }
        if leader is not None:
            g.status.leader = leader.holder
            if leader.holder != self.node_name:
                g.previous_leader = leader.holder
        elif new is State.ACTIVE:
            g.status.leader = self.node_name
        self.metrics.record_transition(group, old.value, new.value, cause)
        self.metrics.update_group(group, new.value, m.st.term, g.status.leader)
        log.info("group %s: %s -> %s: %s", group, old.value, new.value, cause)
        self._status_dirty.set()

    def _from_coord(self, group: str, ev: Event) -> None:
        """Coordinator events, with the operator's drain combined with the link's."""
        g = self.groups.get(group)
        if g is None:
            return
        if isinstance(ev, Drain):
            g.operator_drained = True
        elif isinstance(ev, Undrain):
            g.operator_drained = False
            if self.link_down:
                return  # still drained: the interface is down
        g.runtime.emit(ev)

    def _on_link(self, up: bool) -> None:
        self.link_down = not up
        for g in self.groups.values():
            if not up:
                g.runtime.emit(Drain())
            elif not g.operator_drained:
                g.runtime.emit(Undrain())

    def _status(self) -> NodeStatus:
        assert self.cfg is not None
        for name, g in self.groups.items():
            g.status.vips = [str(v.address) for v in g.cfg.vips]
            if g.runtime.hold is not None:
                g.status.hold = {
                    **g.runtime.hold_status.doc(),
                    **(self.witness.doc(name) if self.witness is not None else {}),
                }
        return NodeStatus(
            node=self.node_name,
            pid=os.getpid(),
            started=self.started,
            dataplane=self.cfg.dataplane.kind.value,
            config_revision=self.config_revision,
            groups={name: g.status for name, g in self.groups.items()},
            last_failover=self.last_failover,
            sync={**sync_stats(self.sync), "rejected_configs": self.rejected_configs},
            etcd=self.etcd.report() if self.etcd is not None else {},
            updated=time.time(),
        )

    async def _publish_status(self, client: EtcdClient) -> None:
        assert self.cfg is not None
        await publish_status(
            client,
            etcdio.keys_of(self.cfg).status(self.node_name),
            self.cfg.timings().status_ttl,
            lambda: self._status().to_json(),
            self._status_dirty,
        )

    # -- config reload -------------------------------------------------------------------

    async def _follow_config(self, client: EtcdClient) -> None:
        assert self.cfg is not None
        async for stored in etcdio.watch_config(client, etcdio.keys_of(self.cfg)):
            if stored.revision <= self.config_revision:
                continue
            try:
                new = self._validated(stored.text, "etcd")
            except (ConfigError, AgentError) as exc:
                self.rejected_configs += 1
                log.error(
                    "config revision %d rejected, keeping revision %d: %s",
                    stored.revision,
                    self.config_revision,
                    exc,
                )
                self._status_dirty.set()
                continue
            await self._apply_config(new, stored.revision)

    async def _apply_config(self, new: ClusterConfig, revision: int) -> None:
        old = self.cfg
        assert old is not None and self.dataplane is not None
        # Flow timeouts apply at once (a config entry the program reads per packet).
        timeouts = new.dataplane.flow_timeouts
        set_timeouts = getattr(self.dataplane, "set_flow_timeouts", None)
        if old.dataplane.flow_timeouts != timeouts and set_timeouts is not None:
            await asyncio.to_thread(set_timeouts, timeouts.model())
        same_dp = old.dataplane.model_copy(update={"flow_timeouts": timeouts})
        if (old.etcd, same_dp, old.cluster) != (new.etcd, new.dataplane, new.cluster):
            log.warning(
                "config revision %d changes etcd, dataplane or cluster settings: "
                "they take effect when the agent restarts",
                revision,
            )
        # From here on every reprogramming (a health view arriving too) uses the new
        # config; the revision is reported once everything below is done.
        self.cfg = new
        if self.health is not None:
            await self.health.reconfigure(new)
        result = await self._program(new)
        sync_update_config(self.sync, new)  # flows to new backends are accepted from now
        log.info(
            "config revision %d applied: %d services added, %d removed, %d updated, "
            "%d dataplane writes",
            revision,
            len(result.added),
            len(result.removed),
            len(result.updated),
            result.writes,
        )
        for gcfg in new.vip_groups:
            g = self.groups.get(gcfg.name)
            if g is None:
                continue
            old_vips = [v.address for v in g.cfg.vips]
            new_vips = [v.address for v in gcfg.vips]
            g.cfg = gcfg
            if old_vips != new_vips:
                await g.runtime.set_addresses(new_vips)
            self._update_election(g)
        self.config_revision = revision
        self._status_dirty.set()

    def _update_election(self, g: _Group) -> None:
        """Preemption settings and announce cadence take effect at once."""
        rt = g.runtime
        mc = rt.machine.cfg
        new = replace(mc, preempt=g.cfg.preempt, preempt_delay=g.cfg.preempt_delay)
        rt.announce_count = g.cfg.announce.count
        rt.announce_interval = g.cfg.announce.interval
        rt.announce_refresh = g.cfg.announce.refresh
        if new != mc:
            rt.machine.cfg = new
            log.info(
                "group %s: preempt=%s preempt_delay=%gs", g.cfg.name, new.preempt, new.preempt_delay
            )
            # Re-present the current leader so a standby re-decides whether to preempt.
            rt.emit(LeaderObserved(rt.machine.st.leader))

    async def _reload_file(self, client: EtcdClient) -> None:
        """SIGHUP: validate the file and store it, so every agent applies it."""
        try:
            text = self.config_path.read_text()
            new = self._validated(text, str(self.config_path))
        except (OSError, ConfigError, AgentError) as exc:
            self.rejected_configs += 1
            log.error("SIGHUP: %s rejected, the running config stays: %s", self.config_path, exc)
            return
        try:
            rev = await etcdio.publish_config(client, new, text)
            log.info("SIGHUP: stored %s as config revision %d", self.config_path, rev)
        except (TimeoutError, EtcdError, OSError) as exc:
            log.error("SIGHUP: cannot store the config in etcd (%s); applying locally", exc)
            await self._apply_config(new, self.config_revision)

    # -- main ----------------------------------------------------------------------------

    def _make_group(
        self, g: VipGroupConfig, port: VipPort, client: EtcdClient, deadlines: DeadlineMux
    ) -> _Group:
        cfg, node = self.cfg, self.node
        assert cfg is not None and node is not None
        members = sorted(cfg.group_nodes(g), key=lambda n: -n.priority)
        rank = [n.name for n in members].index(node.name)
        keys = GroupKeys(cfg.etcd.prefix, cfg.cluster, g.name)
        # Lower-priority nodes campaign and judge heartbeats a little later, so the
        # best standby usually acts alone (halb.timing).
        timings = cfg.timings(rank)
        status = GroupStatus()
        machine = ObservedMachine(
            MachineConfig(
                node=node.name,
                priority=node.priority,
                preempt=g.preempt,
                preempt_delay=g.preempt_delay,
                campaign_delay=timings.campaign_delay,
                fence_wait=timings.fence_wait,
            ),
            lambda old, new, ev, m: self._on_change(g.name, old, new, ev, m),
        )
        rt = GroupRuntime(
            machine,
            None,
            port,
            addresses=[v.address for v in g.vips],
            announce_count=g.announce.count,
            announce_interval=g.announce.interval,
            announce_refresh=g.announce.refresh,
            # The first group's active node also publishes the cluster's health view.
            sync=(
                TermRoles(self.sync, self.health, keys.leader)
                if self.health is not None and g is cfg.vip_groups[0]
                else self.sync
            ),
            dataplane=deadlines.port(g.name),
            name=g.name,
        )
        coord = Coordinator(
            client,
            keys,
            node.name,
            node.priority,
            ttl=timings.lease.lease_ttl,
            emit=lambda ev: self._from_coord(g.name, ev),
            state_dir=Path(cfg.state_dir) / node.name,
            heartbeat_interval=timings.heartbeat_interval,
            heartbeat_timeout=timings.heartbeat_timeout,
            watchdog_slack=timings.watchdog_slack,
        )
        rt.coord = coord
        rt.lifetime = timings.vip_lifetime
        if timings.hold is not None and self.witness is not None:
            rt.hold = timings.hold
            rt.peers = [n.name for n in members if n.name != node.name]
            rt.promise_port = self.promise_client
            self.witness.add_group(g.name, timings.hold, [n.name for n in members], rt, coord)
            # A restarted node may have promised before it died and forgotten.
            rt.emit(PromiseGiven(timings.hold.promise))
        return _Group(g, rt, status)

    async def _setup_hold(self) -> None:
        """coordinator_outage: hold needs the peer channel (the node's FlowSync server,
        started now so standbys answer Promise calls)."""
        cfg = self.cfg
        assert cfg is not None
        policy = cfg.timings().hold
        if policy is None:
            return
        if not isinstance(self.sync, AgentSyncRoles):
            log.warning("failover.coordinator_outage is hold but flow sync is off: no peer "
                        "channel, so a coordinator outage fences as with fence")  # fmt: skip
            return
        self.witness = PeerWitness()
        self.sync.promises = self.witness
        self.promise_client = PromiseClient(
            self.sync.security, {n.name: str(n.sync_address) for n in cfg.nodes}
        )
        await self.sync.start_server()
        log.info("coordinator outage: hold (promise %.2fs, renewed every %.2fs)",
                 policy.promise, policy.renew)  # fmt: skip

    async def run(self) -> None:
        self.cfg = self._load_local()
        client = self.etcd = etcdio.connect(self.cfg, self.node_name)
        try:
            await self._stored_config(client, self.cfg)
            self.node = self._node_of(self.cfg)
            log.info(
                "agent %s starting: cluster %s, dataplane %s on %s, etcd %s",
                self.node_name,
                self.cfg.cluster,
                self.cfg.dataplane.kind.value,
                self.node.interface,
                ", ".join(self.cfg.etcd.endpoints),
            )
            (Path(self.cfg.state_dir) / self.node.name).mkdir(parents=True, exist_ok=True)
            self.dataplane = await asyncio.to_thread(make_dataplane, self.cfg, self.node)
            try:
                result = await asyncio.to_thread(self.dataplane.apply, self.cfg.services())
                log.info(
                    "dataplane %s programmed: %d services, %d writes",
                    self.dataplane.name,
                    len(result.added),
                    result.writes,
                )
                if self.sync is None and self.sync_factory is not None:
                    self.sync = self.sync_factory(self.cfg, self.node_name, self.dataplane)
                tune_gc()
                self.health = HealthRole(self.cfg, self.node_name, client, self._on_view)
                await self.health.seed()
                if self.health.view is not None:
                    await self._program(self.cfg)
                await self._setup_hold()
                await self._run_groups(client)
            finally:
                if self.promise_client is not None:
                    await self.promise_client.close()
                await sync_close(self.sync)
                await asyncio.to_thread(self.dataplane.close)
        finally:
            await client.close()
        log.info("agent %s stopped", self.node_name)

    async def _run_groups(self, client: EtcdClient) -> None:
        cfg, node, dp = self.cfg, self.node, self.dataplane
        assert cfg is not None and node is not None and dp is not None
        loop = asyncio.get_running_loop()
        hup = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, hup.set)
        mine = [g for g in cfg.vip_groups if node.name in {n.name for n in cfg.group_nodes(g)}]
        async with (
            InterfaceVips(node.interface) as port,
            # Groups with a virtual MAC hold their VIPs on their own macvlan.
            VirtualMacVips.for_node(port, node.interface, lambda: self.cfg) as vmacs,
            # NAT modes: the groups' floating addresses follow their VIPs.
            FloatingVips.for_node(vmacs, node, lambda: self.cfg) as vips,
        ):
            # One dead-man switch in the dataplane, shared by the groups' terms.
            deadlines = DeadlineMux(dp)
            for g in mine:
                self.groups[g.name] = self._make_group(g, vips, client, deadlines)
            await self._reconcile(port, vmacs)
            async with asyncio.TaskGroup() as tg:
                runs = [
                    tg.create_task(g.runtime.run(), name=f"group-{name}")
                    for name, g in self.groups.items()
                ]
                aux = [
                    tg.create_task(self._publish_status(client), name="status"),
                    tg.create_task(self._run_health(), name="health"),
                    tg.create_task(watch_link(node.interface, self._on_link), name="link"),
                    tg.create_task(self._feed_metrics(), name="metrics"),
                    tg.create_task(self._follow_config(client), name="config"),
                    tg.create_task(self._on_hup(hup, client), name="sighup"),
                    tg.create_task(sdnotify.serve(self._joined), name="systemd"),
                ]
                await self._stop.wait()
                log.info("stopping: handing over every group this node holds")
                for grp in self.groups.values():
                    await grp.runtime.stop(handoff=True)
                await asyncio.wait(runs)
                for t in aux:
                    t.cancel()
            # Our status goes with us at once rather than at its lease's expiry.
            with contextlib.suppress(TimeoutError, EtcdError, OSError):
                await within(client.delete(etcdio.keys_of(cfg).status(self.node_name)), 1.0)

    def _joined(self) -> bool:
        """Every group knows its place (systemd's READY=1): holds it or follows a leader."""
        waiting = {State.INIT.value, State.CAMPAIGNING.value}
        return all(g.status.state not in waiting for g in self.groups.values())

    async def _program(self, cfg: ClusterConfig) -> ApplyResult:
        """Make the dataplane hold cfg's services under the current health view."""
        assert self.dataplane is not None
        services = self.health.services(cfg) if self.health is not None else cfg.services()
        async with self._apply_lock:
            return await asyncio.to_thread(self.dataplane.apply, services)

    async def _on_view(self, view: HealthView) -> None:
        assert self.cfg is not None
        self.metrics.update_backends(view)
        result = await self._program(self.cfg)
        log.info(
            "health view r%d applied: %d services updated, %d dataplane writes",
            view.revision,
            len(result.updated),
            result.writes,
        )
        self._status_dirty.set()

    async def _feed_metrics(self) -> None:
        """Keep the Prometheus view current; never lets a failure stop the agent."""
        assert self.dataplane is not None and self.cfg is not None and self.node is not None
        self.metrics.cluster, self.metrics.dataplane = self.cfg.cluster, self.dataplane.name
        if self.node.metrics_address:
            try:
                self.metrics.start(self.node.metrics_address)
                log.info("metrics on http://%s/metrics", self.node.metrics_address)
            except OSError as exc:
                log.error("cannot serve metrics on %s: %s", self.node.metrics_address, exc)
        try:
            while True:
                try:
                    stats = sync_stats(self.sync)
                    self.metrics.update_sync(stats)
                    self.metrics.update_config(self.config_revision, self.rejected_configs)
                    for name, st in self._status().groups.items():
                        if st.hold:
                            self.metrics.update_hold(name, st.hold)
                    counters = await asyncio.to_thread(self.dataplane.counters)
                    self.metrics.update_counters(counters)
                    ks = await asyncio.to_thread(self.dataplane.kernel_stats)
                    if ks.events:
                        self.metrics.update_events(ks.events)
                    if ks.conntrack is not None:
                        self.metrics.update_conntrack(ks.conntrack)
                    if isinstance(stats.get("flows"), int):
                        self.metrics.update_flows(stats["flows"])
                except Exception:
                    log.exception("metrics update failed")
                await asyncio.sleep(1.0)
        finally:
            self.metrics.stop()

    async def _run_health(self) -> None:
        assert self.health is not None
        try:
            await self.health.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("backend health stopped; the dataplane keeps its last view")

    async def _on_hup(self, hup: asyncio.Event, client: EtcdClient) -> None:
        while True:
            await hup.wait()
            hup.clear()
            await self._reload_file(client)

    async def _reconcile(self, port: InterfaceVips, vmacs: VirtualMacVips) -> None:
        """Start-up: remove configured VIPs this node has no term for (left by a crash),
        and the virtual-MAC links that held them. A group whose lease may be resumed
        keeps them: if the lease is alive the term continues without a gap; if not,
        their kernel lifetime withdraws them."""
        for name, g in self.groups.items():
            coord = g.runtime.coord
            lease_file = coord.lease_file if isinstance(coord, Coordinator) else None
            if lease_file is not None and lease_file.exists():
                log.info("group %s: a stored lease may be resumed; VIPs left in place", name)
                continue
            removed = await port.addresses.reconcile([v.address for v in g.cfg.vips])
            for vip in removed:
                log.warning("group %s: removed VIP %s left without a term (crash?)", name, vip)
            if g.cfg.virtual_mac is not None:
                for ifname in await vmacs.reconcile([g.cfg.virtual_mac]):
                    log.warning("group %s: removed %s left without a term (crash?)", name, ifname)
