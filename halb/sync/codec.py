"""Pure FlowSync codec: Flow <-> protobuf, validation against the config, messages.

No I/O. The server encodes each batch once (serialized bytes shared by every
standby); the client decodes and validates every flow before it reaches the
dataplane. Validation is what the design demands of a standby: only flows whose
VIP:port/protocol is a configured service and whose backend belongs to that service
are installed; anything else is dropped with a reason and counted.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from halb.model import Flow, IPAddress, Protocol, Service, Term
from halb.sync.pb import sync_pb2

__all__ = [
    "DecodedBatch",
    "DropReason",
    "FlowIndex",
    "FlowKey",
    "decode_flow",
    "decode_flows",
    "decode_response",
    "delta_message",
    "encode_flow",
    "flow_from_key",
    "heartbeat_message",
    "request_ack",
    "request_subscribe",
    "snapshot_messages",
    "term_from_pb",
    "term_is_older",
]

_PROTOCOLS = {p.number: p for p in Protocol}


class DropReason(enum.StrEnum):
    """Why a standby did not install something it received."""

    MALFORMED_MESSAGE = "malformed_message"  # undecodable bytes, missing fields
    MALFORMED_ADDRESS = "malformed_address"  # not 4/16 bytes, or src/VIP families differ
    MALFORMED_PORT = "malformed_port"  # 0 or > 65535
    UNKNOWN_PROTOCOL = "unknown_protocol"  # neither tcp nor udp
    UNKNOWN_SERVICE = "unknown_service"  # VIP:port/proto not configured
    UNKNOWN_BACKEND = "unknown_backend"  # backend not a backend of that service
    STALE_TERM = "stale_term"  # the stream belongs to an older term


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


# --- validation index -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ServiceEntry:
    vip: IPAddress
    protocol: Protocol
    backends: dict[tuple[bytes, int], IPAddress]


class FlowIndex:
    """The configured services keyed by their wire form, for fast validation.

    Built once per config revision. Lookups use the raw bytes from the wire, so only
    the client address needs parsing per flow; the VIP and backend objects are shared.
    """

    def __init__(self, services: Sequence[Service]) -> None:
        self._services: dict[tuple[int, bytes, int], _ServiceEntry] = {}
        for svc in services:
            backends = {(b.address.packed, b.port): b.address for b in (*svc.backends, *svc.sorry)}
            key = (svc.key.protocol.number, svc.key.vip.packed, svc.key.port)
            self._services[key] = _ServiceEntry(svc.key.vip, svc.key.protocol, backends)

    def __len__(self) -> int:
        return len(self._services)

    def lookup(self, proto: int, vip: bytes, vport: int) -> _ServiceEntry | None:
        return self._services.get((proto, vip, vport))


# --- flows ------------------------------------------------------------------------


def encode_flow(flow: Flow, msg: Any) -> None:
    """Fill a sync_pb2.Flow (e.g. one from ``batch.upserts.add()``)."""
    msg.protocol = flow.protocol.number
    msg.src = flow.src.packed
    msg.sport = flow.sport
    msg.vip = flow.vip.packed
    msg.vport = flow.vport
    msg.backend = flow.backend.packed
    msg.bport = flow.bport


def _addr(raw: bytes) -> IPAddress | None:
    n = len(raw)
    if n == 4:
        return ipaddress.IPv4Address(raw)
    if n == 16:
        return ipaddress.IPv6Address(raw)
    return None


# The wire fields of a flow, as a hashable key: (protocol, src, sport, vip, vport,
# backend, bport). Hashing this is far cheaper than hashing a Flow (whose address
# objects hash through hex strings), so the client keeps its bookkeeping in keys.
FlowKey = tuple[int, bytes, int, bytes, int, bytes, int]


def decode_flow(msg: Any, index: FlowIndex, *, in_config: bool = True) -> Flow | DropReason:
    """A validated Flow, or the reason it must not be installed.

    in_config=False checks only that the flow is well-formed: used for deletes, which
    must still reach the dataplane after a service left the config.
    """
    key = (msg.protocol, msg.src, msg.sport, msg.vip, msg.vport, msg.backend, msg.bport)
    return _decode(key, index, in_config)


def _decode(key: FlowKey, index: FlowIndex, in_config: bool) -> Flow | DropReason:
    proto_n, src_raw, sport, vip_raw, vport, be_raw, bport = key
    protocol = _PROTOCOLS.get(proto_n)
    if protocol is None:
        return DropReason.UNKNOWN_PROTOCOL
    if len(vip_raw) not in (4, 16) or len(be_raw) not in (4, 16) or len(src_raw) != len(vip_raw):
        return DropReason.MALFORMED_ADDRESS
    if not (0 < sport < 65536 and 0 < vport < 65536 and 0 < bport < 65536):
        return DropReason.MALFORMED_PORT
    if not in_config:
        return flow_from_key(key)
    svc = index.lookup(proto_n, vip_raw, vport)
    if svc is None:
        return DropReason.UNKNOWN_SERVICE
    backend = svc.backends.get((be_raw, bport))
    if backend is None:
        return DropReason.UNKNOWN_BACKEND
    src = _addr(src_raw)
    assert src is not None  # length checked above
    return Flow(svc.protocol, src, sport, svc.vip, vport, backend, bport)


def flow_from_key(key: FlowKey) -> Flow:
    """The Flow of a key that already passed validation."""
    proto_n, src_raw, sport, vip_raw, vport, be_raw, bport = key
    src, vip, backend = _addr(src_raw), _addr(vip_raw), _addr(be_raw)
    if src is None or vip is None or backend is None or proto_n not in _PROTOCOLS:
        raise ValueError(f"malformed flow key {key!r}")
    return Flow(_PROTOCOLS[proto_n], src, sport, vip, vport, backend, bport)


def decode_flows(
    msgs: Iterable[Any],
    index: FlowIndex,
    drops: Counter[DropReason],
    *,
    in_config: bool = True,
    keys: list[FlowKey] | None = None,
) -> list[Flow]:
    """The valid flows among msgs; every rejected one is counted in drops by reason.
    With `keys`, the wire key of each returned flow is appended to it, in order."""
    out: list[Flow] = []
    append = out.append
    for m in msgs:
        key = (m.protocol, m.src, m.sport, m.vip, m.vport, m.backend, m.bport)
        r = _decode(key, index, in_config)
        if isinstance(r, Flow):
            append(r)
            if keys is not None:
                keys.append(key)
        else:
            drops[r] += 1
    return out


# --- stream messages (server side builds bytes once, shared by every standby) ------


def _response(term: Term, session: int) -> Any:
    resp = sync_pb2.SyncResponse(session=session)
    resp.term.lease_id = term.lease_id
    resp.term.revision = term.revision
    return resp


def snapshot_messages(
    flows: Sequence[Flow], *, term: Term, session: int, sequence: int, batch_size: int
) -> Iterator[bytes]:
    """The serialized SNAPSHOT batches of a full snapshot reflecting `sequence`.

    Always at least one message (an empty snapshot still tells the standby to forget
    what it had). Lazy, so the caller can yield to the event loop between chunks.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = len(flows)
    start = 0
    while True:
        chunk = flows[start : start + batch_size]
        resp = _response(term, session)
        batch = resp.batch
        batch.kind = sync_pb2.Batch.SNAPSHOT
        batch.sequence = sequence
        batch.snapshot_begin = start == 0
        start += len(chunk)
        batch.snapshot_end = start >= total
        add = batch.upserts.add
        for f in chunk:
            encode_flow(f, add())
        yield resp.SerializeToString()
        if start >= total:
            return


def delta_message(
    *,
    term: Term,
    session: int,
    sequence: int,
    upserts: Iterable[Flow],
    deletes: Iterable[Flow],
) -> bytes:
    resp = _response(term, session)
    batch = resp.batch
    batch.kind = sync_pb2.Batch.DELTA
    batch.sequence = sequence
    add = batch.deletes.add
    for f in deletes:
        encode_flow(f, add())
    add = batch.upserts.add
    for f in upserts:
        encode_flow(f, add())
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
    """A response as the client acts on it. `upserts`/`deletes` are already validated."""

    term: Term
    session: int
    kind: str  # "snapshot" | "delta" | "heartbeat"
    sequence: int
    snapshot_begin: bool = False
    snapshot_end: bool = False
    upserts: tuple[Flow, ...] | list[Flow] = ()
    deletes: tuple[Flow, ...] | list[Flow] = ()
    received: int = 0  # flows in the message before validation
    upsert_keys: tuple[FlowKey, ...] | list[FlowKey] = ()  # wire keys of upserts, in order
    delete_keys: tuple[FlowKey, ...] | list[FlowKey] = ()
    snapshot_pending: bool = False  # heartbeat only: a snapshot is being taken


def decode_response(
    data: bytes, index: FlowIndex, drops: Counter[DropReason], known_term: Term | None
) -> DecodedBatch | DropReason:
    """Parse and validate one serialized SyncResponse.

    Returns MALFORMED_MESSAGE for bytes that do not parse or lack a term or a body,
    STALE_TERM (counting each carried flow under that reason) for an older term;
    otherwise the batch with invalid flows dropped and counted.
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
            drops[DropReason.STALE_TERM] += len(resp.batch.upserts) + len(resp.batch.deletes)
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
        if len(b.deletes):
            return DropReason.MALFORMED_MESSAGE
        kind = "snapshot"
    elif b.kind == sync_pb2.Batch.DELTA:
        kind = "delta"
    else:
        return DropReason.MALFORMED_MESSAGE
    upsert_keys: list[FlowKey] = []
    delete_keys: list[FlowKey] = []
    return DecodedBatch(
        term=term,
        session=session,
        kind=kind,
        sequence=int(b.sequence),
        snapshot_begin=bool(b.snapshot_begin),
        snapshot_end=bool(b.snapshot_end),
        upserts=decode_flows(b.upserts, index, drops, keys=upsert_keys),
        deletes=decode_flows(b.deletes, index, drops, in_config=False, keys=delete_keys),
        received=len(b.upserts) + len(b.deletes),
        upsert_keys=upsert_keys,
        delete_keys=delete_keys,
    )


# --- requests (standby -> active) -------------------------------------------------


def request_subscribe(
    *, node: str, known_term: Term | None, session: int, last_sequence: int
) -> bytes:
    req = sync_pb2.SyncRequest()
    sub = req.subscribe
    sub.node = node
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
