"""FlowSync over real gRPC on loopback with real mTLS certificates.

FakeDataplane is the source and the sink here: the kernel ends are tested by their
own adapters. A small TCP proxy between standby and active can cut connections,
refuse new ones, or freeze (hold every byte while keeping the sockets open), which is
what a hung active or a black-holed path looks like to the standby.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest

from halb.config import ClusterConfig, TlsFiles, parse_config
from halb.flows import records
from halb.model import Flow, Protocol, Term
from halb.sync import certs, codec
from halb.sync.client import ClientOptions, FlowSyncClient
from halb.sync.pb import SERVICE, sync_pb2
from halb.sync.server import FlowSyncServer, ServerOptions
from halb.sync.tls import SyncSecurity
from halb.testing.fake_dataplane import FakeDataplane
from halb.testing.sync_cluster import NODES, two_node_doc
from halb.testing.waits import until

pytestmark = pytest.mark.loopback

ip = ipaddress.ip_address
TERM = Term(lease_id=0xABC, revision=100)
CONFIG: dict[str, Any] = two_node_doc("t", ["10.0.0.21", "10.0.0.22"])

FAST = ClientOptions(heartbeat_timeout=1.0, backoff_initial=0.05, backoff_max=0.2)
SERVER_FAST = ServerOptions(heartbeat_interval=0.2, peer_timeout=2.0, flush_interval=0.001)


def flow(i: int, backend: str = "10.0.0.21", vport: int = 80) -> Flow:
    return Flow(
        Protocol.TCP,
        ipaddress.IPv4Address(0xC6120000 + i),  # 198.18.0.0/15
        1024 + i % 60000,
        ip("10.0.0.100"),
        vport,
        ip(backend),
        8080,
    )


class Source:
    """A FlowSnapshot over a FakeDataplane (what the active's adapter would be)."""

    def __init__(self, flows: Iterable[Flow] = ()) -> None:
        self.dp = FakeDataplane()
        self.dp.install_flows(flows)
        self.snapshots = 0

    def snapshot_records(self) -> bytes:
        self.snapshots += 1
        return records.from_flows(self.dp.flows)


class SlowSource(Source):
    """A source whose snapshot takes longer than the standby's heartbeat timeout."""

    def snapshot_records(self) -> bytes:
        time.sleep(1.5)
        return super().snapshot_records()


class RecordingDataplane(FakeDataplane):
    """A sink that remembers the order of the writes it received."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, Flow]] = []

    def install_flows(self, flows: Iterable[Flow]) -> int:
        flows = list(flows)
        self.log += [("install", f) for f in flows]
        return super().install_flows(flows)

    def delete_flows(self, flows: Iterable[Flow]) -> int:
        flows = list(flows)
        self.log += [("delete", f) for f in flows]
        return super().delete_flows(flows)


class Proxy:
    """TCP proxy on loopback that can cut, refuse and freeze connections."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.refuse = False
        self.running = asyncio.Event()
        self.running.set()
        self.accepted = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def freeze(self) -> None:
        self.running.clear()

    def thaw(self) -> None:
        self.running.set()

    def cut(self) -> None:
        for w in list(self._writers):
            w.transport.abort()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.refuse:
            w.transport.abort()
            return
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers |= {w, uw}
        t1 = asyncio.create_task(self._pipe(r, uw))
        t2 = asyncio.create_task(self._pipe(ur, w))
        self._tasks |= {t1, t2}
        await asyncio.wait([t1, t2], return_when=asyncio.FIRST_COMPLETED)
        for t in (t1, t2):
            t.cancel()
        for x in (w, uw):
            x.transport.abort()
            self._writers.discard(x)
        await asyncio.gather(t1, t2, return_exceptions=True)
        self._tasks -= {t1, t2}

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            data = await r.read(65536)
            if not data:
                return
            await self.running.wait()
            w.write(data)
            await w.drain()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# --- fixtures --------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg() -> ClusterConfig:
    return parse_config(CONFIG)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory, cfg: ClusterConfig) -> TlsFiles:
    return certs.write_cluster_certs(cfg, tmp_path_factory.mktemp("pki"))


def security(files: TlsFiles, node: str) -> SyncSecurity:
    return SyncSecurity.from_files(files, node, NODES)


@contextlib.asynccontextmanager
async def running(
    cfg: ClusterConfig,
    files: TlsFiles,
    source: Source,
    *,
    sink: FakeDataplane | None = None,
    term: Term = TERM,
    known_term: Term | None = TERM,
    server_options: ServerOptions = SERVER_FAST,
    client_security: SyncSecurity | None = None,
    proxy: bool = False,
) -> AsyncIterator[tuple[FlowSyncServer, FlowSyncClient, FakeDataplane, Proxy | None]]:
    server = FlowSyncServer(
        source,
        term=term,
        security=security(files, "lb1"),
        address="127.0.0.1:0",
        options=server_options,
    )
    port = await server.start()
    px = None
    if proxy:
        px = Proxy(port)
        port = await px.start()
    sink = sink if sink is not None else FakeDataplane()
    client = FlowSyncClient(
        config=cfg,
        node="lb2",
        peer="lb1",
        target=f"127.0.0.1:{port}",
        dataplane=sink,
        security=client_security or security(files, "lb2"),
        known_term=known_term,
        options=FAST,
    )
    client.start()
    try:
        yield server, client, sink, px
    finally:
        await client.stop()
        if px is not None:
            await px.close()
        await server.stop(0)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 60))


# --- tests -----------------------------------------------------------------------


def test_snapshot_then_deltas_in_order(cfg: ClusterConfig, tls_files: TlsFiles) -> None:
    initial = [flow(i) for i in range(5000)]

    async def body() -> None:
        sink = RecordingDataplane()
        async with running(cfg, tls_files, Source(initial), sink=sink) as (server, client, _, _):
            assert await client.wait_synced(10)
            assert sink.flows == set(initial)
            snap_writes = len(sink.log)
            # Separate flushes, so the changes travel in separate, ordered batches.
            server.push(upserts=[flow(9001)])
            server.flush()
            server.push(deletes=[flow(9001), flow(0)])
            server.flush()
            server.push(upserts=[flow(9001), flow(9002)], deletes=[flow(1)])
            server.flush()
            await until(lambda: client.stats().applied_sequence == 3, what="3 deltas")
            want = set(initial) - {flow(0), flow(1)} | {flow(9001), flow(9002)}
            assert sink.flows == want
            deltas = sink.log[snap_writes:]
            assert deltas == [
                ("install", flow(9001)),
                ("delete", flow(9001)),
                ("delete", flow(0)),
                ("delete", flow(1)),
                ("install", flow(9001)),
                ("install", flow(9002)),
            ]
            await until(lambda: server.stats().peers[0].acked_sequence == 3, what="acks")
            st, cs = server.stats(), client.stats()
            assert st.peers[0].node == "lb2" and st.peers[0].lag_sequence == 0
            assert st.peers[0].state == "streaming"
            assert cs.synced and cs.connected and cs.snapshots == 1 and cs.dropped == {}
            assert cs.flows == len(want) and cs.lag_sequence == 0

    run(body)


def test_resume_with_last_sequence(cfg: ClusterConfig, tls_files: TlsFiles) -> None:
    async def body() -> None:
        source = Source([flow(i) for i in range(100)])
        async with running(cfg, tls_files, source, proxy=True) as (server, client, sink, px):
            assert px is not None
            assert await client.wait_synced(10)
            server.push(upserts=[flow(500)])
            server.flush()
            await until(lambda: client.stats().applied_sequence == 1)
            px.refuse = True
            px.cut()
            await until(lambda: not server.stats().peers, what="server sees the cut")
            # Changes while the standby is away stay in the backlog.
            server.push(upserts=[flow(501)], deletes=[flow(3)])
            server.flush()
            px.refuse = False
            await until(lambda: client.stats().applied_sequence == 2, what="resume")
            assert flow(501) in sink.flows and flow(3) not in sink.flows
            cs, st = client.stats(), server.stats()
            assert cs.snapshots == 1 and cs.resumes == 1 and cs.reconnects >= 1
            assert st.resumes == 1 and st.snapshots_sent == 1
            assert source.snapshots == 1

    run(body)


def test_full_resync_when_the_backlog_is_exceeded(cfg: ClusterConfig, tls_files: TlsFiles) -> None:
    async def body() -> None:
        initial = [flow(i) for i in range(100)]
        source = Source(initial)
        opts = ServerOptions(
            heartbeat_interval=0.2, peer_timeout=2.0, flush_interval=0.001, backlog_entries=10
        )
        async with running(cfg, tls_files, source, server_options=opts, proxy=True) as (
            server,
            client,
            sink,
            px,
        ):
            assert px is not None
            assert await client.wait_synced(10)
            px.refuse = True
            px.cut()
            await until(lambda: not server.stats().peers)
            # 30 single-flow batches > 10 entries of backlog; mirror them in the source.
            for i in range(30):
                f, gone = flow(1000 + i), flow(i)
                source.dp.install_flows([f])
                source.dp.delete_flows([gone])
                server.push(upserts=[f], deletes=[gone])
                server.flush()
            assert server.stats().backlog_entries <= 10
            px.refuse = False
            await until(lambda: client.stats().snapshots == 2, what="second snapshot")
            # The resync removed what ended while the standby was away.
            assert sink.flows == source.dp.flows
            assert client.stats().flows == len(source.dp.flows)
            assert server.stats().resumes == 0 and source.snapshots == 2

    run(body)


@pytest.mark.parametrize("who", ["no-cert", "other-ca", "unknown-node"])
def test_client_without_a_valid_certificate_is_refused(
    who: str, cfg: ClusterConfig, tls_files: TlsFiles, tmp_path: Path
) -> None:
    ca = Path(tls_files.ca).read_bytes()
    if who == "no-cert":
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
        code = "UNAVAILABLE"
    elif who == "other-ca":
        other = certs.write_cluster_certs(cfg, tmp_path).for_node("lb2")
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca,  # trusts the real server; presents a foreign cert
            private_key=Path(other.key).read_bytes(),
            certificate_chain=Path(other.cert).read_bytes(),
        )
        code = "UNAVAILABLE"
    else:
        pair = certs.generate_node_cert(
            certs.CertPair((Path(tls_files.ca).parent / "ca-key.pem").read_bytes(), ca),
            "mallory",
        )
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=pair.key_pem, certificate_chain=pair.cert_pem
        )
        code = "UNAUTHENTICATED"
    bad = SyncSecurity("lb2", frozenset(NODES), None, creds)

    async def body() -> None:
        source = Source([flow(i) for i in range(10)])
        async with running(cfg, tls_files, source, client_security=bad) as (
            server,
            client,
            sink,
            _,
        ):
            await until(lambda: client.stats().reconnects >= 2, what="refusals")
            assert not await client.wait_synced(0.2)
            assert sink.flows == set()
            assert code in (client.stats().last_error or "")
            assert source.snapshots == 0 and server.stats().peers == ()
            if who == "unknown-node":
                assert server.stats().refused.get("unknown_peer", 0) >= 1

    run(body)


def test_stream_from_an_older_term_is_ignored_and_counted(
    cfg: ClusterConfig, tls_files: TlsFiles
) -> None:
    async def body() -> None:
        source = Source([flow(i) for i in range(50)])
        old = Term(lease_id=0xABC, revision=90)
        async with running(cfg, tls_files, source, term=old, known_term=TERM) as (
            _,
            client,
            sink,
            _,
        ):
            await until(lambda: client.stats().stale_term_streams >= 2, what="stale streams")
            cs = client.stats()
            assert sink.flows == set()
            assert not cs.synced
            assert cs.dropped["stale_term"] >= 100  # 50 flows per refused stream
            assert cs.known_term == TERM

    run(body)


def test_out_of_config_flows_are_dropped_and_counted(
    cfg: ClusterConfig, tls_files: TlsFiles
) -> None:
    async def body() -> None:
        good = [flow(i) for i in range(20)]
        bad_backend = [flow(100 + i, backend="10.0.0.99") for i in range(3)]
        bad_service = [flow(200 + i, vport=81) for i in range(4)]
        source = Source(good + bad_backend + bad_service)
        async with running(cfg, tls_files, source) as (server, client, sink, _):
            assert await client.wait_synced(10)
            server.push(upserts=[flow(300, backend="10.0.0.98"), flow(301)])
            server.flush()
            await until(lambda: client.stats().applied_sequence == 1)
            assert sink.flows == set(good) | {flow(301)}
            assert client.stats().dropped == {"unknown_backend": 4, "unknown_service": 4}

    run(body)


async def _raw_active(
    messages: list[bytes],
) -> tuple[Any, int, asyncio.Event]:
    """A hand-written active that sends exactly `messages`, then idles until cancelled."""
    done = asyncio.Event()

    async def handler(_: Any, context: Any) -> None:
        await context.read()  # subscribe
        for m in messages:
            await context.write(m)
        done.set()
        await asyncio.sleep(30)

    server = grpc.aio.server()
    h = grpc.stream_stream_rpc_method_handler(
        handler,
        request_deserializer=sync_pb2.SyncRequest.FromString,
        response_serializer=lambda b: b,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Sync": h}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, done


def test_malformed_messages_do_not_crash_the_client(cfg: ClusterConfig) -> None:
    session = 77
    good = flow(1)
    snap = next(
        codec.snapshot_messages(
            records.from_flows([good]), term=TERM, session=session, sequence=0, batch_size=10
        )
    )
    mixed = records.from_flows([flow(3)])
    mixed = records.addr16(ip("2001:db8::3")) + mixed[16:]  # src family != VIP's
    delta1 = codec.delta_message(
        term=TERM,
        session=session,
        sequence=1,
        upserts=records.from_flows([flow(2)]) + mixed,
        deletes=b"",
    )
    partial = codec.delta_message(
        term=TERM, session=session, sequence=2, upserts=records.from_flows([flow(4)])[:-3],
        deletes=b"",
    )  # fmt: skip
    messages = [snap, b"\x0a\xff\xff\xff\xff\x0f", delta1, partial]

    async def body() -> None:
        server, port, done = await _raw_active(messages)
        sink = FakeDataplane()
        client = FlowSyncClient(
            config=cfg,
            node="lb2",
            peer="lb1",
            target=f"127.0.0.1:{port}",
            dataplane=sink,
            security=SyncSecurity("lb2", frozenset(NODES), None, None),
            known_term=TERM,
            options=FAST,
        )
        client.start()
        try:
            await asyncio.wait_for(done.wait(), 5)
            await until(lambda: client.stats().applied_sequence == 1, what="delta 1")
            await until(
                lambda: client.stats().dropped.get("malformed_message") == 2,
                what="the partial delta dropped",
            )
            cs = client.stats()
            assert sink.flows == {good, flow(2)}  # nothing of the partial delta applied
            assert cs.dropped == {"malformed_address": 1, "malformed_message": 2}
            assert cs.applied_sequence == 1
            assert cs.connected and cs.reconnects == 0
        finally:
            await client.stop()
            await server.stop(0)

    run(body)


def test_heartbeat_timeout_detects_a_frozen_active(cfg: ClusterConfig, tls_files: TlsFiles) -> None:
    async def body() -> None:
        source = Source([flow(i) for i in range(10)])
        async with running(cfg, tls_files, source, proxy=True) as (server, client, sink, px):
            assert px is not None
            assert await client.wait_synced(10)
            accepted = px.accepted
            px.freeze()
            frozen_at = time.monotonic()
            await until(lambda: client.stats().reconnects >= 1, what="timeout detection")
            detected = time.monotonic() - frozen_at
            assert "no message" in (client.stats().last_error or "")
            # detection follows the heartbeat timeout (1 s), not TCP or keepalive timers
            assert 0.8 <= detected < 3.0
            px.thaw()
            await until(lambda: px.accepted > accepted, what="a new connection")
            server.push(upserts=[flow(99)])
            server.flush()
            await until(lambda: flow(99) in sink.flows, what="delta after reconnect")
            assert client.stats().connected

    run(body)


def test_slow_snapshot_is_covered_by_heartbeats(cfg: ClusterConfig, tls_files: TlsFiles) -> None:
    async def body() -> None:
        source = SlowSource([flow(i) for i in range(10)])
        async with running(cfg, tls_files, source) as (_, client, sink, _):
            assert await client.wait_synced(10)
            assert len(sink.flows) == 10
            cs = client.stats()
            assert cs.reconnects == 0 and cs.snapshots == 1 and cs.resumes == 0

    run(body)


def test_insecure_mode_streams_when_explicitly_allowed(cfg: ClusterConfig) -> None:
    async def body() -> None:
        sec = SyncSecurity.from_config(cfg, "lb1", allow_insecure=True)
        server = FlowSyncServer(
            Source([flow(1)]), term=TERM, security=sec, address="127.0.0.1:0", options=SERVER_FAST
        )
        port = await server.start()
        sink = FakeDataplane()
        client = FlowSyncClient(
            config=cfg,
            node="lb2",
            peer="lb1",
            target=f"127.0.0.1:{port}",
            dataplane=sink,
            security=SyncSecurity.from_config(cfg, "lb2", allow_insecure=True),
            known_term=TERM,
            options=FAST,
        )
        client.start()
        try:
            assert await client.wait_synced(10)
            assert sink.flows == {flow(1)}
            assert server.stats().peers[0].node == "lb2"  # from the subscribe message
        finally:
            await client.stop()
            await server.stop(0)

    run(body)


class GatedDataplane(FakeDataplane):
    """A sink whose writes block until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()  # open for the snapshot
        self.entered = threading.Event()

    def install_flows(self, flows: Iterable[Flow]) -> int:
        self.entered.set()
        self.gate.wait(10)
        return super().install_flows(flows)


async def held_write(server: FlowSyncServer, client: FlowSyncClient, sink: GatedDataplane,
                     f: Flow) -> None:  # fmt: skip
    """Once synced, push f and return while its write is held at the gate."""
    assert await client.wait_synced(5)
    sink.gate.clear()
    server.push(upserts=[f])
    server.flush()
    await asyncio.to_thread(sink.entered.wait, 5)


def test_a_batch_is_acknowledged_only_once_its_write_has_landed(
    cfg: ClusterConfig, tls_files: TlsFiles
) -> None:
    # Writes are pipelined (the next message is read while one is written), so the ack
    # must wait for the write itself, not for the message to have been read.
    sink = GatedDataplane()

    async def body() -> None:
        async with running(cfg, tls_files, Source(), sink=sink) as (server, client, _, _):
            await held_write(server, client, sink, flow(1))
            await asyncio.sleep(0.3)  # heartbeats and acks go on meanwhile
            assert server.stats().peers[0].acked_sequence == 0
            assert client.stats().applied_sequence == 0
            sink.gate.set()
            await until(
                lambda: server.stats().peers[0].acked_sequence == 1, what="the ack of delta 1"
            )
            assert sink.flows == {flow(1)}

    run(body)


def test_stop_waits_for_the_write_in_flight(cfg: ClusterConfig, tls_files: TlsFiles) -> None:
    sink = GatedDataplane()

    async def body() -> None:
        async with running(cfg, tls_files, Source(), sink=sink) as (server, client, _, _):
            await held_write(server, client, sink, flow(2))
            stopping = asyncio.create_task(client.stop())
            await asyncio.sleep(0.2)
            assert not stopping.done()  # the write has not landed yet
            sink.gate.set()
            await asyncio.wait_for(stopping, 5)
            assert sink.flows == {flow(2)}  # once stop() returns, the flow is installed

    run(body)
