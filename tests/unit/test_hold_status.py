"""What `halb status` and the metrics show of the hold, and the drill's VIP-holder
summary (pure)."""

from __future__ import annotations

import pytest

from halb.agent.metrics import AgentMetrics
from halb.cli.cluster import hold_lines
from halb.drill.vipwatch import spans

pytestmark = pytest.mark.unit

HOLDING = {
    "holding": True, "holding_since": 1.0, "hold_left": 0.42, "promises": {"lb2": 0.42},
    "refusals": {"lb3": "reaches etcd"}, "holds": 2, "last_end": "etcd answers again",
    "bound_for": 0.0, "granted": 0, "refused": {},
}  # fmt: skip
BOUND = {"holding": False, "promises": {}, "refusals": {}, "holds": 0, "last_end": None,
         "bound_for": 0.31, "granted": 7, "refused": {"reaches etcd": 2}}  # fmt: skip


def test_status_lines_say_who_holds_on_whose_promise() -> None:
    nodes = [
        {"name": "lb1", "groups": {"web": {"hold": HOLDING}}},
        {"name": "lb2", "groups": {"web": {"hold": BOUND}}},
        {"name": "lb3", "groups": {"web": {"hold": {}}}},  # fence mode: nothing shown
    ]
    lb1, lb2 = hold_lines(nodes)
    assert lb1.startswith("lb1 web: HOLDING since") and "lb2 (+0.42s)" in lb1
    assert "refusals lb3: reaches etcd" in lb1 and "last ended: etcd answers again" in lb1
    assert "bound for 0.31s, granted 7" in lb2 and "HOLDING" not in lb2


def test_metrics_export_the_hold() -> None:
    m = AgentMetrics("lb1")
    m.update_hold("web", HOLDING)
    text = m.render().decode()
    assert 'halb_hold_active{cluster="",group="web",node="lb1"} 1.0' in text
    assert 'halb_hold_promises{cluster="",group="web",node="lb1"} 1.0' in text
    assert 'halb_hold_expiry_seconds{cluster="",group="web",node="lb1"} 0.42' in text
    m.update_hold("web", BOUND)
    text = m.render().decode()
    assert 'halb_hold_active{cluster="",group="web",node="lb1"} 0.0' in text
    assert (
        'halb_promise_answers_total{cluster="",group="web",node="lb1",outcome="granted"} 7.0'
        in (text)
    )
    assert 'outcome="reaches etcd"} 2.0' in text


def test_vip_holder_spans() -> None:
    a, b, none = frozenset({"lb1"}), frozenset({"lb2"}), frozenset[str]()
    one = spans([(0.0, a), (1.0, a), (2.0, a)], 0.0, 3.0)
    assert one["exactly_one_throughout"] and one["one_s"] == {"lb1": 3.0}
    moved = spans([(0.0, a), (1.0, none), (3.0, b), (4.0, a | b)], 0.0, 5.0)
    assert not moved["exactly_one_throughout"]
    assert moved["none_s"] == 2.0 and moved["several_s"] == 1.0
    assert moved["one_s"] == {"lb1": 1.0, "lb2": 1.0}
    assert not spans([], 0.0, 1.0)["exactly_one_throughout"]
