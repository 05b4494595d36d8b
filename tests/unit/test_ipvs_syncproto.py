from __future__ import annotations

import struct
from ipaddress import ip_address

import pytest

from halb.dataplane.ipvs.syncproto import (
    HEADER,
    MAX_CONNS_PER_MESSAGE,
    TCP_STATE,
    SyncConn,
    SyncError,
    decode,
    encode,
    encode_all,
)
from halb.model import Protocol


def conn(i: int = 1, v6: bool = False, proto: Protocol = Protocol.TCP) -> SyncConn:
    a = (lambda n: ip_address(f"fd00::{n:x}")) if v6 else (lambda n: ip_address(0x0A000000 + n))
    return SyncConn(proto, a(i), 1000 + i, a(100), 80, a(200 + i % 3), 8080, flags=3)


def test_ipv4_entry_layout_matches_the_kernel_struct() -> None:
    msg = encode([conn(2)], sync_id=72)
    reserved, sync_id, size, count, version, spare = HEADER.unpack_from(msg)
    assert (reserved, sync_id, size, count, version, spare) == (0, 72, len(msg), 1, 1, 0)
    entry = msg[HEADER.size :]
    assert len(entry) == 36  # sizeof(struct ip_vs_sync_v4)
    kind, proto, ver_size, flags, state, cport, vport, dport = struct.unpack_from(
        "!BBHIHHHH", entry
    )
    assert (kind, proto, ver_size, flags) == (0, 6, 36, 3)
    assert (state, cport, vport, dport) == (TCP_STATE["ESTABLISHED"], 1002, 80, 8080)
    assert entry[24:28] == ip_address("10.0.0.2").packed  # caddr after fwmark, timeout


def test_ipv6_entry_is_type_1_and_72_bytes() -> None:
    msg = encode([conn(1, v6=True)], sync_id=1)
    assert msg[HEADER.size] == 1
    assert len(msg) == HEADER.size + 72


def test_udp_state_is_always_zero() -> None:
    (c,) = decode(encode([conn(proto=Protocol.UDP)], 1))[1]
    assert c.state == 0


def test_roundtrip() -> None:
    conns = [conn(i) for i in range(10)] + [conn(i, v6=True) for i in range(3)]
    sync_id, back = decode(encode(conns, 9))
    assert sync_id == 9
    assert back == conns


def test_encode_all_splits_at_the_count_limit_and_loses_nothing() -> None:
    conns = [conn(i) for i in range(600)]
    messages = list(encode_all(conns, 5))
    assert [m[4] for m in messages] == [255, 255, 90]
    assert [c for m in messages for c in decode(m)[1]] == conns


def test_encode_all_respects_the_size_limit() -> None:
    messages = list(encode_all([conn(i) for i in range(100)], 5, max_size=1472))
    assert all(len(m) <= 1472 for m in messages)
    assert sum(m[4] for m in messages) == 100


def test_encode_refuses_too_many() -> None:
    with pytest.raises(SyncError):
        encode([conn(i) for i in range(MAX_CONNS_PER_MESSAGE + 1)], 1)


def test_mixed_families_refused() -> None:
    bad = SyncConn(
        Protocol.TCP,
        ip_address("10.0.0.1"),
        1,
        ip_address("fd00::1"),
        80,
        ip_address("10.0.0.2"),
        80,
        0,
    )
    with pytest.raises(SyncError):
        encode([bad], 1)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m[:-1],  # size field no longer matches
        lambda m: bytes([1]) + m[1:],  # reserved byte set: a version 0 message
        lambda m: m[:2] + struct.pack("!H", len(m)) + bytes([2]) + m[5:],  # count too high
    ],
)
def test_decode_rejects_what_the_kernel_would_drop(mutate: object) -> None:
    msg = encode([conn(1)], 1)
    with pytest.raises(SyncError):
        decode(mutate(msg))  # type: ignore[operator]
