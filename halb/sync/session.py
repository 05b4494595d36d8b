"""The FlowSync client's bookkeeping, sans I/O: messages in, actions out.

One ClientSession per followed group lives across the streams of its FlowSyncClient
(halb.sync.client, the I/O loop around it). Per stream the loop asks subscribe() for
the request to send, hands every received message to receive(), carries out the
actions it returns in order, and reports each finished dataplane write with landed().

What the session decides:
- term: a message from a term older than the newest one known ends the stream
  (STALE_TERM); a newer one is adopted (etcd may not have told us yet);
- validation: only records whose service and backend the config holds are written
  (halb.flows.records.RecordIndex); every other one is counted by reason;
- order: a snapshot (begin .. end) replaces what the session holds for the active;
  deltas must follow one another within the stream's session; a gap or a message the
  stream's state does not allow forces a full resync (a new stream, session 0);
- resume: a stream that starts with a delta or heartbeat of our own session means the
  active accepted our resume point;
- what to delete after a snapshot: flows held from before that the snapshot lacks.

Every refused message is counted in ``drops`` by reason (flows inside a refused
message are not written, and a record refused by validation counts once per record).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from halb.flows import records
from halb.flows.records import DropReason, RecordIndex
from halb.model import Term
from halb.sync import codec
from halb.sync.codec import DecodedBatch

__all__ = ["Action", "ClientSession", "Reconnect", "Synced", "Write"]


@dataclass(frozen=True, slots=True)
class Write:
    """Write to the dataplane, deletes first, after every earlier Write. ``applied``:
    the DELTA sequence the session counts as applied once this write has landed
    (report it with landed()); 0 for none."""

    deletes: bytes
    upserts: bytes
    applied: int = 0


@dataclass(frozen=True, slots=True)
class Synced:
    """The stream is in sync (a snapshot complete, or a resume accepted). State before
    address: tell waiters only once every earlier Write has landed."""

    resumed: bool
    flows: int
    stale: int  # flows deleted because the snapshot lacked them


@dataclass(frozen=True, slots=True)
class Reconnect:
    """End this stream and subscribe again; ``now``: without backoff. The next
    subscription asks for a full snapshot when the resume point was given up."""

    why: str
    now: bool = False


Action = Write | Synced | Reconnect


class ClientSession:
    def __init__(self, index: RecordIndex, *, known_term: Term | None = None) -> None:
        self.index = index
        self.known_term = known_term
        self.stream_term: Term | None = None
        self.session = 0  # the server session we can resume; 0: none
        self.applied = 0  # last DELTA sequence whose write has landed
        self.received = 0  # last DELTA sequence accepted for writing
        self.head = 0
        self.in_sync = False  # this stream
        self.synced = False  # ever (a snapshot or resume completed once)
        self.drops: Counter[DropReason] = Counter()
        self.stale_streams = 0
        # Every message is accepted or refused: messages == accepted + the message-level
        # refusals (MALFORMED_MESSAGE, SEQUENCE_GAP, OUT_OF_ORDER in drops, and
        # stale_streams); see refused_messages.
        self.messages = 0
        self.accepted = 0
        # The flows written on the active's behalf, connection (record bytes [0, 38))
        # -> record: what a full resync compares against to remove flows that ended
        # while we were away. By connection, so a flow that moved to another backend
        # replaces its old record instead of being deleted later.
        self.mirror: dict[bytes, bytes] = {}
        self._snap: dict[bytes, bytes] | None = None  # the snapshot being received

    # -- control -------------------------------------------------------------------

    def set_term(self, term: Term) -> None:
        """The newest term known from etcd. Never moves back."""
        if self.known_term is None or codec.term_is_older(self.known_term, term):
            self.known_term = term

    def update_index(self, index: RecordIndex) -> None:
        self.index = index

    def subscribe(self, *, node: str, group: str = "") -> bytes:
        """A new stream: the request that opens it. Call once every earlier write has
        landed (the resume point is what the dataplane holds)."""
        self.received = self.applied
        self.in_sync = False
        self._snap = None
        return codec.request_subscribe(
            node=node,
            known_term=self.known_term,
            session=self.session,
            last_sequence=self.applied,
            group=group,
        )

    def ack(self) -> bytes:
        return codec.request_ack(self.applied, self.in_sync)

    def landed(self, applied: int) -> None:
        """A Write has landed in the dataplane."""
        self.applied = max(self.applied, applied)

    @property
    def flows(self) -> int:
        return len(self.mirror)

    @property
    def lag(self) -> int:
        return max(0, self.head - self.applied)

    # -- messages ------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Action]:
        """One serialized SyncResponse: the actions it calls for, in order."""
        self.messages += 1
        result = codec.decode_response(data, self.index, self.drops, self.known_term)
        if result is DropReason.STALE_TERM:
            # decode_response counted the message's flows under that reason.
            self.stale_streams += 1
            return [Reconnect(f"the stream's term is older than the known term {self.known_term}")]
        if isinstance(result, DropReason):
            # A lost delta shows up as a sequence gap and forces a resync.
            self.drops[result] += 1
            return []
        if self.known_term is None or codec.term_is_older(self.known_term, result.term):
            self.known_term = result.term  # a newer leader than etcd told us about yet
        out = self._snapshot(result) if result.kind == "snapshot" else self._after_snapshot(result)
        if not (out and isinstance(out[-1], Reconnect)):
            self.accepted += 1
        return out

    @property
    def refused_messages(self) -> int:
        d = self.drops
        refused = d[DropReason.MALFORMED_MESSAGE] + d[DropReason.SEQUENCE_GAP]
        return refused + d[DropReason.OUT_OF_ORDER] + self.stale_streams

    def _refuse(self, reason: DropReason, why: str) -> list[Action]:
        self.drops[reason] += 1
        self.session = 0  # give up the resume point: the next stream starts over
        return [Reconnect(why, now=True)]

    def _after_snapshot(self, b: DecodedBatch) -> list[Action]:
        if b.snapshot_pending:
            return []  # the active is taking a snapshot for us: only proof of life
        out: list[Action] = []
        if not self.in_sync:
            # No snapshot on this stream: the server accepted our resume point, so its
            # first delta or heartbeat carries our session.
            if self._snap is not None or not self.session or b.session != self.session:
                return self._refuse(
                    DropReason.OUT_OF_ORDER, f"unexpected {b.kind} before the snapshot"
                )
            self.in_sync = self.synced = True
            self.stream_term = b.term
            out.append(Synced(resumed=True, flows=len(self.mirror), stale=0))
        elif b.session != self.session or b.term != self.stream_term:
            return self._refuse(
                DropReason.OUT_OF_ORDER,
                f"a {b.kind} of session {b.session:x} term {b.term} on the stream of "
                f"session {self.session:x} term {self.stream_term}",
            )
        if b.kind == "heartbeat":
            self.head = max(b.sequence, self.received)
            return out
        if b.sequence != self.received + 1:
            return self._refuse(
                DropReason.SEQUENCE_GAP, f"sequence gap: got {b.sequence} after {self.received}"
            )
        self.received = b.sequence
        out.append(Write(b.deletes, b.upserts, applied=b.sequence))
        # Recorded before the write lands: if it fails, the stream restarts and a full
        # resync compares against this; deleting a flow never installed is harmless.
        if b.deletes:
            pop = self.mirror.pop
            for k in records.conn_keys(b.deletes):
                pop(k, None)
        if b.upserts:
            self.mirror.update(records.by_conn(b.upserts))
        self.head = max(self.head, b.sequence)
        return out

    def _snapshot(self, b: DecodedBatch) -> list[Action]:
        if b.snapshot_begin:
            self.in_sync = False
            self._snap = {}
            self.session = 0  # no valid resume point until this snapshot completes
            # Sequences restart with each server session; this snapshot's own sequence
            # is what its last write will mark applied.
            self.applied = 0
            self.stream_term = b.term
        elif self._snap is None:
            return self._refuse(
                DropReason.OUT_OF_ORDER, "a snapshot continued without its beginning"
            )
        elif b.term != self.stream_term:
            return self._refuse(DropReason.OUT_OF_ORDER, "a snapshot changed term midway")
        assert self._snap is not None
        self._snap.update(records.by_conn(b.upserts))
        out: list[Action] = [Write(b"", b.upserts)] if b.upserts else []
        if not b.snapshot_end:
            return out
        seen, self._snap = self._snap, None
        stale = [self.mirror[k] for k in self.mirror.keys() - seen.keys()]
        # Flows held from before that the active no longer has: they ended while we
        # were away, or belonged to a previous active. The last write completes the
        # snapshot's sequence.
        out.append(Write(b"".join(stale), b"", applied=b.sequence))
        self.mirror = seen
        self.session = b.session
        self.received = b.sequence
        self.head = max(self.head, b.sequence)
        self.in_sync = self.synced = True
        out.append(Synced(resumed=False, flows=len(seen), stale=len(stale)))
        return out
