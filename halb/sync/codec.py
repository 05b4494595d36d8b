"""Pure FlowSync codec: protobuf messages around packed flow records.

No I/O. Flows travel as packed records (halb.flows.records): the server encodes each
batch once (serialized bytes shared by every standby); the client parses a message
and validates its records in bulk before they reach the dataplane. Validation is what
the design demands of a standby: only flows whose VIP:port/protocol is a configured
service and whose backend belongs to that service are installed; anything else is
dropped with a reason and counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from halb.flows.records import RECORD_SIZE, DropReason, RecordIndex
from halb.model import Term
from halb.sync.pb import sync_pb2

__all__ = [
    "DecodedBatch",
    "DropReason",
    "RecordIndex",
    "decode_response",
    "delta_message",
    "heartbeat_message",
    "request_ack",
    "request_subscribe",
    "snapshot_messages",
    "term_from_pb",
    "term_is_older",
]


def term_is_older(term: Term, than: Term) -> bool:
    """Whether `term` precedes `than`. The leader key's create revision orders terms
    (etcd lease ids are not ordered); one revision with another lease id is a different
    term too, and neither may be trusted over the known one."""
    if term.revision != than.revision:
        return term.revision < than.revision
    return term.lease_id != than.lease_id


def term_from_pb(msg: Any) -> Term:
    return Term(lease_id=int(msg.lease_id), revision=int(msg.revision))


def _term_pb(term: Term) -> Any:
    return sync_pb2.Term(lease_id=term.lease_id, revision=term.revision)


# --- stream messages (server side builds bytes once, shared by every standby) ------


def _response(term: Term, session: int) -> Any:
    resp = sync_pb2.SyncResponse(session=session)
    resp.term.lease_id = term.lease_id
    resp.term.revision = term.revision
    return resp


def snapshot_messages(
    records: bytes, *, term: Term, session: int, sequence: int, batch_size: int
) -> Iterator[bytes]:
    """The serialized SNAPSHOT batches of a full snapshot (packed records) reflecting
    `sequence`, at most batch_size flows each.

    Always at least one message (an empty snapshot still tells the standby to forget
    what it had). Lazy, so the caller can yield to the event loop between chunks.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(records) % RECORD_SIZE:
        raise ValueError(f"{len(records)} bytes is not a whole number of flow records")
    total = len(records)
    step = batch_size * RECORD_SIZE
    start = 0
    while True:
        resp = _response(term, session)
        batch = resp.batch
        batch.kind = sync_pb2.Batch.SNAPSHOT
        batch.sequence = sequence
        batch.record_size = RECORD_SIZE
        batch.snapshot_begin = start == 0
        batch.upserts = records[start : start + step]
        start += step
        batch.snapshot_end = start >= total
        yield resp.SerializeToString()
        if start >= total:
            return


def delta_message(
    *, term: Term, session: int, sequence: int, upserts: bytes, deletes: bytes
) -> bytes:
    """One DELTA batch; upserts and deletes are packed records."""
    resp = _response(term, session)
    batch = resp.batch
    batch.kind = sync_pb2.Batch.DELTA
    batch.sequence = sequence
    batch.record_size = RECORD_SIZE
    batch.deletes = deletes
    batch.upserts = upserts
    return bytes(resp.SerializeToString())


def heartbeat_message(
    *, term: Term, session: int, head_sequence: int, snapshot_pending: bool = False
) -> bytes:
    resp = _response(term, session)
    resp.heartbeat.head_sequence = head_sequence
    resp.heartbeat.snapshot_pending = snapshot_pending
    return bytes(resp.SerializeToString())


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """A response as the client acts on it. `upserts`/`deletes` are validated packed
    records."""

    term: Term
    session: int
    kind: str  # "snapshot" | "delta" | "heartbeat"
    sequence: int
    snapshot_begin: bool = False
    snapshot_end: bool = False
    upserts: bytes = b""
    deletes: bytes = b""
    received: int = 0  # flows in the message before validation
    snapshot_pending: bool = False  # heartbeat only: a snapshot is being taken


def decode_response(
    data: bytes, index: RecordIndex, drops: Counter[DropReason], known_term: Term | None
) -> DecodedBatch | DropReason:
    """Parse and validate one serialized SyncResponse.

    Returns MALFORMED_MESSAGE for bytes that do not parse, lack a term or a body, or
    carry records of another size or a partial record (counted once here; the caller
    counts the message), STALE_TERM (counting each carried flow under that reason) for
    an older term; otherwise the batch with invalid flows dropped and counted.
    """
    resp = sync_pb2.SyncResponse()
    try:
        resp.ParseFromString(data)
    except Exception:  # protobuf raises DecodeError, and others on deeply broken input
        return DropReason.MALFORMED_MESSAGE
    which = resp.WhichOneof("msg")
    if which is None or not resp.HasField("term"):
        return DropReason.MALFORMED_MESSAGE
    term = term_from_pb(resp.term)
    session = int(resp.session)
    if known_term is not None and term_is_older(term, known_term):
        if which == "batch":
            b = resp.batch
            drops[DropReason.STALE_TERM] += (len(b.upserts) + len(b.deletes)) // RECORD_SIZE
        return DropReason.STALE_TERM
    if which == "heartbeat":
        hb = resp.heartbeat
        return DecodedBatch(
            term,
            session,
            "heartbeat",
            int(hb.head_sequence),
            snapshot_pending=bool(hb.snapshot_pending),
        )
    b = resp.batch
    if b.kind == sync_pb2.Batch.SNAPSHOT:
        if b.deletes:
            return DropReason.MALFORMED_MESSAGE
        kind = "snapshot"
    elif b.kind == sync_pb2.Batch.DELTA:
        kind = "delta"
    else:
        return DropReason.MALFORMED_MESSAGE
    if b.record_size != RECORD_SIZE:
        return DropReason.MALFORMED_MESSAGE
    raw_up, raw_del = bytes(b.upserts), bytes(b.deletes)
    # Both fields whole before either is validated: a batch is applied entirely or not
    # at all (a dropped delta is a sequence gap, which forces a resync).
    if len(raw_up) % RECORD_SIZE or len(raw_del) % RECORD_SIZE:
        return DropReason.MALFORMED_MESSAGE
    upserts = index.validate(raw_up, drops)
    deletes = index.validate(raw_del, drops, in_config=False)
    assert upserts is not None and deletes is not None  # lengths checked above
    return DecodedBatch(
        term=term,
        session=session,
        kind=kind,
        sequence=int(b.sequence),
        snapshot_begin=bool(b.snapshot_begin),
        snapshot_end=bool(b.snapshot_end),
        upserts=upserts,
        deletes=deletes,
        received=(len(raw_up) + len(raw_del)) // RECORD_SIZE,
    )


# --- requests (standby -> active) -------------------------------------------------


def request_subscribe(
    *, node: str, known_term: Term | None, session: int, last_sequence: int, group: str = ""
) -> bytes:
    req = sync_pb2.SyncRequest()
    sub = req.subscribe
    sub.node = node
    sub.group = group
    sub.session = session
    sub.last_sequence = last_sequence
    if known_term is not None:
        sub.known_term.CopyFrom(_term_pb(known_term))
    return bytes(req.SerializeToString())


def request_ack(sequence: int, snapshot_done: bool) -> bytes:
    req = sync_pb2.SyncRequest()
    req.ack.sequence = sequence
    req.ack.snapshot_done = snapshot_done
    return bytes(req.SerializeToString())
