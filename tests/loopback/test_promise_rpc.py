"""The hold's Promise call over real gRPC and mTLS on loopback: the server checks the
caller's certificate against the holder it claims, and a desk's answer arrives intact."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from halb.config import ClusterConfig, TlsFiles, parse_config
from halb.ha.hold import Grant, Refusal
from halb.model import Term
from halb.sync import certs
from halb.sync.pb import sync_pb2
from halb.sync.promise import PROMISE_METHOD, PromiseClient
from halb.sync.server import FlowSyncServer
from halb.sync.tls import SyncSecurity
from halb.testing.sync_cluster import NODES, two_node_doc

pytestmark = pytest.mark.loopback

TERM = Term(lease_id=0xABC, revision=7)
CONFIG: dict[str, Any] = two_node_doc("t", ["10.0.0.21", "10.0.0.22"])


class Desk:
    def __init__(self, answer: Grant | Refusal) -> None:
        self.reply = answer
        self.asked: list[tuple[str, str, Term]] = []

    def answer(self, group: str, holder: str, term: Term) -> Grant | Refusal:
        self.asked.append((group, holder, term))
        return self.reply


@pytest.fixture(scope="module")
def cfg() -> ClusterConfig:
    return parse_config(CONFIG)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory, cfg: ClusterConfig) -> TlsFiles:
    return certs.write_cluster_certs(cfg, tmp_path_factory.mktemp("pki"))


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 30))


async def _server(files: TlsFiles, desk: Desk | None) -> tuple[FlowSyncServer, str]:
    server = FlowSyncServer(
        security=SyncSecurity.from_files(files, "lb2", NODES), address="127.0.0.1:0"
    )
    server.promises = desk
    port = await server.start()
    return server, f"127.0.0.1:{port}"


def test_a_grant_and_a_refusal_reach_the_holder(tls_files: TlsFiles) -> None:
    async def body() -> None:
        desk = Desk(Grant(0.5))
        server, addr = await _server(tls_files, desk)
        client = PromiseClient(SyncSecurity.from_files(tls_files, "lb1", NODES), {"lb2": addr})
        try:
            assert await client.ask("lb2", "web", TERM, 3, timeout=2.0) == Grant(0.5)
            assert desk.asked == [("web", "lb1", TERM)]
            desk.reply = Refusal("reaches etcd")
            assert await client.ask("lb2", "web", TERM, 4, timeout=2.0) == Refusal("reaches etcd")
        finally:
            await client.close()
            await server.stop()

    run(body)


def test_a_caller_claiming_another_holder_is_refused_and_counted(tls_files: TlsFiles) -> None:
    async def body() -> None:
        desk = Desk(Grant(0.5))
        server, addr = await _server(tls_files, desk)
        sec = SyncSecurity.from_files(tls_files, "lb1", NODES)
        opts = [("grpc.ssl_target_name_override", "lb2")]
        try:
            async with grpc.aio.secure_channel(addr, sec.client, options=opts) as ch:
                call = ch.unary_unary(
                    PROMISE_METHOD,
                    request_serializer=sync_pb2.PromiseRequest.SerializeToString,
                    response_deserializer=sync_pb2.PromiseReply.FromString,
                )
                # lb1's certificate, asking as lb2 (so that lb2 would be the holder).
                reply = await call(sync_pb2.PromiseRequest(group="web", holder="lb2", round=9))
            assert reply.granted == 0 and reply.round == 9
            assert "certificate names lb1, not lb2" in reply.refusal
            assert desk.asked == []  # the desk never saw it: nobody got bound
            assert server.refused == {"promise_wrong_holder": 1}
        finally:
            await server.stop()

    run(body)


def test_a_server_without_a_desk_refuses_and_a_dead_peer_raises(tls_files: TlsFiles) -> None:
    async def body() -> None:
        server, addr = await _server(tls_files, None)
        client = PromiseClient(
            SyncSecurity.from_files(tls_files, "lb1", NODES),
            {"lb2": addr, "lb3": "127.0.0.1:9"},  # nothing listens on port 9
        )
        try:
            ans = await client.ask("lb2", "web", TERM, 1, timeout=2.0)
            assert isinstance(ans, Refusal) and "does not hold promises" in ans.reason
            with pytest.raises(grpc.aio.AioRpcError):
                await client.ask("lb3", "web", TERM, 1, timeout=0.3)
        finally:
            await client.close()
            await server.stop()

    run(body)
