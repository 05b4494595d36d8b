"""Prometheus metrics of one agent.

The agent feeds snapshots in with the ``update_*`` / ``record_*`` methods (cheap: they
only store values under a lock) and a collector turns the latest snapshot into metric
families on every scrape. Kernel counters and the sync client's totals arrive as
cumulative values, so they are exposed as counters straight from the snapshot, and a
backend or service that leaves the config leaves the output with it (no stale series).

Usage (the agent): ``m = AgentMetrics(node, cluster, dataplane); m.start(address)``,
then ``m.record_transition(...)`` on every state change, ``m.update_sync(stats)``,
``m.update_counters(dp.counters())`` ... periodically. ``render()`` gives the text
exposition (tests, debugging).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from halb import __version__
from halb.checks.view import BackendView, HealthView, split_backend_key
from halb.dataplane.base import Counters

__all__ = ["GROUP_STATES", "SYNC_ROLES", "AgentMetrics", "cause_category", "parse_address"]

GROUP_STATES = ("init", "standby", "campaigning", "active", "fenced", "drained", "stopping")
SYNC_ROLES = ("server", "client", "idle", "disabled")
BACKEND_STATES = ("up", "down", "damped", "draining")

# describe_cause() texts (halb.agent.main) by prefix -> a label of bounded cardinality.
_CAUSES = (
    ("won the election", "election"),
    ("leader key gone", "leader_gone"),
    ("leader is", "leader_observed"),
    ("keepalives or heartbeats to etcd failed", "self_fenced"),
    ("took over from a silent leader", "forced_takeover"),
    ("lease lost", "lease_lost"),
    ("handover to", "handover"),
    ("node drained", "drain"),
    ("node undrained", "undrain"),
    ("agent stopping", "shutdown"),
)


def cause_category(cause: str) -> str:
    """A failover cause as a label: the agent's free text carries node names and terms,
    which must not become label values."""
    for prefix, label in _CAUSES:
        if cause.startswith(prefix):
            return label
    if cause.endswith("timer fired"):
        return "timer"
    return "other"


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address {address!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(slots=True)
class _Group:
    state: str = "init"
    term_revision: int = 0
    leader: str | None = None


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float):
        return float(v)
    return None


class AgentMetrics:
    def __init__(
        self,
        node: str,
        cluster: str = "",
        dataplane: str = "",
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.node, self.cluster, self.dataplane = node, cluster, dataplane
        # A private registry by default: two agents in one process (tests) never clash,
        # and nothing of the process collector's is exported unasked.
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._groups: dict[str, _Group] = {}
        self._failovers: dict[tuple[str, str], int] = {}
        self._term_ends: dict[tuple[str, str], int] = {}
        self._flows: int | None = None
        self._sync: dict[str, Any] = {}
        self._backends: dict[str, BackendView] = {}
        self._counters = Counters()
        self._events: dict[str, int] = {}  # the dataplane's own event counters, by name
        self._config_revision = 0
        self._rejected = 0
        self._hold: dict[str, dict[str, Any]] = {}  # group -> its status document's hold
        self._conntrack: dict[str, Any] = {}  # nft: halb.dataplane.nft.ctstats.TableStats
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.registry.register(self)

    # -- feeding --------------------------------------------------------------------------

    def update_group(
        self, group: str, state: str, term: Any = None, leader: str | None = None
    ) -> None:
        """Current state of a group; ``term`` a halb.model.Term, its text
        (``lease@revision``) or None."""
        rev = getattr(term, "revision", None)
        if rev is None and isinstance(term, str) and "@" in term:
            tail = term.rsplit("@", 1)[1]
            rev = int(tail) if tail.isdigit() else None
        with self._lock:
            g = self._groups.setdefault(group, _Group())
            g.state = str(state)
            g.term_revision = int(rev or 0)
            g.leader = leader

    def record_transition(self, group: str, old: str, new: str, cause: str) -> None:
        """A state change: becoming active counts a failover to this node, leaving
        active counts a term end, both by cause."""
        old, new = str(old), str(new)
        key = (group, cause_category(cause))
        with self._lock:
            self._groups.setdefault(group, _Group()).state = new
            if new == "active" and old != "active":
                self._failovers[key] = self._failovers.get(key, 0) + 1
            elif old == "active" and new != "active":
                self._term_ends[key] = self._term_ends.get(key, 0) + 1

    def update_hold(self, group: str, doc: Mapping[str, Any]) -> None:
        """A group's hold document (halb.ha.holding.HoldStatus + the peer side)."""
        with self._lock:
            self._hold[group] = dict(doc)

    def update_flows(self, flows: int) -> None:
        with self._lock:
            self._flows = flows

    def update_sync(self, stats: Mapping[str, Any]) -> None:
        """The status document's ``sync`` field (halb.agent.syncroles.sync_stats)."""
        with self._lock:
            self._sync = dict(stats)

    def update_backends(self, view: HealthView | Mapping[str, BackendView]) -> None:
        backends = view.backends if isinstance(view, HealthView) else view
        with self._lock:
            self._backends = dict(backends)

    def update_counters(self, counters: Counters) -> None:
        with self._lock:
            self._counters = counters

    def update_events(self, events: Mapping[str, int]) -> None:
        """The dataplane's event counters (XdpDataplane.global_stats: expired and swept
        flows, dropped fragments, relayed ICMP errors, dead-man drops...)."""
        with self._lock:
            self._events = dict(events)

    def update_conntrack(self, stats: Mapping[str, Any]) -> None:
        """The conntrack table's size and refusals (TableStats.doc())."""
        with self._lock:
            self._conntrack = dict(stats)

    def update_config(self, revision: int, rejected: int = 0) -> None:
        with self._lock:
            self._config_revision, self._rejected = revision, rejected

    # -- serving --------------------------------------------------------------------------

    def start(self, address: str) -> None:
        """Serve /metrics on ``host:port`` from a daemon thread."""
        host, port = parse_address(address)
        self._server, self._thread = start_http_server(port, host, registry=self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))

    # -- the collector --------------------------------------------------------------------

    def describe(self) -> list[Metric]:
        return []  # families vary with the snapshot; no up-front description

    def collect(self) -> Iterator[Metric]:
        # Every series carries node and cluster, so dashboards select by them without
        # joining on the scrape's instance label.
        own = {"cluster": self.cluster, "node": self.node}
        for fam in self._families():
            fam.samples = [s._replace(labels={**own, **s.labels}) for s in fam.samples]
            yield fam

    def _families(self) -> Iterator[Metric]:
        with self._lock:
            groups = {
                k: _Group(v.state, v.term_revision, v.leader) for k, v in self._groups.items()
            }
            failovers, term_ends = dict(self._failovers), dict(self._term_ends)
            flows, sync, backends = self._flows, dict(self._sync), dict(self._backends)
            counters, rev, rejected = self._counters, self._config_revision, self._rejected
            events = dict(self._events)
        yield from self._info(rev, rejected)
        yield from self._groups_families(groups, failovers, term_ends)
        if flows is not None:
            f = GaugeMetricFamily("halb_dataplane_flows", "Flows in the dataplane's flow table.")
            f.add_metric([], flows)
            yield f
        yield from self._sync_families(sync)
        yield from self._backend_families(backends)
        yield from self._counter_families(counters)
        if events:
            ev = CounterMetricFamily(
                "halb_dataplane_events",
                "Dataplane events by kind (xdp: stats_global, e.g. flow_expired, flow_swept, "
                "frag_drop, icmp_relayed, deadline_drop).",
                labels=["event"],
            )
            for name, n in sorted(events.items()):
                ev.add_metric([name], n)
            yield ev
        with self._lock:
            hold = {k: dict(v) for k, v in self._hold.items()}
            conntrack = dict(self._conntrack)
        yield from self._hold_families(hold)
        yield from self._conntrack_families(conntrack)

    def _conntrack_families(self, ct: dict[str, Any]) -> Iterator[Metric]:
        # A table near its max drops new connections and refuses synced ones: alert on
        # entries / max and on any increase of the three counters.
        gauges = (
            ("count", "halb_conntrack_entries", "Entries in the conntrack table."),
            ("max", "halb_conntrack_max", "nf_conntrack_max: entries the table may hold."),
            ("buckets", "halb_conntrack_buckets", "nf_conntrack_buckets: hash table size."),
        )
        counters = (
            ("insert_failed", "halb_conntrack_insert_failed",
             "Entries the kernel could not insert (synced ones included)."),
            ("drop", "halb_conntrack_drop", "New connections dropped: the table was full."),
            ("early_drop", "halb_conntrack_early_drop",
             "Unassured entries evicted to make room in a full table."),
        )  # fmt: skip
        for key, name, doc in gauges:
            if isinstance(ct.get(key), int):
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], ct[key])
                yield g
        for key, name, doc in counters:
            if isinstance(ct.get(key), int):
                c = CounterMetricFamily(name, doc)
                c.add_metric([], ct[key])
                yield c

    def _hold_families(self, hold: dict[str, dict[str, Any]]) -> Iterator[Metric]:
        if not hold:
            return
        holding = GaugeMetricFamily(
            "halb_hold_active",
            "1 while this node holds the group's VIPs on its peers' promises (etcd silent).",
            labels=["group"],
        )
        promises = GaugeMetricFamily(
            "halb_hold_promises", "Peers' promises this node holds.", labels=["group"]
        )
        expiry = GaugeMetricFamily(
            "halb_hold_expiry_seconds",
            "Seconds left of the hold (0: not holding).",
            labels=["group"],
        )
        bound = GaugeMetricFamily(
            "halb_promise_bound_seconds",
            "Seconds this node is still bound by promises it gave (no campaign).",
            labels=["group"],
        )
        answers = CounterMetricFamily(
            "halb_promise_answers",
            "Promise requests answered, by outcome (granted or the refusal reason).",
            labels=["group", "outcome"],
        )
        for group, d in sorted(hold.items()):
            holding.add_metric([group], 1 if d.get("holding") else 0)
            promises.add_metric([group], len(d.get("promises") or {}))
            expiry.add_metric([group], float(d.get("hold_left") or 0.0))
            bound.add_metric([group], float(d.get("bound_for") or 0.0))
            answers.add_metric([group, "granted"], int(d.get("granted") or 0))
            for reason, n in sorted((d.get("refused") or {}).items()):
                answers.add_metric([group, reason], int(n))
        yield from (holding, promises, expiry, bound, answers)

    def _info(self, rev: int, rejected: int) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "halb_agent_info",
            "Agent identity (always 1).",
            labels=["node", "cluster", "dataplane", "version"],
        )
        info.add_metric([self.node, self.cluster, self.dataplane, __version__], 1)
        yield info
        r = GaugeMetricFamily("halb_config_revision", "Cluster config revision applied.")
        r.add_metric([], rev)
        yield r
        c = CounterMetricFamily("halb_config_rejected", "Config revisions rejected as invalid.")
        c.add_metric([], rejected)
        yield c

    def _groups_families(
        self,
        groups: dict[str, _Group],
        failovers: dict[tuple[str, str], int],
        term_ends: dict[tuple[str, str], int],
    ) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "halb_group_state", "1 for the group's current state.", labels=["group", "state"]
        )
        active = GaugeMetricFamily(
            "halb_group_active", "1 when this node holds the group.", labels=["group"]
        )
        term = GaugeMetricFamily(
            "halb_group_term_revision",
            "Create revision of the current leader key (0: none).",
            labels=["group"],
        )
        for name, g in sorted(groups.items()):
            for s in GROUP_STATES:
                state.add_metric([name, s], 1 if g.state == s else 0)
            active.add_metric([name], 1 if g.state == "active" else 0)
            term.add_metric([name], g.term_revision)
        yield from (state, active, term)
        fo = CounterMetricFamily(
            "halb_failovers", "Times this node became active, by cause.", labels=["group", "cause"]
        )
        for (group, cause), n in sorted(failovers.items()):
            fo.add_metric([group, cause], n)
        yield fo
        te = CounterMetricFamily(
            "halb_term_ends",
            "Times this node stopped being active, by cause.",
            labels=["group", "cause"],
        )
        for (group, cause), n in sorted(term_ends.items()):
            te.add_metric([group, cause], n)
        yield te

    def _sync_families(self, sync: dict[str, Any]) -> Iterator[Metric]:
        if not sync:
            return
        role = GaugeMetricFamily(
            "halb_sync_role", "1 for this node's flow-sync role.", labels=["role"]
        )
        current = str(sync.get("role", "idle"))
        for r in SYNC_ROLES:
            role.add_metric([r], 1 if current == r else 0)
        yield role
        gauges = (
            ("connected_peers", "halb_sync_peers", "Connected sync peers.", 1.0),
            ("flows", "halb_sync_entries", "Flows known to the sync role.", 1.0),
            ("lag_sequence", "halb_sync_lag_entries", "Entries published but not applied.", 1.0),
            ("lag_ms", "halb_sync_lag_seconds", "Worst peer's replication lag.", 1e-3),
            ("synced", "halb_sync_synced", "1 when a standby holds a full snapshot.", 1.0),
        )
        for key, name, doc, scale in gauges:
            v = _num(sync.get(key))
            if v is not None:
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], v * scale)
                yield g
        counters = (
            ("entries_synced", "halb_sync_entries_synced", "Entries published or installed."),
            ("dropped", "halb_sync_dropped", "Entries refused or dropped."),
        )
        for key, name, doc in counters:
            v = _num(sync.get(key))
            if v is not None:
                c = CounterMetricFamily(name, doc)
                c.add_metric([], v)
                yield c

    def _backend_families(self, backends: dict[str, BackendView]) -> Iterator[Metric]:
        if not backends:
            return
        st = GaugeMetricFamily(
            "halb_backend_state",
            "1 for the backend's state in the view.",
            labels=["service", "backend", "state"],
        )
        w = GaugeMetricFamily(
            "halb_backend_weight",
            "The backend's weight (0: no new flows).",
            labels=["service", "backend"],
        )
        for key, bv in sorted(backends.items()):
            service, backend = split_backend_key(key)
            for s in BACKEND_STATES:
                st.add_metric([service, backend, s], 1 if bv.state.value == s else 0)
            w.add_metric([service, backend], bv.weight)
        yield st
        yield w

    def _counter_families(self, counters: Counters) -> Iterator[Metric]:
        svc = ["vip", "port", "protocol"]
        pk = CounterMetricFamily(
            "halb_dataplane_packets", "Packets per virtual service.", labels=svc
        )
        by = CounterMetricFamily("halb_dataplane_bytes", "Bytes per virtual service.", labels=svc)
        for key, c in sorted(counters.per_service.items()):
            labels = [str(key.vip), str(key.port), str(key.protocol)]
            pk.add_metric(labels, c.packets)
            by.add_metric(labels, c.bytes)
        bl = [*svc, "backend"]
        bpk = CounterMetricFamily("halb_backend_packets", "Packets per backend.", labels=bl)
        bby = CounterMetricFamily("halb_backend_bytes", "Bytes per backend.", labels=bl)
        for (key, backend), c in sorted(counters.per_backend.items()):
            labels = [str(key.vip), str(key.port), str(key.protocol), str(backend)]
            bpk.add_metric(labels, c.packets)
            bby.add_metric(labels, c.bytes)
        yield from (pk, by, bpk, bby)
