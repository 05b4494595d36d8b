"""One VIP group's flows under one term, as the node's FlowSync server streams them.

A FlowFeed lives as long as its group's term on this node (halb.sync.server routes
each standby's subscription to the feed of the group it names). The node's flow
source pushes the group's changes into it; the feed coalesces them into numbered
batches, encodes each batch once, keeps a bounded backlog of them and streams them to
every subscribed standby, after a snapshot or from the standby's resume point.

Concurrency rules: push()/flush() and every stream run on the event loop thread; only
the source's snapshot_records() runs in a worker thread. A snapshot reflects at least
every batch up to the head sequence read *before* it was taken; replaying the batches
after that head is idempotent (upserts and deletes of whole flows), so nothing is
missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import grpc

from halb.aio import within
from halb.dataplane.base import FlowSnapshot
from halb.flows import records
from halb.flows.records import FlowBatch
from halb.model import Term
from halb.sync import codec
from halb.sync.batching import Batcher, Delta

__all__ = ["FlowFeed", "PeerStats", "ServerOptions", "ServerStats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerOptions:
    batch_size: int = 2048  # max flows per DELTA batch
    snapshot_batch_size: int = 4096  # max flows per SNAPSHOT message
    flush_interval: float = 0.002  # max time a pushed delta waits for its batch to fill
    heartbeat_interval: float = 0.5  # sent when nothing else was for this long
    peer_timeout: float = 5.0  # no request (ack) from a standby for this long: drop it
    backlog_entries: int = 262_144  # flows kept for resume; beyond: full resync
    max_message_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PeerStats:
    node: str
    peer: str
    connected_at: float  # wall clock
    state: str  # "snapshot" | "streaming"
    sent_sequence: int
    acked_sequence: int
    lag_sequence: int
    lag_seconds: float  # age of the oldest batch sent but not acknowledged
    entries_sent: int
    snapshots: int


@dataclass(frozen=True, slots=True)
class ServerStats:
    term: Term
    session: int
    address: str | None
    head_sequence: int
    backlog_batches: int
    backlog_entries: int
    entries_published: int
    snapshots_sent: int
    resumes: int
    last_resync: float | None  # wall clock of the last full snapshot sent
    peers: tuple[PeerStats, ...]
    refused: dict[str, int] = field(default_factory=dict)
    group: str = ""


@dataclass(slots=True)
class _Entry:
    sequence: int
    data: bytes
    count: int
    created: float  # monotonic


@dataclass(slots=True)
class _Peer:
    node: str
    peer: str
    connected_at: float
    state: str = "snapshot"
    sent_sequence: int = 0
    acked_sequence: int = 0
    acked_at: float = 0.0
    entries_sent: int = 0
    snapshots: int = 0


class _Resync(Exception):
    """The standby fell out of the backlog; it needs a full snapshot."""


class FlowFeed:
    def __init__(
        self,
        source: FlowSnapshot,
        *,
        term: Term,
        group: str = "",
        options: ServerOptions | None = None,
    ) -> None:
        self._source = source
        self._term = term
        self._group = group
        self._opt = options or ServerOptions()
        # A random session id: sequence numbers of another feed (or term) never match.
        self._session = secrets.randbits(63) or 1
        self._seq = 0
        self._backlog: deque[_Entry] = deque()
        self._backlog_count = 0
        self._pending = Batcher(self._opt.batch_size)
        self._flush_handle: asyncio.TimerHandle | None = None
        self._woken_at = 0
        self._changed = asyncio.Event()
        self._peers: dict[int, _Peer] = {}
        self._closed = False
        self._entries_published = 0
        self._snapshots_sent = 0
        self._resumes = 0
        self._last_resync: float | None = None

    @property
    def term(self) -> Term:
        return self._term

    @property
    def session(self) -> int:
        return self._session

    @property
    def group(self) -> str:
        return self._group

    def close(self) -> None:
        """The term is over: streams end (their standbys reconnect), pushes stop."""
        self._closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._changed.set()

    # -- deltas --------------------------------------------------------------------

    def push(self, upserts: FlowBatch = b"", deletes: FlowBatch = b"") -> None:
        """Record one change set: Flow objects or packed records. Event-loop thread
        only (see push_threadsafe).

        upserts and deletes of one call must be disjoint; push twice to order changes
        to the same flow. Full batches go out at once, the rest after flush_interval.
        """
        if self._closed:
            return
        ups, dels = records.as_records(upserts), records.as_records(deletes)
        for delta in self._pending.push(ups, dels):
            self._publish(delta)
        if self._pending and self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(self._opt.flush_interval, self.flush)
        self._wake()

    def push_threadsafe(
        self, loop: asyncio.AbstractEventLoop, upserts: FlowBatch, deletes: FlowBatch
    ) -> None:
        """push() from an adapter's worker thread."""
        loop.call_soon_threadsafe(self.push, upserts, deletes)

    def flush(self) -> None:
        """Publish the pending changes now, without waiting for flush_interval."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        delta = self._pending.take()
        if delta is not None:
            self._publish(delta)
        self._wake()

    def _publish(self, delta: Delta) -> None:
        """Number and encode one batch, once for every standby, into the backlog."""
        self._seq += 1
        data = codec.delta_message(
            term=self._term,
            session=self._session,
            sequence=self._seq,
            upserts=delta.upserts,
            deletes=delta.deletes,
        )
        self._backlog.append(_Entry(self._seq, data, len(delta), time.monotonic()))
        self._backlog_count += len(delta)
        self._entries_published += len(delta)
        while self._backlog_count > self._opt.backlog_entries and len(self._backlog) > 1:
            self._backlog_count -= self._backlog.popleft().count

    def _wake(self) -> None:
        if self._backlog and self._backlog[-1].sequence != self._woken_at:
            self._woken_at = self._backlog[-1].sequence
            self._changed.set()
            self._changed = asyncio.Event()

    @property
    def head_sequence(self) -> int:
        return self._seq

    def _first_sequence(self) -> int:
        return self._backlog[0].sequence if self._backlog else self._seq + 1

    # -- the stream ----------------------------------------------------------------

    async def stream(self, context: Any, node: str, peer_addr: str, sub: Any) -> None:
        """Serve one standby's subscription (a Subscribe message) until it ends."""
        if sub.HasField("known_term"):
            known = codec.term_from_pb(sub.known_term)
            if codec.term_is_older(self._term, known):
                log.warning(
                    "standby %s knows term %s, newer than this server's %s: it will "
                    "ignore this stream; this node should lose leadership soon",
                    node,
                    known,
                    self._term,
                )
        key = id(context)
        now = time.monotonic()
        peer = _Peer(node=node, peer=peer_addr, connected_at=time.time(), acked_at=now)
        self._peers[key] = peer
        reader = asyncio.create_task(self._read_acks(context, peer))
        try:
            await self._stream(context, peer, int(sub.session), int(sub.last_sequence), reader)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self._peers.pop(key, None)
            log.info(
                "standby %s (%s) disconnected at sequence %d", node, peer_addr, peer.acked_sequence
            )

    async def _read_acks(self, context: Any, peer: _Peer) -> None:
        while True:
            req = await context.read()
            if req is grpc.aio.EOF:
                return
            # The sequence means something only once the standby is in sync with this
            # stream; before that an ack only says it is alive.
            if req.WhichOneof("msg") == "ack" and req.ack.snapshot_done:
                peer.acked_sequence = max(peer.acked_sequence, int(req.ack.sequence))
                peer.state = "streaming"
            peer.acked_at = time.monotonic()

    async def _stream(
        self, context: Any, peer: _Peer, session: int, last: int, reader: asyncio.Task[None]
    ) -> None:
        if session == self._session and self._first_sequence() - 1 <= last <= self._seq:
            cursor = last
            peer.acked_sequence = last
            peer.state = "streaming"
            self._resumes += 1
            log.info("standby %s resumes at sequence %d (head %d)", peer.node, last, self._seq)
        else:
            why = "first subscription" if session == 0 else "resume point outside the backlog"
            cursor = await self._send_snapshot(context, peer, why)
        hb = self._opt.heartbeat_interval
        last_sent = time.monotonic()
        while True:
            if reader.done():
                return  # the standby closed its side
            if self._closed:
                return  # the term is over: the standby reconnects and finds out why
            if time.monotonic() - peer.acked_at > self._opt.peer_timeout:
                log.warning(
                    "standby %s sent nothing for %.1f s; dropping its stream",
                    peer.node,
                    self._opt.peer_timeout,
                )
                return
            if cursor < self._seq:
                try:
                    cursor = await self._send_backlog(context, peer, cursor)
                except _Resync:
                    cursor = await self._send_snapshot(
                        context, peer, "fell behind the backlog while streaming"
                    )
                last_sent = time.monotonic()
                continue
            changed = self._changed
            timeout = max(0.0, hb - (time.monotonic() - last_sent))
            with contextlib.suppress(TimeoutError):
                await within(changed.wait(), timeout)
            if cursor >= self._seq and time.monotonic() - last_sent >= hb:
                await context.write(
                    codec.heartbeat_message(
                        term=self._term, session=self._session, head_sequence=self._seq
                    )
                )
                last_sent = time.monotonic()

    async def _send_backlog(self, context: Any, peer: _Peer, cursor: int) -> int:
        first = self._first_sequence()
        if cursor + 1 < first:
            raise _Resync
        i = cursor + 1 - first
        # Snapshot the slice: the backlog may be trimmed while we await writes.
        entries = [self._backlog[j] for j in range(i, len(self._backlog))]
        for e in entries:
            await context.write(e.data)
            peer.sent_sequence = e.sequence
            peer.entries_sent += e.count
            cursor = e.sequence
        return cursor

    async def _send_snapshot(self, context: Any, peer: _Peer, why: str) -> int:
        while True:
            peer.state = "snapshot"
            head = self._seq  # read before the snapshot: see the module docstring
            t0 = time.monotonic()
            flows = await self._take_snapshot(context)
            for data in codec.snapshot_messages(
                flows,
                term=self._term,
                session=self._session,
                sequence=head,
                batch_size=self._opt.snapshot_batch_size,
            ):
                await context.write(data)
            sent = records.count(flows)
            peer.entries_sent += sent
            peer.snapshots += 1
            peer.sent_sequence = head
            self._snapshots_sent += 1
            self._last_resync = time.time()
            log.info(
                "sent a full snapshot of %d flows at sequence %d to standby %s in %.3f s (%s)",
                sent,
                head,
                peer.node,
                time.monotonic() - t0,
                why,
            )
            if head + 1 >= self._first_sequence():
                return head
            why = "the backlog overflowed while the snapshot was being sent"

    async def _take_snapshot(self, context: Any) -> bytes:
        """The source's snapshot as records, taken in a thread, heartbeating meanwhile:
        dumping a large kernel table can outlast the standby's heartbeat timeout."""
        task = asyncio.ensure_future(asyncio.to_thread(self._source.snapshot_records))
        while True:
            done, _ = await asyncio.wait([task], timeout=self._opt.heartbeat_interval)
            if done:
                return task.result()
            await context.write(
                codec.heartbeat_message(
                    term=self._term,
                    session=self._session,
                    head_sequence=self._seq,
                    snapshot_pending=True,
                )
            )

    # -- stats ---------------------------------------------------------------------

    def stats(
        self, address: str | None = None, refused: dict[str, int] | None = None
    ) -> ServerStats:
        now = time.monotonic()
        peers = []
        for p in self._peers.values():
            lag_seconds = 0.0
            if p.acked_sequence < self._seq:
                first = self._first_sequence()
                idx = p.acked_sequence + 1 - first
                if 0 <= idx < len(self._backlog):
                    lag_seconds = now - self._backlog[idx].created
                elif self._backlog:
                    lag_seconds = now - self._backlog[0].created
            peers.append(
                PeerStats(
                    node=p.node,
                    peer=p.peer,
                    connected_at=p.connected_at,
                    state=p.state,
                    sent_sequence=p.sent_sequence,
                    acked_sequence=p.acked_sequence,
                    lag_sequence=self._seq - p.acked_sequence,
                    lag_seconds=lag_seconds,
                    entries_sent=p.entries_sent,
                    snapshots=p.snapshots,
                )
            )
        return ServerStats(
            term=self._term,
            session=self._session,
            address=address,
            group=self._group,
            head_sequence=self._seq,
            backlog_batches=len(self._backlog),
            backlog_entries=self._backlog_count,
            entries_published=self._entries_published,
            snapshots_sent=self._snapshots_sent,
            resumes=self._resumes,
            last_resync=self._last_resync,
            peers=tuple(sorted(peers, key=lambda p: p.node)),
            refused=dict(refused or {}),
        )
