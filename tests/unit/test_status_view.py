from __future__ import annotations

from halb.agent.status import GroupStatus, LeaderInfo, NodeStatus, cluster_view, parse_status
from halb.config import ClusterConfig, parse_config
from halb.lab.topology import lab_config, plan


def _cfg() -> ClusterConfig:
    return parse_config(lab_config(plan(3, 2)))


def test_roles_follow_the_leader_key_drains_and_liveness() -> None:
    cfg = _cfg()
    statuses = {
        "lb1": NodeStatus("lb1", 10, 1.0, "xdp", groups={"lab": GroupStatus("active")}),
        "lb2": NodeStatus("lb2", 11, 1.0, "xdp"),
    }
    view = cluster_view(cfg, {"lab": LeaderInfo("lb1", "1a@5", 0.8)}, statuses, drained={"lb2"})
    roles = {n["name"]: n["role"] for n in view["nodes"]}
    assert roles == {"lb1": "active", "lb2": "drained", "lb3": "down"}
    assert view["groups"][0]["active"] == "lb1"
    assert view["groups"][0]["lease_ttl_left"] == 0.8
    assert view["groups"][0]["vips"] == ["10.99.0.100"]


def test_no_leader_means_nobody_is_active() -> None:
    cfg = _cfg()
    statuses = {n: NodeStatus(n, 1, 1.0, "xdp") for n in ("lb1", "lb2", "lb3")}
    view = cluster_view(cfg, {}, statuses, set())
    assert {n["role"] for n in view["nodes"]} == {"standby"}
    assert view["groups"][0]["active"] is None


def test_last_failover_is_the_newest_reported() -> None:
    cfg = _cfg()
    old = {"time": 100.0, "group": "lab", "cause": "preempt", "from": "lb2", "to": "lb1"}
    new = {"time": 200.0, "group": "lab", "cause": "leader lease expired", "to": "lb2"}
    statuses = {
        "lb1": NodeStatus("lb1", 1, 1.0, "xdp", last_failover=old),
        "lb2": NodeStatus("lb2", 2, 1.0, "xdp", last_failover=new),
    }
    assert cluster_view(cfg, {}, statuses, set())["last_failover"] == new


def test_status_documents_roundtrip_and_garbage_is_ignored() -> None:
    st = NodeStatus("lb1", 10, 1.5, "nft", 7, {"lab": GroupStatus("active", "1@2", "lb1")})
    assert parse_status(st.to_json()) == st
    assert parse_status(b"{not json") is None
    assert parse_status(b'{"node": "x"}') is None
