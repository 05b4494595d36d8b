"""FlowSync server: the node's one gRPC endpoint, serving every group the node holds.

Started once per agent (halb.agent.syncroles), it routes each standby's subscription
to the feed (halb.sync.feed.FlowFeed) of the VIP group the Subscribe names: one feed
per group while this node holds that group's term, with that term, its own session
and sequences, and only that group's flows. A subscription for a group the node does
not hold (any more) is refused with NOT_FOUND, so the standby retries until etcd tells
it who the new active is.

It also answers the hold's ``Promise`` calls (halb.sync.promise) once a desk is set
(``server.promises``), after checking that the caller's certificate names the holder
it claims.

A server built with a source and a term has one feed of group "" and answers a
Subscribe that names no group with it (tests, benches, one-group tools).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import grpc

from halb.dataplane.base import FlowSnapshot
from halb.flows.records import FlowBatch
from halb.ha.hold import Refusal
from halb.model import Term
from halb.sync import tls
from halb.sync.feed import FlowFeed, PeerStats, ServerOptions, ServerStats
from halb.sync.pb import SERVICE, sync_pb2
from halb.sync.promise import PromiseDesk, reply_of

__all__ = ["FlowSyncServer", "PeerStats", "ServerOptions", "ServerStats"]

log = logging.getLogger(__name__)


class FlowSyncServer:
    def __init__(
        self,
        source: FlowSnapshot | None = None,
        *,
        term: Term | None = None,
        security: tls.SyncSecurity,
        address: str,
        options: ServerOptions | None = None,
    ) -> None:
        """With source and term: one feed of group "" from the start."""
        self._security = security
        self._address = address
        self._opt = options or ServerOptions()
        self._feeds: dict[str, FlowFeed] = {}
        self._server: Any = None
        self._bound: str | None = None
        self._refused: dict[str, int] = {}
        # Answers Promise calls (halb.ha.hold); None: every request is refused.
        self.promises: PromiseDesk | None = None
        if source is not None:
            if term is None:
                raise ValueError("a FlowSyncServer built with a source needs its term")
            self.add_feed("", source, term)

    # -- feeds ---------------------------------------------------------------------

    def add_feed(self, group: str, source: FlowSnapshot, term: Term) -> FlowFeed:
        """Serve ``group`` under ``term`` from now on (a feed of an older term of the
        group ends)."""
        old = self._feeds.get(group)
        if old is not None:
            old.close()
        feed = FlowFeed(source, term=term, group=group, options=self._opt)
        self._feeds[group] = feed
        log.info("flow sync: serving group %r for term %s (session %x)", group, term,
                 feed.session)  # fmt: skip
        return feed

    def remove_feed(self, feed: FlowFeed) -> None:
        """The feed's term is over: its standbys' streams end."""
        feed.close()
        if self._feeds.get(feed.group) is feed:
            del self._feeds[feed.group]
            log.info("flow sync: group %r (term %s) no longer served", feed.group, feed.term)

    @property
    def feeds(self) -> Mapping[str, FlowFeed]:
        return dict(self._feeds)

    def _only(self) -> FlowFeed:
        if len(self._feeds) != 1:
            raise RuntimeError(f"this server has {len(self._feeds)} feeds, not one")
        return next(iter(self._feeds.values()))

    # The one-feed shape (a server built with a source and a term).

    @property
    def term(self) -> Term:
        return self._only().term

    @property
    def session(self) -> int:
        return self._only().session

    @property
    def head_sequence(self) -> int:
        return self._only().head_sequence

    def push(self, upserts: FlowBatch = b"", deletes: FlowBatch = b"") -> None:
        self._only().push(upserts, deletes)

    def push_threadsafe(
        self, loop: asyncio.AbstractEventLoop, upserts: FlowBatch, deletes: FlowBatch
    ) -> None:
        self._only().push_threadsafe(loop, upserts, deletes)

    def flush(self) -> None:
        self._only().flush()

    def stats(self) -> ServerStats:
        return self._only().stats(self._bound, self._refused)

    def feed_stats(self) -> dict[str, ServerStats]:
        """Per group served: its feed's stats."""
        return {g: f.stats(self._bound, self._refused) for g, f in self._feeds.items()}

    @property
    def refused(self) -> dict[str, int]:
        return dict(self._refused)

    # -- lifecycle -----------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._bound is None:
            raise RuntimeError("server not started")
        return int(self._bound.rpartition(":")[2])

    @property
    def address(self) -> str | None:
        return self._bound

    async def start(self) -> int:
        """Bind and serve; returns the bound port (address may use port 0)."""
        opts = [
            ("grpc.max_send_message_length", self._opt.max_message_bytes),
            ("grpc.max_receive_message_length", 1024 * 1024),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ]
        server = grpc.aio.server(options=opts)
        handler = grpc.stream_stream_rpc_method_handler(
            self._sync,
            request_deserializer=sync_pb2.SyncRequest.FromString,
            response_serializer=_identity,
        )
        promise = grpc.unary_unary_rpc_method_handler(
            self._promise,
            request_deserializer=sync_pb2.PromiseRequest.FromString,
            response_serializer=sync_pb2.PromiseReply.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Sync": handler, "Promise": promise}),)
        )
        if self._security.server is None:
            port = server.add_insecure_port(self._address)
        else:
            port = server.add_secure_port(self._address, self._security.server)
        if port == 0:
            raise OSError(f"flow sync server cannot bind {self._address}")
        await server.start()
        self._server = server
        host = self._address.rpartition(":")[0]
        self._bound = f"{host}:{port}"
        log.info(
            "flow sync server listening on %s (%s)",
            self._bound,
            "plaintext" if self._security.insecure else "mTLS",
        )
        return int(port)

    async def stop(self, grace: float | None = 0.0) -> None:
        # No grace by default: a standby's stream never ends by itself, so any grace is
        # waited out in full, and the caller (a hand-over, the agent's exit) waits too.
        for feed in list(self._feeds.values()):
            feed.close()
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)
            log.info("flow sync server on %s stopped", self._bound)

    async def serve(self) -> None:
        """Run until cancelled."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self.stop())

    async def __aenter__(self) -> FlowSyncServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the stream ----------------------------------------------------------------

    def _refuse(self, reason: str) -> None:
        self._refused[reason] = self._refused.get(reason, 0) + 1

    async def _sync(self, request_iterator: Any, context: Any) -> None:
        peer_addr = str(context.peer())
        node = await self._authenticate(context, peer_addr)
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("msg") != "subscribe":
            self._refuse("no_subscribe")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first message must be subscribe")
        sub = first.subscribe
        if self._security.insecure:
            node = sub.node or peer_addr
        elif sub.node and sub.node != node:
            log.warning("standby %s (certificate) subscribed as %r", node, sub.node)
        feed = self._feed_for(str(sub.group))
        if feed is None:
            self._refuse("unknown_group")
            held = ", ".join(repr(g) for g in sorted(self._feeds)) or "none"
            log.info("flow sync: standby %s asked for group %r, not held here (held: %s)",
                     node, sub.group, held)  # fmt: skip
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"this node does not hold group {sub.group!r} (it holds: {held})",
            )
        assert feed is not None
        await feed.stream(context, node, peer_addr, sub)

    async def _promise(self, request: Any, context: Any) -> Any:
        peer_addr = str(context.peer())
        node = await self._authenticate(context, peer_addr)
        holder = str(request.holder)
        round_ = int(request.round)
        if not self._security.insecure and holder != node:
            self._refuse("promise_wrong_holder")
            log.warning("promise request from %s (certificate %s) claims to be holder %r",
                        peer_addr, node, holder)  # fmt: skip
            return reply_of(Refusal(f"certificate names {node}, not {holder}"), round_)
        desk = self.promises
        if desk is None:
            return reply_of(Refusal("this node does not hold promises"), round_)
        term = Term(int(request.term.lease_id), int(request.term.revision))
        return reply_of(desk.answer(str(request.group), holder, term), round_)

    def _feed_for(self, group: str) -> FlowFeed | None:
        if group or len(self._feeds) != 1:
            return self._feeds.get(group)
        return next(iter(self._feeds.values()))  # no group named: the only one

    async def _authenticate(self, context: Any, peer_addr: str) -> str:
        if self._security.insecure:
            return peer_addr
        name = tls.authorized_name(context.auth_context(), self._security.allowed_peers)
        if name is None:
            names = sorted(tls.peer_names(context.auth_context()))
            self._refuse("unknown_peer")
            log.warning(
                "refused flow sync to %s: its certificate names %s, none of them a node of "
                "the config",
                peer_addr,
                names or "nothing",
            )
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "client certificate names no node of the cluster"
            )
        assert name is not None
        return name


def _identity(data: bytes) -> bytes:
    return data
