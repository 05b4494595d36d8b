"""FlowSync client: runs on each standby, installs the active's flows locally.

It subscribes to the active node, installs the snapshot and then every delta batch
into its own dataplane, and acknowledges each batch once it is installed. It
reconnects with backoff and resumes from the last applied sequence.

What it refuses (and counts by reason, never crashing on it): batches from a term
older than the newest one it knows, flows whose VIP:port/protocol or backend are not
in the config, malformed addresses or ports, and messages that do not parse. A
sequence gap (a lost or malformed delta) forces a full resync.

State before address: wait_synced() resolves once a full snapshot is installed, and
stop() returns only after the dataplane write in progress has finished, so a
promoted node that awaits stop() knows every flow it received is in its dataplane.

Writes are pipelined one deep: a batch's dataplane write runs in a worker thread
while the next message is read and validated (the XDP write is mostly a syscall,
which releases the GIL); writes stay in order, and a batch is acknowledged (by a
separate task, the stream's only writer) only once its write has finished.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc

from halb.aio import cancel_and_wait, within
from halb.config import ClusterConfig
from halb.dataplane.base import Dataplane
from halb.flows import records
from halb.model import Term
from halb.sync import codec, tls
from halb.sync.codec import DecodedBatch, DropReason, RecordIndex
from halb.sync.pb import SYNC_METHOD

__all__ = ["ClientOptions", "ClientStats", "FlowSyncClient"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClientOptions:
    heartbeat_timeout: float = 2.0  # no message for this long: the stream is dead
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    connect_timeout: float = 5.0
    max_message_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ClientStats:
    node: str
    peer: str
    target: str
    connected: bool
    synced: bool
    known_term: Term | None
    stream_term: Term | None
    session: int
    applied_sequence: int
    head_sequence: int
    lag_sequence: int
    last_message_age: float | None
    flows: int  # flows currently held on behalf of the active
    entries_installed: int
    entries_deleted: int
    snapshots: int
    resumes: int
    reconnects: int
    last_resync: float | None  # wall clock of the last completed snapshot
    last_error: str | None
    dropped: dict[str, int] = field(default_factory=dict)
    stale_term_streams: int = 0


class _Reconnect(Exception):
    """End this stream and subscribe again (after backoff unless `now`)."""

    def __init__(self, why: str, *, full: bool = False, now: bool = False) -> None:
        super().__init__(why)
        self.full = full
        self.now = now


class FlowSyncClient:
    def __init__(
        self,
        *,
        config: ClusterConfig,
        node: str,
        peer: str,
        dataplane: Dataplane,
        security: tls.SyncSecurity,
        known_term: Term | None = None,
        target: str | None = None,
        options: ClientOptions | None = None,
    ) -> None:
        """peer: the node believed active (its certificate must name it); target:
        host:port to dial, default that node's sync_address."""
        self._node = node
        self._dp = dataplane
        self._security = security
        self._opt = options or ClientOptions()
        self._index = RecordIndex(config.services())
        self._peer = peer
        self._target = target or config.node(peer).sync_address
        self._known_term = known_term
        self._stream_term: Term | None = None
        self._session = 0
        self._applied = 0  # last DELTA sequence whose write has finished
        self._received = 0  # last DELTA sequence accepted for writing
        self._head = 0
        # The flows installed on the active's behalf, connection (record bytes [0, 38))
        # -> record: what a full resync must compare against to remove flows that
        # ended while we were away. By connection, so a flow that moved to another
        # backend replaces its old record instead of leaving it to be deleted later.
        self._mirror: dict[bytes, bytes] = {}
        self._snap_seen: dict[bytes, bytes] | None = None
        self._synced = asyncio.Event()
        self._connected = False
        self._in_sync = False
        self._last_msg: float | None = None
        self._inflight: asyncio.Future[Any] | None = None
        self._ack_due = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._call: Any = None
        self._drops: Counter[DropReason] = Counter()
        self._installed = 0
        self._deleted = 0
        self._snapshots = 0
        self._resumes = 0
        self._reconnects = 0
        self._stale_streams = 0
        self._last_resync: float | None = None
        self._last_error: str | None = None

    # -- control -------------------------------------------------------------------

    def set_term(self, term: Term) -> None:
        """The newest term known from etcd. Never moves back."""
        if self._known_term is None or codec.term_is_older(self._known_term, term):
            self._known_term = term

    def retarget(self, peer: str, target: str, term: Term | None = None) -> None:
        """Follow a new active node; the current stream ends and the next one goes there."""
        if term is not None:
            self.set_term(term)
        if (peer, target) != (self._peer, self._target):
            log.info("flow sync: following %s at %s (was %s)", peer, target, self._peer)
            self._peer, self._target = peer, target
            self._cancel_call()

    def update_config(self, config: ClusterConfig) -> None:
        self._index = RecordIndex(config.services())

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """True once a full snapshot has been installed (then stays true)."""
        try:
            await within(self._synced.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"flow-sync-client-{self._node}")
        return self._task

    async def stop(self) -> None:
        """End the stream and wait until the dataplane write in progress has finished."""
        task, self._task = self._task, None
        await cancel_and_wait(task, log, "flow sync with %s ended with an error", self._peer)
        await self.drain()

    async def drain(self) -> None:
        """Wait for the dataplane write in progress, if any."""
        fut = self._inflight
        if fut is not None:
            await asyncio.wait([fut])
            if not fut.cancelled() and fut.exception() is not None:
                log.error("flow sync: the last dataplane write failed: %s", fut.exception())
            if self._inflight is fut:
                self._inflight = None

    # -- the loop ------------------------------------------------------------------

    async def run(self) -> None:
        """Subscribe, apply, reconnect with backoff; until cancelled."""
        delay = self._opt.backoff_initial
        while True:
            try:
                await self._one_stream()
                why, now = "the active closed the stream", False
            except _Reconnect as exc:
                why, now = str(exc), exc.now
                if exc.full:
                    self._session = 0
            except grpc.aio.AioRpcError as exc:
                why, now = f"{exc.code().name}: {exc.details()}", False
            except asyncio.InvalidStateError:
                # An ack written after the active ended the RPC: the stream is over.
                why, now = "the active ended the stream", False
            except Exception as exc:
                # A sync failure must never take the agent (and the election) with it.
                log.exception("flow sync with %s failed unexpectedly", self._peer)
                why, now = f"unexpected error: {exc!r}", False
            finally:
                # A stream that got in sync proves the peer works: restart the backoff.
                progressed = self._in_sync
                self._connected = False
                self._in_sync = False
            self._last_error = why
            self._reconnects += 1
            if progressed:
                delay = self._opt.backoff_initial
            if now:
                log.info("flow sync with %s: %s; resubscribing", self._peer, why)
                continue
            # Jitter so several standbys do not reconnect in lockstep.
            wait = delay * (0.5 + random.random() / 2)
            log.warning(
                "flow sync with %s at %s interrupted: %s; retrying in %.2f s",
                self._peer,
                self._target,
                why,
                wait,
            )
            await asyncio.sleep(wait)
            delay = min(delay * 2, self._opt.backoff_max)

    def _channel(self) -> Any:
        opts: list[tuple[str, str | int]] = [
            ("grpc.max_receive_message_length", self._opt.max_message_bytes),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            # A fresh TCP connection each stream: a reconnect must not reuse a
            # subchannel stuck on a dead peer.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if self._security.client is None:
            return grpc.aio.insecure_channel(self._target, options=opts)
        opts.append(("grpc.ssl_target_name_override", self._peer))
        return grpc.aio.secure_channel(self._target, self._security.client, options=opts)

    def _cancel_call(self) -> None:
        if self._call is not None:
            self._call.cancel()

    async def _one_stream(self) -> None:
        """One subscription, until it ends or fails."""
        # The resume point is what is in the dataplane: let the last write land first.
        await self._settle()
        self._received = self._applied
        async with self._channel() as channel:
            call = channel.stream_stream(
                SYNC_METHOD, request_serializer=_identity, response_deserializer=_identity
            )(wait_for_ready=False)
            self._call = call
            acker: asyncio.Task[None] | None = None
            try:
                await call.write(
                    codec.request_subscribe(
                        node=self._node,
                        known_term=self._known_term,
                        session=self._session,
                        last_sequence=self._applied,
                    )
                )
                self._snap_seen = None
                self._in_sync = False
                self._ack_due.clear()
                acker = asyncio.create_task(self._send_acks(call))
                timeout = self._opt.heartbeat_timeout
                while True:
                    if acker.done():
                        acker.result()  # its error ends the stream
                        return
                    try:
                        data = await within(call.read(), timeout)
                    except TimeoutError:
                        raise _Reconnect(
                            f"no message (not even a heartbeat) for {timeout:.1f} s"
                        ) from None
                    if data is grpc.aio.EOF:
                        return
                    self._connected = True
                    self._last_msg = time.monotonic()
                    result = codec.decode_response(data, self._index, self._drops, self._known_term)
                    if result is DropReason.STALE_TERM:
                        self._stale_streams += 1
                        raise _Reconnect(
                            f"the stream's term is older than the known term {self._known_term}"
                        )
                    if isinstance(result, DropReason):
                        # A lost delta shows up as a sequence gap and forces a resync.
                        self._drops[result] += 1
                        log.warning("flow sync: dropped a message from %s (%s)", self._peer, result)
                        continue
                    await self._apply(result)
                    # Ack every message: liveness for the active's dead-peer check (a long
                    # snapshot has no heartbeats); finished writes ask for one as well.
                    self._ack_due.set()
            finally:
                self._call = None
                if acker is not None:
                    acker.cancel()
                    if acker.done() and not acker.cancelled():
                        acker.exception()  # seen: the stream is over either way
                call.cancel()

    async def _send_acks(self, call: Any) -> None:
        """The stream's only writer after the subscription: the newest applied state,
        whenever asked."""
        while True:
            await self._ack_due.wait()
            self._ack_due.clear()
            await call.write(codec.request_ack(self._applied, self._in_sync))

    # -- applying ------------------------------------------------------------------

    async def _apply(self, b: DecodedBatch) -> None:
        """Apply one decoded message to the dataplane and the local bookkeeping."""
        if self._known_term is None or codec.term_is_older(self._known_term, b.term):
            self._known_term = b.term  # a newer leader than etcd told us about yet
        if b.kind == "snapshot":
            await self._apply_snapshot(b)
            return
        if b.snapshot_pending:
            return  # the active is taking a snapshot for us: only proof of life
        if not self._in_sync:
            # No snapshot on this stream: the server accepted our resume point, so its
            # first delta or heartbeat carries our session.
            if self._snap_seen is not None or b.session != self._session or not self._session:
                raise _Reconnect(f"unexpected {b.kind} before the snapshot", full=True, now=True)
            self._in_sync = True
            self._resumes += 1
            self._synced.set()
            log.info("flow sync with %s resumed at sequence %d", self._peer, self._applied)
        if b.kind == "heartbeat":
            self._head = max(b.sequence, self._received)
            return
        if b.sequence != self._received + 1:
            raise _Reconnect(
                f"sequence gap: got {b.sequence} after {self._received}", full=True, now=True
            )
        seq = b.sequence
        await self._write(b.deletes, b.upserts, applied=seq)
        self._received = seq
        # Recorded before the write lands: if it fails, the stream restarts and a full
        # resync compares against this; deleting a flow never installed is harmless.
        if b.deletes:
            pop = self._mirror.pop
            for k in records.conn_keys(b.deletes):
                pop(k, None)
        if b.upserts:
            self._mirror.update(records.by_conn(b.upserts))
        self._head = max(self._head, seq)

    async def _apply_snapshot(self, b: DecodedBatch) -> None:
        if b.snapshot_begin:
            self._in_sync = False
            self._snap_seen = {}
            self._session = 0  # no valid resume point until this snapshot completes
            self._stream_term = b.term
        elif self._snap_seen is None:
            raise _Reconnect("a snapshot continued without its beginning", full=True, now=True)
        assert self._snap_seen is not None
        self._snap_seen.update(records.by_conn(b.upserts))
        await self._write(b"", b.upserts)
        if not b.snapshot_end:
            return
        seen, self._snap_seen = self._snap_seen, None
        stale = [self._mirror[k] for k in self._mirror.keys() - seen.keys()]
        if stale:
            # Flows learned earlier that the active no longer has: they ended while we
            # were disconnected, or belonged to a previous active.
            await self._write(b"".join(stale), b"")
        await self._settle()  # synced means installed
        self._mirror = seen
        self._session = b.session
        self._applied = self._received = b.sequence
        self._head = max(self._head, b.sequence)
        self._snapshots += 1
        self._last_resync = time.time()
        self._in_sync = True
        self._synced.set()
        log.info(
            "flow sync: installed a snapshot of %d flows from %s "
            "(term %s, sequence %d, %d stale removed)",
            len(seen),
            self._peer,
            b.term,
            b.sequence,
            len(stale),
        )

    async def _write(self, deletes: bytes, upserts: bytes, *, applied: int = 0) -> None:
        """Start a dataplane write once the one in flight has finished, and return
        without waiting for it. ``applied``: the DELTA sequence this write completes."""
        await self._settle()
        if not deletes and not upserts:
            self._applied = max(self._applied, applied)
            return
        fut = asyncio.ensure_future(asyncio.to_thread(self._write_blocking, deletes, upserts))
        self._inflight = fut
        if applied:

            def landed(f: asyncio.Future[Any]) -> None:
                if not f.cancelled() and f.exception() is None:
                    self._applied = max(self._applied, applied)
                    self._ack_due.set()

            fut.add_done_callback(landed)

    async def _settle(self) -> None:
        """Wait for the write in flight; its error, if any, is raised here once."""
        fut = self._inflight
        if fut is None:
            return
        try:
            # Shielded: cancelling the stream must not abandon a half-done dataplane
            # write that stop()/drain() has to wait for.
            await asyncio.shield(fut)
        finally:
            if fut.done() and self._inflight is fut:
                self._inflight = None

    def _write_blocking(self, deletes: bytes, upserts: bytes) -> None:
        if deletes:
            self._deleted += records.delete(self._dp, deletes)
        if upserts:
            self._installed += records.install(self._dp, upserts)

    # -- stats ---------------------------------------------------------------------

    def stats(self) -> ClientStats:
        return ClientStats(
            node=self._node,
            peer=self._peer,
            target=self._target,
            connected=self._connected,
            synced=self.synced,
            known_term=self._known_term,
            stream_term=self._stream_term,
            session=self._session,
            applied_sequence=self._applied,
            head_sequence=self._head,
            lag_sequence=max(0, self._head - self._applied),
            last_message_age=None if self._last_msg is None else time.monotonic() - self._last_msg,
            flows=len(self._mirror),
            entries_installed=self._installed,
            entries_deleted=self._deleted,
            snapshots=self._snapshots,
            resumes=self._resumes,
            reconnects=self._reconnects,
            last_resync=self._last_resync,
            last_error=self._last_error,
            dropped={str(k): v for k, v in sorted(self._drops.items())},
            stale_term_streams=self._stale_streams,
        )


def _identity(data: bytes) -> bytes:
    return data
