"""FlowSync codec: wire round trips, validation against the config, stream messages."""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any

import pytest

from halb.config import ClusterConfig, parse_config
from halb.model import Flow, Protocol, Term
from halb.sync import codec
from halb.sync.codec import DecodedBatch, DropReason, FlowIndex
from halb.sync.pb import sync_pb2

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address
TERM = Term(lease_id=0x1234, revision=50)

CONFIG: dict[str, Any] = {
    "cluster": "t",
    "etcd": {"endpoints": ["http://127.0.0.1:2379"]},
    "dataplane": {"kind": "xdp"},
    "nodes": [
        {
            "name": "lb1",
            "address": "10.0.0.11/24",
            "interface": "eth0",
            "priority": 100,
            "sync_address": "127.0.0.1:7001",
        },
    ],
    "vip_groups": [
        {
            "name": "g",
            "vips": [
                {
                    "address": "10.0.0.100",
                    "services": [
                        {
                            "port": 80,
                            "forwarding": "dsr",
                            "backends": [
                                {"address": "10.0.0.21", "port": 8080},
                                {"address": "10.0.0.22"},
                            ],
                            "sorry_backend": {"address": "10.0.0.29", "port": 9000},
                        },
                        {
                            "port": 53,
                            "protocol": "udp",
                            "forwarding": "dsr",
                            "backends": [{"address": "10.0.0.21"}],
                        },
                    ],
                },
                {
                    "address": "2001:db8::100",
                    "services": [
                        {
                            "port": 443,
                            "forwarding": "tunnel",
                            "backends": [{"address": "2001:db8:1::21"}],
                        }
                    ],
                },
            ],
        }
    ],
    "sync": {"insecure": True},
    "admin": {"insecure": True},
}


@pytest.fixture(scope="module")
def cfg() -> ClusterConfig:
    return parse_config(CONFIG)


@pytest.fixture(scope="module")
def index(cfg: ClusterConfig) -> FlowIndex:
    return FlowIndex(cfg.services())


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


def pb_flow(**overrides: Any) -> Any:
    msg = sync_pb2.Flow()
    codec.encode_flow(v4(), msg)
    for k, v in overrides.items():
        setattr(msg, k, v)
    return msg


def decode(
    data: bytes, index: FlowIndex, known: Term | None = TERM
) -> tuple[Any, Counter[DropReason]]:
    drops: Counter[DropReason] = Counter()
    return codec.decode_response(data, index, drops, known), drops


# --- single flows ---------------------------------------------------------------


@pytest.mark.parametrize(
    "flow",
    [
        v4(),
        v4(backend="10.0.0.22", bport=80),  # backend port defaults to the service port
        v4(backend="10.0.0.29", bport=9000),  # the sorry backend is a backend too
        Flow(Protocol.UDP, ip("192.0.2.9"), 5353, ip("10.0.0.100"), 53, ip("10.0.0.21"), 53),
        v6(),
    ],
)
def test_flow_round_trip(flow: Flow, index: FlowIndex) -> None:
    msg = sync_pb2.Flow()
    codec.encode_flow(flow, msg)
    wire = sync_pb2.Flow.FromString(msg.SerializeToString())
    assert codec.decode_flow(wire, index) == flow


def test_decoded_flow_shares_configured_address_objects(
    index: FlowIndex, cfg: ClusterConfig
) -> None:
    out = codec.decode_flow(pb_flow(), index)
    assert isinstance(out, Flow)
    assert out.vip is cfg.services()[0].key.vip


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"protocol": 1}, DropReason.UNKNOWN_PROTOCOL),
        ({"protocol": 0}, DropReason.UNKNOWN_PROTOCOL),
        ({"protocol": 17}, DropReason.UNKNOWN_SERVICE),  # udp/80 is not configured
        ({"vport": 81}, DropReason.UNKNOWN_SERVICE),
        ({"vip": ip("10.0.0.101").packed}, DropReason.UNKNOWN_SERVICE),
        ({"backend": ip("10.0.0.23").packed}, DropReason.UNKNOWN_BACKEND),
        ({"bport": 8081}, DropReason.UNKNOWN_BACKEND),
        # a backend of another service (udp/53 uses port 53) is not a backend of this one
        ({"bport": 53}, DropReason.UNKNOWN_BACKEND),
        ({"src": b"\x01\x02\x03"}, DropReason.MALFORMED_ADDRESS),
        ({"vip": b"\x0a\x00\x00"}, DropReason.MALFORMED_ADDRESS),
        ({"backend": b""}, DropReason.MALFORMED_ADDRESS),
        ({"src": ip("2001:db8::1").packed}, DropReason.MALFORMED_ADDRESS),  # family mismatch
        ({"sport": 0}, DropReason.MALFORMED_PORT),
        ({"sport": 65536}, DropReason.MALFORMED_PORT),
        ({"vport": 0}, DropReason.MALFORMED_PORT),
        ({"bport": 1 << 20}, DropReason.MALFORMED_PORT),
    ],
)
def test_invalid_flows_are_rejected_with_a_reason(
    overrides: dict[str, Any], reason: DropReason, index: FlowIndex
) -> None:
    assert codec.decode_flow(pb_flow(**overrides), index) is reason


def test_deletes_need_only_be_well_formed(index: FlowIndex) -> None:
    # A service removed from the config must still be able to lose its flows.
    gone = pb_flow(vport=81)
    assert codec.decode_flow(gone, index) is DropReason.UNKNOWN_SERVICE
    out = codec.decode_flow(gone, index, in_config=False)
    assert isinstance(out, Flow) and out.vport == 81
    assert codec.decode_flow(pb_flow(src=b"\x01"), index, in_config=False) is (
        DropReason.MALFORMED_ADDRESS
    )


def test_decode_flows_counts_each_drop(index: FlowIndex) -> None:
    drops: Counter[DropReason] = Counter()
    msgs = [pb_flow(), pb_flow(vport=81), pb_flow(vport=81), pb_flow(src=b"abc")]
    assert codec.decode_flows(msgs, index, drops) == [v4()]
    assert drops == {DropReason.UNKNOWN_SERVICE: 2, DropReason.MALFORMED_ADDRESS: 1}


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


def test_snapshot_is_chunked_with_begin_and_end(index: FlowIndex) -> None:
    flows = [v4(sport=1000 + i) for i in range(10)]
    msgs = list(codec.snapshot_messages(flows, term=TERM, session=7, sequence=42, batch_size=4))
    assert len(msgs) == 3
    decoded = [decode(m, index)[0] for m in msgs]
    assert [(d.snapshot_begin, d.snapshot_end) for d in decoded] == [
        (True, False),
        (False, False),
        (False, True),
    ]
    assert all(d.kind == "snapshot" and d.sequence == 42 and d.session == 7 for d in decoded)
    assert [f for d in decoded for f in d.upserts] == flows


def test_empty_snapshot_is_one_message(index: FlowIndex) -> None:
    (msg,) = codec.snapshot_messages([], term=TERM, session=7, sequence=0, batch_size=4)
    d, _ = decode(msg, index)
    assert d.snapshot_begin and d.snapshot_end and d.upserts == []


def test_snapshot_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        list(codec.snapshot_messages([v4()], term=TERM, session=1, sequence=0, batch_size=0))


def test_delta_round_trip_with_invalid_entries_dropped(index: FlowIndex) -> None:
    bad = Flow(Protocol.TCP, ip("192.0.2.1"), 1, ip("10.0.0.100"), 80, ip("10.0.0.99"), 8080)
    data = codec.delta_message(
        term=TERM, session=3, sequence=9, upserts=[v4(), bad, v6()], deletes=[v4(sport=2)]
    )
    d, drops = decode(data, index)
    assert isinstance(d, DecodedBatch)
    assert (d.kind, d.sequence, d.session, d.term) == ("delta", 9, 3, TERM)
    assert list(d.upserts) == [v4(), v6()]
    assert list(d.deletes) == [v4(sport=2)]
    assert d.received == 4
    assert drops == {DropReason.UNKNOWN_BACKEND: 1}


def test_heartbeat(index: FlowIndex) -> None:
    d, _ = decode(codec.heartbeat_message(term=TERM, session=3, head_sequence=77), index)
    assert (d.kind, d.sequence, d.session) == ("heartbeat", 77, 3)
    assert not d.snapshot_pending
    data = codec.heartbeat_message(term=TERM, session=3, head_sequence=77, snapshot_pending=True)
    d, _ = decode(data, index)
    assert d.snapshot_pending


def test_older_term_is_stale_and_its_flows_counted(index: FlowIndex) -> None:
    data = codec.delta_message(
        term=Term(1, 49), session=3, sequence=1, upserts=[v4(), v6()], deletes=[v4(sport=9)]
    )
    d, drops = decode(data, index, known=TERM)
    assert d is DropReason.STALE_TERM
    assert drops == {DropReason.STALE_TERM: 3}
    # a newer term than the known one is accepted (etcd may lag behind the stream)
    d, _ = decode(data, index, known=Term(1, 10))
    assert isinstance(d, DecodedBatch)
    d, _ = decode(data, index, known=None)
    assert isinstance(d, DecodedBatch)


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
        sync_pb2.SyncResponse(
            term=sync_pb2.Term(lease_id=0x1234, revision=50),
            batch=sync_pb2.Batch(kind=sync_pb2.Batch.SNAPSHOT, deletes=[sync_pb2.Flow()]),
        ).SerializeToString(),  # a snapshot never deletes
    ],
)
def test_malformed_messages(data: bytes, index: FlowIndex) -> None:
    d, _ = decode(data, index)
    assert d is DropReason.MALFORMED_MESSAGE


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
