"""FlowSync codec: stream messages around packed flow records, validated on decode.

The record layout and its validation on their own: tests/unit/test_flow_records.py."""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any

import pytest

from halb.config import ClusterConfig, parse_config
from halb.flows import records
from halb.model import Flow, Protocol, Term
from halb.sync import codec
from halb.sync.codec import DecodedBatch, DropReason, RecordIndex
from halb.sync.pb import sync_pb2
from halb.testing.sync_cluster import validation_doc

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address
TERM = Term(lease_id=0x1234, revision=50)

CONFIG: dict[str, Any] = validation_doc()


@pytest.fixture(scope="module")
def cfg() -> ClusterConfig:
    return parse_config(CONFIG)


@pytest.fixture(scope="module")
def index(cfg: ClusterConfig) -> RecordIndex:
    return RecordIndex(cfg.services())


def v4(
    src: str = "192.0.2.7", sport: int = 40000, backend: str = "10.0.0.21", bport: int = 8080
) -> Flow:
    return Flow(Protocol.TCP, ip(src), sport, ip("10.0.0.100"), 80, ip(backend), bport)


def v6(sport: int = 50000) -> Flow:
    return Flow(
        Protocol.TCP,
        ip("2001:db8:9::7"),
        sport,
        ip("2001:db8::100"),
        443,
        ip("2001:db8:1::21"),
        443,
    )


def decode(
    data: bytes, index: RecordIndex, known: Term | None = TERM
) -> tuple[Any, Counter[DropReason]]:
    drops: Counter[DropReason] = Counter()
    return codec.decode_response(data, index, drops, known), drops


# --- terms ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("term", "than", "older"),
    [
        (Term(1, 10), Term(1, 11), True),
        (Term(9, 10), Term(1, 11), True),  # the revision orders terms, not the lease id
        (Term(1, 11), Term(9, 10), False),
        (Term(1, 10), Term(1, 10), False),
        (Term(2, 10), Term(1, 10), True),  # same revision, other lease: not trusted
    ],
)
def test_term_is_older(term: Term, than: Term, older: bool) -> None:
    assert codec.term_is_older(term, than) is older


# --- stream messages --------------------------------------------------------------


def test_snapshot_is_chunked_with_begin_and_end(index: RecordIndex) -> None:
    flows = [v4(sport=1000 + i) for i in range(10)]
    recs = records.from_flows(flows)
    msgs = list(codec.snapshot_messages(recs, term=TERM, session=7, sequence=42, batch_size=4))
    assert len(msgs) == 3
    decoded = [decode(m, index)[0] for m in msgs]
    assert [(d.snapshot_begin, d.snapshot_end) for d in decoded] == [
        (True, False),
        (False, False),
        (False, True),
    ]
    assert all(d.kind == "snapshot" and d.sequence == 42 and d.session == 7 for d in decoded)
    assert [records.count(d.upserts) for d in decoded] == [4, 4, 2]
    assert b"".join(d.upserts for d in decoded) == recs


def test_empty_snapshot_is_one_message(index: RecordIndex) -> None:
    (msg,) = codec.snapshot_messages(b"", term=TERM, session=7, sequence=0, batch_size=4)
    d, _ = decode(msg, index)
    assert d.snapshot_begin and d.snapshot_end and d.upserts == b""


def test_snapshot_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        list(
            codec.snapshot_messages(
                records.from_flows([v4()]), term=TERM, session=1, sequence=0, batch_size=0
            )
        )
    with pytest.raises(ValueError, match="whole number"):
        list(codec.snapshot_messages(b"x" * 57, term=TERM, session=1, sequence=0, batch_size=4))


def test_delta_round_trip_with_invalid_entries_dropped(index: RecordIndex) -> None:
    bad = Flow(Protocol.TCP, ip("192.0.2.1"), 1, ip("10.0.0.100"), 80, ip("10.0.0.99"), 8080)
    gone = v4(sport=2, backend="10.0.0.98")  # deletes need only be well-formed
    data = codec.delta_message(
        term=TERM,
        session=3,
        sequence=9,
        upserts=records.from_flows([v4(), bad, v6()]),
        deletes=records.from_flows([gone]),
    )
    d, drops = decode(data, index)
    assert isinstance(d, DecodedBatch)
    assert (d.kind, d.sequence, d.session, d.term) == ("delta", 9, 3, TERM)
    assert records.to_flows(d.upserts) == [v4(), v6()]
    assert records.to_flows(d.deletes) == [gone]
    assert d.received == 4
    assert drops == {DropReason.UNKNOWN_BACKEND: 1}


def test_heartbeat(index: RecordIndex) -> None:
    d, _ = decode(codec.heartbeat_message(term=TERM, session=3, head_sequence=77), index)
    assert (d.kind, d.sequence, d.session) == ("heartbeat", 77, 3)
    assert not d.snapshot_pending
    data = codec.heartbeat_message(term=TERM, session=3, head_sequence=77, snapshot_pending=True)
    d, _ = decode(data, index)
    assert d.snapshot_pending


def test_older_term_is_stale_and_its_flows_counted(index: RecordIndex) -> None:
    data = codec.delta_message(
        term=Term(1, 49),
        session=3,
        sequence=1,
        upserts=records.from_flows([v4(), v6()]),
        deletes=records.from_flows([v4(sport=9)]),
    )
    d, drops = decode(data, index, known=TERM)
    assert d is DropReason.STALE_TERM
    assert drops == {DropReason.STALE_TERM: 3}
    # a newer term than the known one is accepted (etcd may lag behind the stream)
    d, _ = decode(data, index, known=Term(1, 10))
    assert isinstance(d, DecodedBatch)
    d, _ = decode(data, index, known=None)
    assert isinstance(d, DecodedBatch)


GOOD = records.from_flows([v4(), v6()])


def _batch(kind: Any = None, record_size: int = records.RECORD_SIZE, **fields: Any) -> bytes:
    return bytes(
        sync_pb2.SyncResponse(
            term=sync_pb2.Term(lease_id=0x1234, revision=50),
            batch=sync_pb2.Batch(
                kind=sync_pb2.Batch.DELTA if kind is None else kind,
                record_size=record_size,
                **fields,
            ),
        ).SerializeToString()
    )


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xff\xff\xff",  # not protobuf
        sync_pb2.SyncResponse(session=1).SerializeToString(),  # no term, no body
        sync_pb2.SyncResponse(
            term=sync_pb2.Term(lease_id=1, revision=50), session=1
        ).SerializeToString(),  # no body
        sync_pb2.SyncResponse(
            term=sync_pb2.Term(lease_id=0x1234, revision=50),
            batch=sync_pb2.Batch(kind=sync_pb2.Batch.KIND_UNSPECIFIED),
        ).SerializeToString(),
        _batch(kind=sync_pb2.Batch.SNAPSHOT, deletes=GOOD),  # a snapshot never deletes
        _batch(upserts=GOOD[:-1]),  # a partial record
        _batch(upserts=GOOD, deletes=GOOD + b"\0"),  # ... in either field
        _batch(upserts=GOOD, record_size=0),  # a peer that predates records
        _batch(upserts=GOOD, record_size=records.RECORD_SIZE + 8),  # another layout
    ],
)
def test_malformed_messages(data: bytes, index: RecordIndex) -> None:
    d, drops = decode(data, index)
    assert d is DropReason.MALFORMED_MESSAGE
    assert not drops  # nothing of it was validated or applied


def test_a_well_formed_batch_as_built_by_hand_decodes(index: RecordIndex) -> None:
    # The control for the malformed cases above: only the broken part makes them so.
    d, drops = decode(_batch(upserts=GOOD, deletes=GOOD), index)
    assert isinstance(d, DecodedBatch) and d.upserts == GOOD and d.deletes == GOOD
    assert not drops


def test_requests_round_trip() -> None:
    req = sync_pb2.SyncRequest.FromString(
        codec.request_subscribe(node="lb2", known_term=TERM, session=5, last_sequence=9)
    )
    assert req.WhichOneof("msg") == "subscribe"
    assert (req.subscribe.node, req.subscribe.session, req.subscribe.last_sequence) == ("lb2", 5, 9)
    assert codec.term_from_pb(req.subscribe.known_term) == TERM
    req = sync_pb2.SyncRequest.FromString(
        codec.request_subscribe(node="lb2", known_term=None, session=0, last_sequence=0)
    )
    assert not req.subscribe.HasField("known_term")
    ack = sync_pb2.SyncRequest.FromString(codec.request_ack(12, True)).ack
    assert (ack.sequence, ack.snapshot_done) == (12, True)
