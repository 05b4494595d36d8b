"""The etcd key layout (halb.keys) is a wire contract between agent versions and the
CLI: pinned here."""

from __future__ import annotations

import pytest

from halb.keys import ClusterKeys, GroupKeys

pytestmark = pytest.mark.unit


def test_every_key_of_a_cluster() -> None:
    k = ClusterKeys("/halb/", "dc1")
    assert k.config == b"/halb/dc1/config"
    assert k.status("lb1") == b"/halb/dc1/status/lb1"
    assert k.node_drain_prefix == b"/halb/dc1/drain/"
    assert k.health_view == b"/halb/dc1/health/view"
    assert k.backend_drain_prefix == b"/halb/dc1/drain-backend/"
    g = k.group("web")
    assert g == GroupKeys("/halb/", "dc1", "web")
    assert (g.leader, g.handover, g.heartbeat) == (
        b"/halb/dc1/groups/web/leader",
        b"/halb/dc1/groups/web/handover",
        b"/halb/dc1/groups/web/heartbeat",
    )
    assert g.drain("lb2") == b"/halb/dc1/drain/lb2"
    assert g.group_prefix == b"/halb/dc1/groups/web/"
