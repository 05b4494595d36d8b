"""The FlowSync client session, driven message by message (pure: no gRPC, no dataplane),
and fuzzed: random and mutated messages never raise, never write a flow the config
does not hold, and every refused message is counted by reason."""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from halb.config import parse_config
from halb.flows import records
from halb.flows.records import DropReason, RecordIndex
from halb.model import Flow, Protocol, Term
from halb.sync import codec
from halb.sync.pb import sync_pb2
from halb.sync.session import Action, ClientSession, Reconnect, Synced, Write
from halb.testing.sync_cluster import validation_doc

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address
TERM = Term(lease_id=0x1234, revision=50)
OLDER = Term(lease_id=0x1000, revision=40)
NEWER = Term(lease_id=0x2000, revision=60)
SESSION = 0xABC
INDEX = RecordIndex(parse_config(validation_doc()).services())


def flow(sport: int, backend: str = "10.0.0.21", bport: int = 8080, vport: int = 80) -> Flow:
    return Flow(Protocol.TCP, ip("192.0.2.7"), sport, ip("10.0.0.100"), vport, ip(backend), bport)


def recs(*flows: Flow) -> bytes:
    return records.from_flows(flows)


def snapshot(
    flows: Sequence[Flow],
    *,
    seq: int = 0,
    term: Term = TERM,
    session: int = SESSION,
    batch: int = 2,
) -> list[bytes]:
    return list(
        codec.snapshot_messages(
            recs(*flows), term=term, session=session, sequence=seq, batch_size=batch
        )
    )


def delta(
    seq: int,
    ups: Sequence[Flow] = (),
    dels: Sequence[Flow] = (),
    *,
    term: Term = TERM,
    session: int = SESSION,
) -> bytes:
    return codec.delta_message(
        term=term, session=session, sequence=seq, upserts=recs(*ups), deletes=recs(*dels)
    )


def heartbeat(
    head: int, *, session: int = SESSION, term: Term = TERM, pending: bool = False
) -> bytes:
    return codec.heartbeat_message(
        term=term, session=session, head_sequence=head, snapshot_pending=pending
    )


def feed(s: ClientSession, *messages: bytes, land: bool = True) -> list[Action]:
    """Feed messages; with land, report every write as landed at once (an instant
    dataplane)."""
    out: list[Action] = []
    for m in messages:
        acts = s.receive(m)
        if land:
            for a in acts:
                if isinstance(a, Write):
                    s.landed(a.applied)
        out += acts
    return out


def writes(actions: Sequence[Action]) -> list[Write]:
    return [a for a in actions if isinstance(a, Write)]


def subscribed(s: ClientSession) -> sync_pb2.Subscribe:
    req = sync_pb2.SyncRequest.FromString(s.subscribe(node="lb2", group="g"))
    return req.subscribe


def synced_session(flows: Sequence[Flow] = (flow(1), flow(2)), seq: int = 0) -> ClientSession:
    s = ClientSession(INDEX, known_term=TERM)
    subscribed(s)
    feed(s, *snapshot(flows, seq=seq))
    return s


# --- snapshots --------------------------------------------------------------------


def test_first_subscription_asks_for_a_snapshot_of_its_group() -> None:
    s = ClientSession(INDEX, known_term=TERM)
    sub = subscribed(s)
    assert (sub.session, sub.last_sequence, sub.group, sub.node) == (0, 0, "g", "lb2")
    assert codec.term_from_pb(sub.known_term) == TERM


def test_snapshot_writes_its_parts_then_marks_its_sequence_then_synced() -> None:
    s = ClientSession(INDEX, known_term=TERM)
    subscribed(s)
    acts = feed(s, *snapshot([flow(1), flow(2), flow(3)], seq=7), land=False)
    assert [type(a) for a in acts] == [Write, Write, Write, Synced]
    assert [records.count(w.upserts) for w in writes(acts)] == [2, 1, 0]
    assert writes(acts)[-1] == Write(b"", b"", applied=7)
    assert acts[-1] == Synced(resumed=False, flows=3, stale=0)
    # Acks say "in sync" at once, but the sequence only once the last write has landed.
    assert s.in_sync and s.applied == 0
    s.landed(7)
    assert sync_pb2.SyncRequest.FromString(s.ack()).ack.sequence == 7
    assert s.synced and s.flows == 3 and s.session == SESSION


def test_a_new_snapshot_deletes_what_it_no_longer_holds() -> None:
    s = synced_session([flow(1), flow(2), flow(3)])
    subscribed(s)
    acts = feed(s, *snapshot([flow(2)], seq=4, session=0xDEF))
    stale = writes(acts)[-1].deletes
    assert sorted(records.split(stale)) == sorted(records.split(recs(flow(1), flow(3))))
    assert acts[-1] == Synced(resumed=False, flows=1, stale=2)
    assert s.session == 0xDEF and s.applied == 4


def test_a_moved_flow_replaces_its_old_record_and_is_not_deleted_after_a_resync() -> None:
    s = synced_session([flow(1)])
    feed(s, delta(1, [flow(1, backend="10.0.0.22", bport=80)]))
    subscribed(s)
    acts = feed(s, *snapshot([flow(1, backend="10.0.0.22", bport=80)], seq=9, session=7))
    assert writes(acts)[-1].deletes == b""


def test_a_snapshot_part_without_its_beginning_forces_a_full_resync() -> None:
    s = ClientSession(INDEX, known_term=TERM)
    subscribed(s)
    parts = snapshot([flow(1), flow(2), flow(3)])
    acts = feed(s, parts[1])
    assert acts == [Reconnect("a snapshot continued without its beginning", now=True)]
    assert s.drops[DropReason.OUT_OF_ORDER] == 1
    assert subscribed(s).session == 0


# --- deltas -----------------------------------------------------------------------


def test_deltas_in_order_are_written_and_acked_once_landed() -> None:
    s = synced_session()
    acts = feed(s, delta(1, [flow(3)], [flow(1)]), land=False)
    assert acts == [Write(recs(flow(1)), recs(flow(3)), applied=1)]
    assert s.applied == 0 and s.received == 1 and s.lag == 1
    s.landed(1)
    assert s.applied == 1 and s.lag == 0 and s.flows == 2


def test_a_sequence_gap_gives_up_the_resume_point() -> None:
    s = synced_session()
    feed(s, delta(1, [flow(3)]))
    acts = feed(s, delta(3, [flow(4)]))
    assert acts == [Reconnect("sequence gap: got 3 after 1", now=True)]
    assert s.drops[DropReason.SEQUENCE_GAP] == 1
    assert subscribed(s).session == 0


def test_a_delta_of_another_session_mid_stream_is_refused() -> None:
    s = synced_session()
    acts = feed(s, delta(1, [flow(3)], session=SESSION + 1))
    assert len(acts) == 1 and isinstance(acts[0], Reconnect)
    assert s.drops[DropReason.OUT_OF_ORDER] == 1 and s.flows == 2


def test_a_delta_before_any_snapshot_is_refused() -> None:
    s = ClientSession(INDEX, known_term=TERM)
    subscribed(s)
    acts = feed(s, delta(1, [flow(3)]))
    assert acts == [Reconnect("unexpected delta before the snapshot", now=True)]
    assert not writes(acts) and s.drops[DropReason.OUT_OF_ORDER] == 1


def test_invalid_flows_of_a_delta_are_dropped_by_reason_and_the_rest_written() -> None:
    s = synced_session()
    bad_backend = flow(5, backend="10.0.0.99")
    bad_service = flow(6, vport=81)
    acts = feed(s, delta(1, [flow(3), bad_backend, bad_service]))
    assert writes(acts) == [Write(b"", recs(flow(3)), applied=1)]
    assert s.drops[DropReason.UNKNOWN_BACKEND] == 1
    assert s.drops[DropReason.UNKNOWN_SERVICE] == 1


# --- resume, heartbeats, terms ------------------------------------------------------


def test_resume_is_accepted_by_a_heartbeat_of_our_session() -> None:
    s = synced_session(seq=3)
    feed(s, delta(4, [flow(3)]))
    sub = subscribed(s)
    assert (sub.session, sub.last_sequence) == (SESSION, 4)
    acts = feed(s, heartbeat(6))
    assert acts == [Synced(resumed=True, flows=3, stale=0)]
    assert s.head == 6 and s.lag == 2
    assert feed(s, delta(5, [flow(4)])) == [Write(b"", recs(flow(4)), applied=5)]


def test_a_snapshot_pending_heartbeat_is_only_proof_of_life() -> None:
    s = ClientSession(INDEX, known_term=TERM)
    subscribed(s)
    assert feed(s, heartbeat(0, session=SESSION, pending=True)) == []
    assert not s.in_sync and s.accepted == 1 and s.refused_messages == 0


def test_a_stream_of_an_older_term_is_left_and_its_flows_counted() -> None:
    s = ClientSession(INDEX, known_term=TERM)
    subscribed(s)
    acts = feed(s, *snapshot([flow(1), flow(2)], term=OLDER, batch=10))
    assert len(acts) == 1 and isinstance(acts[0], Reconnect) and not acts[0].now
    assert s.stale_streams == 1 and s.drops[DropReason.STALE_TERM] == 2
    assert s.flows == 0


def test_a_newer_term_is_adopted_and_never_moves_back() -> None:
    s = ClientSession(INDEX, known_term=TERM)
    subscribed(s)
    feed(s, *snapshot([flow(1)], term=NEWER))
    assert s.known_term == NEWER and s.stream_term == NEWER
    s.set_term(TERM)
    assert s.known_term == NEWER


def test_malformed_bytes_are_counted_and_change_nothing() -> None:
    s = synced_session()
    assert feed(s, b"\xff\x00garbage") == []
    assert s.drops[DropReason.MALFORMED_MESSAGE] == 1 and s.flows == 2 and s.in_sync


# --- fuzzing ----------------------------------------------------------------------

# Flows the config holds, and some it does not (unknown backend, service, protocol).
VALID = [flow(p) for p in range(1, 6)] + [flow(p, backend="10.0.0.22", bport=80) for p in (6, 7)]
INVALID = [flow(9, backend="10.0.0.99"), flow(10, vport=81), flow(11, bport=1)]
TERMS = [OLDER, TERM, NEWER]
SESSIONS = [0, SESSION, SESSION + 1]

flow_lists = st.lists(st.sampled_from(VALID + INVALID), max_size=5, unique=True)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    term = draw(st.sampled_from(TERMS))
    session = draw(st.sampled_from(SESSIONS))
    seq = draw(st.integers(0, 6))
    kind = draw(st.sampled_from(["snapshot", "delta", "heartbeat", "raw"]))
    if kind == "snapshot":
        parts = snapshot(draw(flow_lists), seq=seq, term=term, session=session)
        msg = parts[draw(st.integers(0, len(parts) - 1))]
    elif kind == "delta":
        ups = draw(flow_lists)
        dels = [f for f in draw(flow_lists) if f not in ups]
        msg = delta(seq, ups, dels, term=term, session=session)
    elif kind == "heartbeat":
        msg = heartbeat(seq, session=session, term=term, pending=draw(st.booleans()))
    else:
        return draw(st.binary(max_size=200))
    if draw(st.booleans()):
        return msg
    # Mutated: flipped bytes, a cut, or junk appended.
    data = bytearray(msg)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data) + draw(st.binary(max_size=8))


MESSAGE_REASONS = {DropReason.MALFORMED_MESSAGE, DropReason.SEQUENCE_GAP, DropReason.OUT_OF_ORDER}


def _batch_of(data: bytes) -> tuple[str, int]:
    """The kind of batch a message is ("" if none) and how many records it carries."""
    resp = sync_pb2.SyncResponse()
    try:
        resp.ParseFromString(data)
    except Exception:
        return "", 0
    if resp.WhichOneof("msg") != "batch":
        return "", 0
    kind = {sync_pb2.Batch.SNAPSHOT: "snapshot", sync_pb2.Batch.DELTA: "delta"}.get(
        resp.batch.kind, ""
    )
    return kind, (len(resp.batch.upserts) + len(resp.batch.deletes)) // records.RECORD_SIZE


def _flow_drops(s: ClientSession) -> int:
    return sum(n for r, n in s.drops.items() if r not in MESSAGE_REASONS)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages(), max_size=25), st.booleans())
def test_fuzzed_streams_never_raise_never_write_unjustified_flows_and_count_refusals(
    stream: list[bytes], land: bool
) -> None:
    s = ClientSession(INDEX, known_term=TERM)
    subscribed(s)
    for data in stream:
        before_refused, before_accepted = s.refused_messages, s.accepted
        before_flow_drops = _flow_drops(s)
        acts = s.receive(data)
        for a in acts:
            if isinstance(a, Write):
                # Justified: every upsert is a whole record of a configured service and
                # one of its backends (validating again keeps all of them).
                assert INDEX.validate(a.upserts, Counter()) == a.upserts
                assert len(a.deletes) % records.RECORD_SIZE == 0
                if land:
                    s.landed(a.applied)
            if isinstance(a, Reconnect):
                s.subscribe(node="lb2")
        # Each message is either accepted or refused and counted, never both.
        refused = s.refused_messages - before_refused
        accepted = s.accepted - before_accepted
        assert refused + accepted == 1
        kind, carried = _batch_of(data)
        if accepted and kind:
            # Every record of an accepted batch is written or dropped by reason (a
            # snapshot's deletes are the stale flows it removes, not records it carried).
            ws = writes(acts)
            written = sum(records.count(w.upserts) for w in ws)
            if kind == "delta":
                written += sum(records.count(w.deletes) for w in ws)
            assert written + _flow_drops(s) - before_flow_drops == carried
    assert s.messages == len(stream) == s.accepted + s.refused_messages
    # Whatever came before, a complete snapshot of a newer term leaves exactly its
    # valid flows held.
    s.subscribe(node="lb2")
    assert s.known_term is not None  # a mutated term may have raised it anywhere
    newest = Term(lease_id=0x9999, revision=s.known_term.revision + 1)
    feed(s, *snapshot(VALID + INVALID, seq=2, term=newest, session=0x77))
    assert s.in_sync and s.session == 0x77
    assert set(s.mirror) == set(records.conn_keys(recs(*VALID)))
