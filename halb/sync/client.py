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

The bookkeeping (sequences, acks, term checks, resync decisions, what to write) is
halb.sync.session.ClientSession; this module is the I/O around it.

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
from dataclasses import dataclass, field
from typing import Any

import grpc

from halb.aio import cancel_and_wait, within
from halb.config import ClusterConfig, group_services
from halb.dataplane.base import Dataplane
from halb.flows.records import RecordIndex
from halb.model import Service, Term
from halb.sync import tls
from halb.sync.pb import SYNC_METHOD
from halb.sync.session import ClientSession, Reconnect, Synced, Write

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
    group: str
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

    def __init__(self, why: str, *, now: bool = False) -> None:
        super().__init__(why)
        self.now = now


def services_of(config: ClusterConfig, group: str) -> list[Service]:
    """The services whose flows a stream of ``group`` may carry ("": every group's);
    none for a group the config no longer has."""
    if not group:
        return config.services()
    return [s for g in config.vip_groups if g.name == group for s in group_services(g)]


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
        group: str = "",
    ) -> None:
        """peer: the node believed active (its certificate must name it); target:
        host:port to dial, default that node's sync_address; group: the VIP group
        followed (only its services' flows are accepted), "" for a server's only one."""
        self._node = node
        self._group = group
        self._dp = dataplane
        self._security = security
        self._opt = options or ClientOptions()
        self._peer = peer
        self._target = target or config.node(peer).sync_address
        self._s = ClientSession(RecordIndex(services_of(config, group)), known_term=known_term)
        self._synced = asyncio.Event()
        self._connected = False
        self._last_msg: float | None = None
        self._inflight: asyncio.Future[Any] | None = None
        self._ack_due = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._call: Any = None
        self._installed = 0
        self._deleted = 0
        self._snapshots = 0  # installed (counted once every write has landed)
        self._resumes = 0
        self._reconnects = 0
        self._last_resync: float | None = None
        self._last_error: str | None = None

    # -- control -------------------------------------------------------------------

    def set_term(self, term: Term) -> None:
        """The newest term known from etcd. Never moves back."""
        self._s.set_term(term)

    def retarget(self, peer: str, target: str, term: Term | None = None) -> None:
        """Follow a new active node; the current stream ends and the next one goes there."""
        if term is not None:
            self.set_term(term)
        if (peer, target) != (self._peer, self._target):
            log.info("flow sync: following %s at %s (was %s)", peer, target, self._peer)
            self._peer, self._target = peer, target
            self._cancel_call()

    def update_config(self, config: ClusterConfig) -> None:
        self._s.update_index(RecordIndex(services_of(config, self._group)))

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
        # Re-cancelled until it ends: the loop has no cleanup to protect (the write in
        # flight is shielded and drained below), and a cancellation swallowed as a call
        # failed would leave it retrying while the runtime waits here (seen: a standby
        # stuck before its campaign, then unable to stop).
        await cancel_and_wait(
            task, log, "flow sync with %s ended with an error", self._peer, again=0.5
        )
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
                progressed = self._s.in_sync
                self._connected = False
                self._s.in_sync = False
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
        async with self._channel() as channel:
            call = channel.stream_stream(
                SYNC_METHOD, request_serializer=_identity, response_deserializer=_identity
            )(wait_for_ready=False)
            self._call = call
            acker: asyncio.Task[None] | None = None
            try:
                await call.write(self._s.subscribe(node=self._node, group=self._group))
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
                    dropped = sum(self._s.drops.values())
                    actions = self._s.receive(data)
                    if not actions and sum(self._s.drops.values()) > dropped:
                        log.warning("flow sync: dropped a message from %s", self._peer)
                    for action in actions:
                        await self._do(action)
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
            await call.write(self._s.ack())

    # -- applying ------------------------------------------------------------------

    async def _do(self, action: Write | Synced | Reconnect) -> None:
        match action:
            case Write(deletes=deletes, upserts=upserts, applied=applied):
                await self._write(deletes, upserts, applied=applied)
            case Synced(resumed=resumed, flows=flows, stale=stale):
                await self._settle()  # synced means installed
                self._synced.set()
                if resumed:
                    self._resumes += 1
                    log.info("flow sync with %s resumed at sequence %d", self._peer,
                             self._s.applied)  # fmt: skip
                    return
                self._snapshots += 1
                self._last_resync = time.time()
                log.info(
                    "flow sync: installed a snapshot of %d flows from %s "
                    "(term %s, sequence %d, %d stale removed)",
                    flows,
                    self._peer,
                    self._s.stream_term,
                    self._s.received,
                    stale,
                )
            case Reconnect(why=why, now=now):
                raise _Reconnect(why, now=now)

    async def _write(self, deletes: bytes, upserts: bytes, *, applied: int = 0) -> None:
        """Start a dataplane write once the one in flight has finished, and return
        without waiting for it. ``applied``: the DELTA sequence this write completes."""
        await self._settle()
        if not deletes and not upserts:
            self._s.landed(applied)
            return
        fut = asyncio.ensure_future(asyncio.to_thread(self._write_blocking, deletes, upserts))
        self._inflight = fut
        if applied:

            def landed(f: asyncio.Future[Any]) -> None:
                if not f.cancelled() and f.exception() is None:
                    self._s.landed(applied)
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
            self._deleted += self._dp.delete_records(deletes)
        if upserts:
            self._installed += self._dp.install_records(upserts)

    # -- stats ---------------------------------------------------------------------

    def stats(self) -> ClientStats:
        ss = self._s
        return ClientStats(
            node=self._node,
            peer=self._peer,
            target=self._target,
            group=self._group,
            connected=self._connected,
            synced=self.synced,
            known_term=ss.known_term,
            stream_term=ss.stream_term,
            session=ss.session,
            applied_sequence=ss.applied,
            head_sequence=ss.head,
            lag_sequence=ss.lag,
            last_message_age=None if self._last_msg is None else time.monotonic() - self._last_msg,
            flows=ss.flows,
            entries_installed=self._installed,
            entries_deleted=self._deleted,
            snapshots=self._snapshots,
            resumes=self._resumes,
            reconnects=self._reconnects,
            last_resync=self._last_resync,
            last_error=self._last_error,
            dropped={str(k): v for k, v in sorted(ss.drops.items())},
            stale_term_streams=ss.stale_streams,
        )


def _identity(data: bytes) -> bytes:
    return data
