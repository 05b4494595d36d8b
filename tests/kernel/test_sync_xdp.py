"""FlowSync from one XDP flow map into another: the active's XdpFlowSource scans its
map and streams packed records over gRPC; the standby's client validates them and
installs them with XdpDataplane.install_records. No Flow object on the way except
where this test looks."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, ip_address

import pytest

from halb.config import ClusterConfig, parse_config
from halb.dataplane.xdp.adapter import XdpDataplane
from halb.dataplane.xdp.flowsource import XdpFlowSource
from halb.model import Flow, Protocol, Service, Term
from halb.sync.client import ClientOptions, FlowSyncClient
from halb.sync.server import FlowSyncServer, ServerOptions
from halb.sync.tls import SyncSecurity
from halb.testing.sync_cluster import NODES, two_node_doc, veth_dataplanes
from halb.testing.waits import until

pytestmark = pytest.mark.kernel

TERM = Term(lease_id=0x7D9, revision=3)
BACKENDS = ["10.0.0.21", "10.0.0.22", "10.0.0.23"]
VIP = ip_address("10.0.0.100")
INSECURE_A = SyncSecurity("lb1", frozenset(NODES), None, None)
INSECURE_B = SyncSecurity("lb2", frozenset(NODES), None, None)


@pytest.fixture(scope="module")
def cfg() -> ClusterConfig:
    return parse_config(two_node_doc("t", BACKENDS))


def with_macs(svcs: list[Service], order: slice = slice(None)) -> list[Service]:
    """The services with backend MACs (no neighbour resolution), backends in `order`."""
    return [
        dataclasses.replace(
            s,
            backends=tuple(
                dataclasses.replace(b, mac=f"02:00:00:00:00:{i + 1:02x}")
                for i, b in enumerate(s.backends)
            )[order],
        )
        for s in svcs
    ]


def flows(n: int, base: int = 0x64400000, backend: str | None = None) -> list[Flow]:
    return [
        Flow(Protocol.TCP, IPv4Address(base + i), 1024 + i % 60000, VIP, 80,
             ip_address(backend or BACKENDS[i % 3]), 8080)
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture
def make_dp() -> Iterator[Callable[[list[Service]], XdpDataplane]]:
    with veth_dataplanes("halbt-sxdp") as make:
        yield lambda services: make(services, "10.0.0.11")


def test_active_map_to_standby_map(
    cfg: ClusterConfig, make_dp: Callable[[list[Service]], XdpDataplane]
) -> None:
    active = make_dp(with_macs(cfg.services()))
    # Backends in another order: the standby's backend ids differ from the active's.
    standby = make_dp(with_macs(cfg.services(), slice(None, None, -1)))
    assert active.record_backend_ids() != standby.record_backend_ids()
    before, after = flows(3000), flows(2000, base=0x64410000)
    active.install_flows(before)  # already there when the server starts: the snapshot

    async def main() -> None:
        source = XdpFlowSource.from_dataplane(active, interval=0.01)
        opts = ServerOptions(heartbeat_interval=0.2, flush_interval=0.001)
        server = FlowSyncServer(
            source, term=TERM, security=INSECURE_A, address="127.0.0.1:0", options=opts
        )
        port = await server.start()
        client = FlowSyncClient(
            config=cfg, node="lb2", peer="lb1", target=f"127.0.0.1:{port}",
            dataplane=standby, security=INSECURE_B, known_term=TERM,
            options=ClientOptions(heartbeat_timeout=2.0, backoff_initial=0.05),
        )  # fmt: skip
        scans = asyncio.create_task(source.run(server.push))
        client.start()
        try:
            assert await client.wait_synced(10)
            await until(lambda: len(standby.dump_flows()) == 3000, 10.0, "the snapshot", every=0.02)
            # Learned by the scans, pushed as deltas: new flows, ended flows, and flows
            # the active's program moved to another backend.
            active.install_flows(after)
            active.delete_flows(before[:100])
            b0 = ip_address(BACKENDS[0])
            moved = [dataclasses.replace(f, backend=b0) for f in before[100:150] if f.backend != b0]
            assert moved
            active.install_flows(moved)
            want = active.dump_flows()
            assert len(want) == 4900
            await until(lambda: standby.dump_flows() == want, 10.0, "the deltas", every=0.02)
            st = client.stats()
            assert st.flows == 4900 and not st.dropped

            # A new server (a new session, as after a restart): the client resyncs in
            # full and removes what ended meanwhile, but not the moved flows, whose
            # earlier records it held under the same connection.
            scans.cancel()
            await asyncio.gather(scans, return_exceptions=True)
            await server.stop()
            active.delete_flows(before[200:250])
            want = active.dump_flows()
            server = FlowSyncServer(
                source, term=TERM, security=INSECURE_A, address=f"127.0.0.1:{port}", options=opts
            )
            await server.start()
            scans = asyncio.create_task(source.run(server.push))
            await until(lambda: client.stats().snapshots == 2, 10.0, "the resync", every=0.02)
            assert standby.dump_flows() == want
            assert client.stats().flows == 4850
        finally:
            await client.stop()
            scans.cancel()
            await asyncio.gather(scans, return_exceptions=True)
            await server.stop()
            source.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_flows_the_standby_may_not_install_are_dropped_and_counted(
    cfg: ClusterConfig, make_dp: Callable[[list[Service]], XdpDataplane]
) -> None:
    # The active knows a backend that the standby's config does not: its flows are
    # refused by validation, counted, and the others installed.
    wider = parse_config(two_node_doc("t", [*BACKENDS, "10.0.0.24"]))
    active = make_dp(with_macs(wider.services()))
    standby = make_dp(with_macs(cfg.services()))
    ok, foreign = flows(30), flows(7, base=0x64420000, backend="10.0.0.24")
    active.install_flows(ok + foreign)

    async def main() -> None:
        source = XdpFlowSource.from_dataplane(active, interval=0.01)
        server = FlowSyncServer(source, term=TERM, security=INSECURE_A, address="127.0.0.1:0")
        port = await server.start()
        client = FlowSyncClient(
            config=cfg, node="lb2", peer="lb1", target=f"127.0.0.1:{port}",
            dataplane=standby, security=INSECURE_B, known_term=TERM,
        )  # fmt: skip
        client.start()
        try:
            assert await client.wait_synced(10)
            assert standby.dump_flows() == sorted(ok)
            assert client.stats().dropped == {"unknown_backend": 7}
        finally:
            await client.stop()
            await server.stop()
            source.close()

    asyncio.run(asyncio.wait_for(main(), 60))
