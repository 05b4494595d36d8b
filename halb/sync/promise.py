"""The peer channel of the hold (halb.ha.hold): the ``Promise`` call of FlowSync.

Server side: ``PromiseDesk`` is what the node's FlowSyncServer asks once it has checked
that the caller's certificate names the holder it claims (the agent implements it with
each group's PromiseBook). Client side: ``PromiseClient`` asks one peer, on a channel
kept per peer and pinned to the peer's certificate name like the sync client's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import grpc

from halb.ha.hold import Grant, Refusal
from halb.model import Term
from halb.sync import tls
from halb.sync.pb import SERVICE, sync_pb2

__all__ = ["PROMISE_METHOD", "PromiseClient", "PromiseDesk", "reply_of"]

log = logging.getLogger(__name__)

PROMISE_METHOD = f"/{SERVICE}/Promise"


class PromiseDesk(Protocol):
    def answer(self, group: str, holder: str, term: Term) -> Grant | Refusal:
        """``holder`` (authenticated) asks this node to promise for ``group``."""
        ...


def reply_of(answer: Grant | Refusal, round_: int) -> Any:
    if isinstance(answer, Grant):
        return sync_pb2.PromiseReply(round=round_, granted=answer.duration)
    return sync_pb2.PromiseReply(round=round_, granted=0.0, refusal=answer.reason)


class PromiseClient:
    """Asks peers for promises (the holder's side); one channel per peer."""

    def __init__(self, security: tls.SyncSecurity, addresses: Mapping[str, str]) -> None:
        self._security = security
        self._addresses = dict(addresses)  # peer -> host:port of its sync server
        self._channels: dict[str, Any] = {}

    def _channel(self, peer: str) -> Any:
        ch = self._channels.get(peer)
        if ch is None:
            target = self._addresses[peer]
            # A hold lives on calls of tens of ms: gRPC's default reconnect backoff
            # (1 s and up) after one failed connect would outlast the promises.
            opts: list[tuple[str, str | int]] = [
                ("grpc.initial_reconnect_backoff_ms", 50),
                ("grpc.min_reconnect_backoff_ms", 50),
                ("grpc.max_reconnect_backoff_ms", 500),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
            ]
            if self._security.client is None:
                ch = grpc.aio.insecure_channel(target, options=opts)
            else:
                opts.append(("grpc.ssl_target_name_override", peer))
                ch = grpc.aio.secure_channel(target, self._security.client, options=opts)
            self._channels[peer] = ch
        return ch

    def connect(self, peers: Iterable[str]) -> None:
        """Open the channels now (a term's start), so the first request of an outage
        does not pay for connecting within its short deadline."""
        for peer in peers:
            if peer in self._addresses:
                self._channel(peer).get_state(try_to_connect=True)

    async def ask(
        self, peer: str, group: str, term: Term, round_: int, timeout: float
    ) -> Grant | Refusal:
        """One request; raises grpc.aio.AioRpcError (or KeyError for a peer with no
        address) when the peer does not answer in ``timeout``."""
        call = self._channel(peer).unary_unary(
            PROMISE_METHOD,
            request_serializer=sync_pb2.PromiseRequest.SerializeToString,
            response_deserializer=sync_pb2.PromiseReply.FromString,
        )
        req = sync_pb2.PromiseRequest(
            group=group,
            holder=self._security.node,
            term=sync_pb2.Term(lease_id=term.lease_id, revision=term.revision),
            round=round_,
        )
        reply = await call(req, timeout=timeout, wait_for_ready=False)
        if reply.round != round_:
            return Refusal(f"answered round {reply.round}, not {round_}")
        if reply.granted > 0:
            return Grant(float(reply.granted))
        return Refusal(str(reply.refusal) or "refused")

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()
