"""The agent's Prometheus metrics, rendered from a private registry."""

from __future__ import annotations

import socket
import urllib.request
from ipaddress import ip_address

import pytest
from prometheus_client.parser import text_string_to_metric_families

from halb.agent.causes import describe_cause
from halb.agent.metrics import AgentMetrics, cause_category, parse_address
from halb.checks.state import Health
from halb.checks.view import BackendView, HealthView
from halb.dataplane.base import Counter, Counters
from halb.ha.machine import CampaignWon, FenceDeadlinePassed
from halb.model import Backend, Protocol, ServiceKey, Term

pytestmark = pytest.mark.unit

SVC = ServiceKey(ip_address("10.94.0.100"), 80, Protocol.TCP)
BE1 = Backend(ip_address("10.94.0.21"), 80)
BE2 = Backend(ip_address("10.94.0.22"), 80)


def samples(m: AgentMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: AgentMetrics, name: str, **labels: str) -> float | None:
    """The sample's value; every series also carries the agent's node and cluster."""
    labels = {"node": m.node, "cluster": m.cluster, **labels}
    return samples(m).get((name, tuple(sorted(labels.items()))))


def test_group_state_term_and_failovers_by_cause() -> None:
    m = AgentMetrics("lb1", "lab", "xdp")
    m.update_group("lab", "standby", Term(0x7A61, 3), leader="lb2")
    assert value(m, "halb_group_state", group="lab", state="standby") == 1
    assert value(m, "halb_group_active", group="lab") == 0
    assert value(m, "halb_group_term_revision", group="lab") == 3
    m.record_transition("lab", "standby", "campaigning", "leader key gone (leader lease expired)")
    m.record_transition("lab", "campaigning", "active", "won the election")
    m.update_group("lab", "active", "7a62@9", leader="lb1")
    assert value(m, "halb_group_state", group="lab", state="active") == 1
    assert value(m, "halb_group_state", group="lab", state="standby") == 0
    assert value(m, "halb_group_term_revision", group="lab") == 9
    assert value(m, "halb_failovers_total", group="lab", cause="election") == 1
    m.record_transition("lab", "active", "standby", "handover to lb2 requested (operator)")
    m.record_transition("lab", "standby", "active", "won the election")
    assert value(m, "halb_failovers_total", group="lab", cause="election") == 2
    assert value(m, "halb_term_ends_total", group="lab", cause="handover") == 1
    assert (
        value(
            m,
            "halb_agent_info",
            node="lb1",
            cluster="lab",
            dataplane="xdp",
            version=__import__("halb").__version__,
        )
        == 1
    )


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("won the election", "election"),
        ("leader is lb2 (term 7a61@3)", "leader_observed"),
        (describe_cause(FenceDeadlinePassed(1)), "self_fenced"),
        (describe_cause(CampaignWon(Term(1, 2))), "election"),
        ("took over from a silent leader: no heartbeat of term 1@2", "forced_takeover"),
        ("preempt timer fired", "timer"),
        ("something new", "other"),
    ],
)
def test_causes_become_bounded_labels(text: str, label: str) -> None:
    assert cause_category(text) == label


def test_sync_stats_of_a_server_and_a_client() -> None:
    m = AgentMetrics("lb1")
    m.update_sync(
        {
            "role": "server",
            "connected_peers": 1,
            "lag_ms": 12.5,
            "entries_synced": 4000,
            "flows": 20,
            "dropped": 0,
            "detail": {"x": 1},
        }
    )
    assert value(m, "halb_sync_role", role="server") == 1
    assert value(m, "halb_sync_role", role="client") == 0
    assert value(m, "halb_sync_peers") == 1
    assert value(m, "halb_sync_lag_seconds") == pytest.approx(0.0125)
    assert value(m, "halb_sync_entries_synced_total") == 4000
    assert value(m, "halb_sync_entries") == 20
    m.update_sync({"role": "client", "synced": True, "lag_sequence": 3, "connected_peers": 1})
    assert value(m, "halb_sync_role", role="client") == 1
    assert value(m, "halb_sync_synced") == 1
    assert value(m, "halb_sync_lag_entries") == 3
    assert value(m, "halb_sync_lag_seconds") is None  # not reported by a client


def test_backend_states_follow_the_view_and_removed_backends_disappear() -> None:
    m = AgentMetrics("lb1")
    up = BackendView(Health.UP, 1.0, "check ok", 1)
    down = BackendView(Health.DOWN, 2.0, "refused", 1)
    m.update_backends(HealthView(1, {f"{SVC}/{BE1}": up, f"{SVC}/{BE2}": down}))
    assert value(m, "halb_backend_state", service=str(SVC), backend=str(BE1), state="up") == 1
    assert value(m, "halb_backend_state", service=str(SVC), backend=str(BE2), state="down") == 1
    assert value(m, "halb_backend_state", service=str(SVC), backend=str(BE2), state="up") == 0
    m.update_backends({f"{SVC}/{BE1}": up})
    assert value(m, "halb_backend_weight", service=str(SVC), backend=str(BE2)) is None


def test_dataplane_counters_and_flows() -> None:
    m = AgentMetrics("lb1")
    m.update_flows(42)
    m.update_counters(
        Counters(per_service={SVC: Counter(10, 1500)}, per_backend={(SVC, BE1): Counter(7, 1000)})
    )
    svc = {"vip": "10.94.0.100", "port": "80", "protocol": "tcp"}
    assert value(m, "halb_dataplane_flows") == 42
    assert value(m, "halb_dataplane_packets_total", **svc) == 10
    assert value(m, "halb_dataplane_bytes_total", **svc) == 1500
    assert value(m, "halb_backend_packets_total", **svc, backend=str(BE1)) == 7
    assert value(m, "halb_backend_bytes_total", **svc, backend=str(BE1)) == 1000


def test_dataplane_events() -> None:
    m = AgentMetrics("lb1")
    assert not any(k[0].startswith("halb_dataplane_events") for k in samples(m))
    m.update_events({"flow_expired": 3, "flow_swept": 5, "frag_drop": 1, "icmp_relayed": 2})
    assert value(m, "halb_dataplane_events_total", event="flow_swept") == 5
    assert value(m, "halb_dataplane_events_total", event="icmp_relayed") == 2


def test_conntrack_table_size_and_refusals() -> None:
    m = AgentMetrics("lb1")
    assert value(m, "halb_conntrack_entries") is None  # not nft: no series
    m.update_conntrack(
        {"count": 900, "max": 1000, "buckets": 256, "insert_failed": 3, "drop": 2,
         "early_drop": 1, "invalid": 7, "fill": 0.9}
    )  # fmt: skip
    assert value(m, "halb_conntrack_entries") == 900
    assert value(m, "halb_conntrack_max") == 1000
    assert value(m, "halb_conntrack_buckets") == 256
    assert value(m, "halb_conntrack_insert_failed_total") == 3
    assert value(m, "halb_conntrack_drop_total") == 2
    assert value(m, "halb_conntrack_early_drop_total") == 1


def test_two_agents_in_one_process_do_not_clash() -> None:
    a, b = AgentMetrics("lb1"), AgentMetrics("lb2")
    a.update_flows(1)
    b.update_flows(2)
    assert value(a, "halb_dataplane_flows") == 1 and value(b, "halb_dataplane_flows") == 2


def test_parse_address() -> None:
    assert parse_address("10.94.2.11:9700") == ("10.94.2.11", 9700)
    assert parse_address("[fd94::11]:9700") == ("fd94::11", 9700)
    with pytest.raises(ValueError):
        parse_address("10.94.2.11")


def test_serves_metrics_over_http_on_loopback() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = AgentMetrics("lb1")
    m.update_group("lab", "active")
    m.start(f"127.0.0.1:{port}")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            body = r.read().decode()
    finally:
        m.stop()
    assert 'halb_group_active{cluster="",group="lab",node="lb1"} 1.0' in body
