"""AgentSyncRoles over real gRPC on loopback, FakeDataplane at both ends: serve(group,
term) streams what the active's dataplane learns of that group, follow(group, leader)
installs it, a cancelled follow returns only with its flows in the dataplane, and the
node's one server keeps serving the groups it still holds when another group's term
ends."""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import socket
from typing import Any

import pytest

from halb.agent.syncroles import AgentSyncRoles, SyncSetupError, make_sync_roles
from halb.config import ClusterConfig, parse_config
from halb.dataplane.dumpscan import DumpScanSource
from halb.ha.machine import Leader
from halb.model import Flow, Protocol, Term
from halb.sync.client import ClientOptions
from halb.sync.server import ServerOptions
from halb.sync.tls import SyncSecurity
from halb.testing.fake_dataplane import FakeDataplane
from halb.testing.sync_cluster import two_node_doc

pytestmark = pytest.mark.loopback

TERM = Term(lease_id=0x5EED, revision=7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(insecure: bool = True) -> ClusterConfig:
    port = _free_port()
    doc = two_node_doc("t", ["10.0.0.21"], sync_port=port, sync_insecure=insecure)
    return parse_config(doc, "test")


def _two_group_config() -> ClusterConfig:
    """Groups a (VIP 10.0.0.100) and b (10.0.0.101), each a copy of group g."""
    doc = two_node_doc("t", ["10.0.0.21"], sync_port=_free_port())
    g = doc["vip_groups"][0]
    b = copy.deepcopy(g)
    g["name"], b["name"] = "a", "b"
    b["vips"][0]["address"] = "10.0.0.101"
    doc["vip_groups"] = [g, b]
    return parse_config(doc, "test")


def flows(n: int, vip: str = "10.0.0.100", base: int = 0xC6120000) -> list[Flow]:
    return [
        Flow(
            Protocol.TCP,
            ipaddress.IPv4Address(base + i),
            1024 + i,
            ipaddress.ip_address(vip),
            80,
            ipaddress.ip_address("10.0.0.21"),
            8080,
        )
        for i in range(n)
    ]


def roles(cfg: ClusterConfig, node: str, dp: FakeDataplane) -> AgentSyncRoles:
    return AgentSyncRoles(
        config=cfg,
        node=node,
        dataplane=dp,
        security=SyncSecurity.from_config(cfg, node, allow_insecure=True),
        source_factory=lambda: DumpScanSource(dp, interval=0.01),
        server_options=ServerOptions(heartbeat_interval=0.2, flush_interval=0.001),
        client_options=ClientOptions(heartbeat_timeout=1.0, backoff_initial=0.05),
    )


async def _until(what: str, cond: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def test_serve_and_follow_carry_flows_and_stop_cleanly() -> None:
    cfg = _config()
    active_dp, standby_dp = FakeDataplane(), FakeDataplane()
    active, standby = roles(cfg, "lb1", active_dp), roles(cfg, "lb2", standby_dp)
    before, after = flows(300), flows(600)[300:]

    async def main() -> None:
        active_dp.install_flows(before)  # already there when the term starts
        serving = asyncio.create_task(active.serve("g", TERM))
        following = asyncio.create_task(standby.follow("g", Leader("lb1", 100, TERM)))
        await _until("the snapshot", lambda: len(standby_dp.dump_flows()) == 300)
        active_dp.install_flows(after)  # learned by the scans, pushed as deltas
        active_dp.delete_flows(before[:10])
        await _until("the deltas", lambda: len(standby_dp.dump_flows()) == 590)

        st = active.stats()
        assert st["role"] == "server" and st["connected_peers"] == 1
        assert standby.stats()["role"] == "client" and standby.stats()["synced"] is True

        following.cancel()
        with pytest.raises(asyncio.CancelledError):
            await following
        assert sorted(standby_dp.dump_flows()) == sorted(before[10:] + after)
        assert standby.stats()["role"] == "idle"

        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        assert active.stats()["role"] == "idle"
        # The port is free again for the next term.
        again = asyncio.create_task(active.serve("g", Term(TERM.lease_id + 1, TERM.revision + 5)))
        await _until("a second server", lambda: active.stats()["role"] == "server", 5)
        again.cancel()
        with pytest.raises(asyncio.CancelledError):
            await again
        await active.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_follow_keeps_retrying_a_leader_that_is_not_serving_yet() -> None:
    cfg = _config()
    active_dp, standby_dp = FakeDataplane(), FakeDataplane()
    active, standby = roles(cfg, "lb1", active_dp), roles(cfg, "lb2", standby_dp)
    active_dp.install_flows(flows(5))

    async def main() -> None:
        following = asyncio.create_task(standby.follow("g", Leader("lb1", 100, TERM)))
        await asyncio.sleep(0.3)  # nothing listens yet: the client backs off and retries
        assert standby.stats()["synced"] is False
        serving = asyncio.create_task(active.serve("g", TERM))
        await _until("the snapshot", lambda: len(standby_dp.dump_flows()) == 5)
        for t in (following, serving):
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
        await active.close()

    asyncio.run(asyncio.wait_for(main(), 60))


TERM_A = Term(lease_id=0xA, revision=10)
TERM_B = Term(lease_id=0xB, revision=11)


def test_two_groups_with_actives_on_different_nodes_each_follow_the_other() -> None:
    cfg = _two_group_config()
    dp1, dp2 = FakeDataplane(), FakeDataplane()
    lb1, lb2 = roles(cfg, "lb1", dp1), roles(cfg, "lb2", dp2)
    a_flows, b_flows = flows(50, "10.0.0.100"), flows(70, "10.0.0.101", base=0xC6130000)
    dp1.install_flows(a_flows)  # lb1 is active for a, lb2 for b
    dp2.install_flows(b_flows)

    async def main() -> None:
        tasks = [
            asyncio.create_task(lb1.serve("a", TERM_A)),
            asyncio.create_task(lb2.serve("b", TERM_B)),
            asyncio.create_task(lb1.follow("b", Leader("lb2", 90, TERM_B))),
            asyncio.create_task(lb2.follow("a", Leader("lb1", 100, TERM_A))),
        ]
        want = sorted(a_flows + b_flows)
        await _until("both groups on both nodes",
                     lambda: dp1.dump_flows() == want and dp2.dump_flows() == want)  # fmt: skip
        # The flows land before the client marks itself synced (it settles the writes
        # first), so wait for the flag too rather than race it.
        await _until("both clients synced", lambda: all(r.stats()["synced"] for r in (lb1, lb2)))
        for me, st in (("lb1", lb1.stats()), ("lb2", lb2.stats())):
            assert set(st["groups"]) == {"a", "b"}, me
        assert lb1.stats()["groups"]["a"]["role"] == "server"
        assert lb1.stats()["groups"]["b"]["role"] == "client"
        assert lb1.stats()["groups"]["b"]["flows"] == 70
        assert lb2.stats()["groups"]["a"]["flows"] == 50
        assert lb1.caught_up("b", Leader("lb2", 90, TERM_B))
        assert not lb1.caught_up("a", Leader("lb2", 90, TERM_B))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await lb1.close()
        await lb2.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_server_keeps_serving_a_group_after_another_groups_term_ends() -> None:
    cfg = _two_group_config()
    dp1, dp2 = FakeDataplane(), FakeDataplane()
    lb1, lb2 = roles(cfg, "lb1", dp1), roles(cfg, "lb2", dp2)
    a_flows, b_flows = flows(20, "10.0.0.100"), flows(30, "10.0.0.101", base=0xC6130000)
    dp1.install_flows(a_flows + b_flows)  # lb1 holds both groups

    async def main() -> None:
        serve_a = asyncio.create_task(lb1.serve("a", TERM_A))
        serve_b = asyncio.create_task(lb1.serve("b", TERM_B))
        follows = [
            asyncio.create_task(lb2.follow("a", Leader("lb1", 100, TERM_A))),
            asyncio.create_task(lb2.follow("b", Leader("lb1", 100, TERM_B))),
        ]
        await _until("both groups", lambda: len(dp2.dump_flows()) == 50)
        assert lb2.stats()["groups"]["a"]["flows"] == 20  # each stream: its group only
        assert lb2.stats()["groups"]["b"]["flows"] == 30
        serve_a.cancel()  # a's term ends on lb1; b's goes on
        await asyncio.gather(serve_a, return_exceptions=True)
        more_a = flows(5, "10.0.0.100", base=0xC6140000)
        more_b = flows(7, "10.0.0.101", base=0xC6150000)
        dp1.install_flows(more_a + more_b)
        await _until("b's new flows", lambda: set(more_b) <= set(dp2.dump_flows()))
        await _until("a refused", lambda: lb1.stats()["groups"]["b"]["detail"]["refused"]
                     .get("unknown_group", 0) > 0)  # fmt: skip
        assert not set(more_a) & set(dp2.dump_flows())  # no term of a on lb1: not served
        assert set(lb1.stats()["groups"]) == {"b"}
        assert lb2.stats()["groups"]["b"]["synced"] is True
        for t in (serve_b, *follows):
            t.cancel()
        await asyncio.gather(serve_b, *follows, return_exceptions=True)
        await lb1.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_insecure_sync_needs_the_explicit_flag() -> None:
    cfg = _config(insecure=True)
    with pytest.raises(SyncSetupError, match="--allow-insecure-sync"):
        make_sync_roles(cfg, "lb1", FakeDataplane())
    assert isinstance(make_sync_roles(cfg, "lb1", FakeDataplane(), allow_insecure=True),
                      AgentSyncRoles)  # fmt: skip
