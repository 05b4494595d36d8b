"""AgentSyncRoles over real gRPC on loopback, FakeDataplane at both ends: serve(term)
streams what the active's dataplane learns, follow(leader) installs it, and a
cancelled follow returns only with its flows in the dataplane."""

from __future__ import annotations

import asyncio
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


def flows(n: int) -> list[Flow]:
    return [
        Flow(
            Protocol.TCP,
            ipaddress.IPv4Address(0xC6120000 + i),
            1024 + i,
            ipaddress.ip_address("10.0.0.100"),
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
        serving = asyncio.create_task(active.serve(TERM))
        following = asyncio.create_task(standby.follow(Leader("lb1", 100, TERM)))
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
        again = asyncio.create_task(active.serve(Term(TERM.lease_id + 1, TERM.revision + 5)))
        await _until("a second server", lambda: active.stats()["role"] == "server", 5)
        again.cancel()
        with pytest.raises(asyncio.CancelledError):
            await again

    asyncio.run(asyncio.wait_for(main(), 60))


def test_follow_keeps_retrying_a_leader_that_is_not_serving_yet() -> None:
    cfg = _config()
    active_dp, standby_dp = FakeDataplane(), FakeDataplane()
    active, standby = roles(cfg, "lb1", active_dp), roles(cfg, "lb2", standby_dp)
    active_dp.install_flows(flows(5))

    async def main() -> None:
        following = asyncio.create_task(standby.follow(Leader("lb1", 100, TERM)))
        await asyncio.sleep(0.3)  # nothing listens yet: the client backs off and retries
        assert standby.stats()["synced"] is False
        serving = asyncio.create_task(active.serve(TERM))
        await _until("the snapshot", lambda: len(standby_dp.dump_flows()) == 5)
        for t in (following, serving):
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t

    asyncio.run(asyncio.wait_for(main(), 60))


def test_insecure_sync_needs_the_explicit_flag() -> None:
    cfg = _config(insecure=True)
    with pytest.raises(SyncSetupError, match="--allow-insecure-sync"):
        make_sync_roles(cfg, "lb1", FakeDataplane())
    assert isinstance(make_sync_roles(cfg, "lb1", FakeDataplane(), allow_insecure=True),
                      AgentSyncRoles)  # fmt: skip
