"""The PROXY protocol codec (halb.proxy): the specification's examples, every receiver
rule as its own rejection reason, round trips as hypothesis properties, and a mutation
fuzz run in which nothing but a header, NEED_MORE or a ProxyError ever comes out."""

from __future__ import annotations

import random
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halb.proxy.codec import (
    MAX_V1,
    NEED_MORE,
    REASONS,
    SIGNATURE_V2,
    Command,
    Parsed,
    ProxyError,
    ProxyHeader,
    Tlv,
    TlvType,
    Transport,
    build_v1,
    build_v2,
    parse,
)
from halb.proxy.crc32c import crc32c

pytestmark = pytest.mark.unit

SRC4 = (IPv4Address("192.168.0.1"), 56324)
DST4 = (IPv4Address("192.168.0.11"), 443)


def parsed(buf: bytes, **kw: object) -> Parsed:
    out = parse(buf, **kw)  # type: ignore[arg-type]
    assert isinstance(out, Parsed), out
    return out


def reason(buf: bytes, **kw: object) -> str:
    with pytest.raises(ProxyError) as e:
        parse(buf, **kw)  # type: ignore[arg-type]
    return e.value.reason


def test_crc32c_matches_the_rfc_3720_vectors() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(b"56789", crc32c(b"1234")) == crc32c(b"123456789")


def test_the_specifications_v1_examples() -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    p = parsed(line + b"GET / HTTP/1.1\r\n")
    assert p.length == len(line)
    assert (p.header.version, p.header.source, p.header.destination) == (1, SRC4, DST4)
    assert build_v1(p.header) == line
    # The worst case is exactly 107 bytes and must be accepted.
    full = "ffff:" * 7 + "ffff"
    worst = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(worst) == MAX_V1
    u = parsed(worst)
    assert u.header.source is None and u.length == MAX_V1
    assert parsed(b"PROXY UNKNOWN\r\n").header.transport is Transport.UNSPEC
    six = parsed(f"PROXY TCP6 {full} ::1 65535 0\r\n".encode()).header
    assert six.source == (IPv6Address(full), 65535) and six.destination == (IPv6Address("::1"), 0)


def test_a_v2_header_of_the_specification_shape() -> None:
    hdr = ProxyHeader(2, Command.PROXY, Transport.STREAM, SRC4, DST4)
    raw = build_v2(hdr)
    assert raw[:12] == SIGNATURE_V2 and raw[12] == 0x21 and raw[13] == 0x11
    assert struct.unpack("!H", raw[14:16])[0] == 12 and len(raw) == 28
    assert parsed(raw + b"payload") == Parsed(hdr, 28)
    local = build_v2(ProxyHeader(2, Command.LOCAL))
    assert local == SIGNATURE_V2 + b"\x20\x00\x00\x00"
    p = parsed(local).header
    assert p.command is Command.LOCAL and p.source is None


def test_local_carries_no_usable_addresses_even_with_an_address_block() -> None:
    raw = bytearray(build_v2(ProxyHeader(2, Command.PROXY, Transport.STREAM, SRC4, DST4)))
    raw[12] = 0x20  # LOCAL, addresses still present: the receiver must ignore them
    assert parsed(bytes(raw)).header.source is None


def test_tlvs_and_crc32c() -> None:
    tlvs = (Tlv(TlvType.UNIQUE_ID, b"flow-1234"), Tlv(TlvType.AUTHORITY, b"example.org"))
    hdr = ProxyHeader(2, Command.PROXY, Transport.DGRAM, SRC4, DST4, tlvs)
    raw = build_v2(hdr, crc=True)
    got = parsed(raw, final=True).header
    assert got.tlv(TlvType.UNIQUE_ID) == b"flow-1234" and got.transport is Transport.DGRAM
    assert got.tlv(TlvType.CRC32C) is not None
    bad = bytearray(raw)
    bad[20] ^= 0x01  # a flipped address bit
    assert reason(bytes(bad)) == "crc32c"


@pytest.mark.parametrize(
    ("buf", "want"),
    [
        (b"GET / HTTP/1.1\r\n", "not_proxy"),
        (b"PROXY TCP4 " + b"1" * 120, "v1_too_long"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "v1_syntax"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "v1_syntax"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1_syntax"),
        (b"PROXY UNKNOWNX\r\n", "v1_syntax"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "v1_address"),
        (b"PROXY TCP6 ::0001 ::1 1 2\r\n", "v1_address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "v1_port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "v1_port"),
        (SIGNATURE_V2 + b"\x31\x11\x00\x0c" + bytes(12), "version"),
        (SIGNATURE_V2 + b"\x22\x11\x00\x0c" + bytes(12), "command"),
        (SIGNATURE_V2 + b"\x21\x41\x00\x0c" + bytes(12), "family"),
        (SIGNATURE_V2 + b"\x21\x13\x00\x0c" + bytes(12), "transport"),
        (SIGNATURE_V2 + b"\x21\x21\x00\x0c" + bytes(12), "length"),
        (SIGNATURE_V2 + b"\x21\x11\xff\xff", "too_long"),
        (SIGNATURE_V2 + b"\x21\x11\x00\x0e" + bytes(12) + b"\x01\x00", "tlv"),
        (SIGNATURE_V2 + b"\x21\x11\x00\x11" + bytes(12) + b"\x01\x00\x05\x00\x00", "tlv"),
        (SIGNATURE_V2 + b"\x21\x11\x00\x11" + bytes(12) + b"\x03\x00\x02\x00\x00", "tlv"),
        (
            SIGNATURE_V2 + b"\x21\x11\x00\x90" + bytes(12) + b"\x05\x00\x81" + bytes(129),
            "unique_id",
        ),
    ],
)
def test_each_receiver_rule_rejects_with_its_reason(buf: bytes, want: str) -> None:
    assert want in REASONS
    assert reason(buf) == want


def test_a_partial_header_needs_more_then_is_rejected_when_final() -> None:
    for raw in (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        build_v2(ProxyHeader(2, Command.PROXY, Transport.STREAM, SRC4, DST4), crc=True),
    ):
        for cut in range(len(raw)):
            assert parse(raw[:cut]) is NEED_MORE, cut
            assert reason(raw[:cut], final=True) == "partial"


def test_the_receiver_limit_is_the_callers() -> None:
    big = ProxyHeader(2, Command.PROXY, Transport.STREAM, SRC4, DST4, (Tlv(0xE0, bytes(600)),))
    raw = build_v2(big)
    assert reason(raw, max_length=512) == "too_long"
    assert parsed(raw, max_length=2048).header.tlvs == big.tlvs


def test_building_refuses_what_no_receiver_accepts() -> None:
    six = (IPv6Address("::1"), 1)
    with pytest.raises(ValueError, match="differ in family"):
        build_v2(ProxyHeader(2, source=SRC4, destination=six))
    with pytest.raises(ValueError, match="TCP only"):
        build_v1(ProxyHeader(1, transport=Transport.DGRAM, source=SRC4, destination=DST4))
    with pytest.raises(ValueError, match="UNIQUE_ID"):
        build_v2(ProxyHeader(2, source=SRC4, destination=DST4, tlvs=(Tlv(5, bytes(129)),)))
    with pytest.raises(ValueError, match="port"):
        build_v1(ProxyHeader(1, source=(SRC4[0], 70000), destination=DST4))


v4 = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
v6 = st.builds(IPv6Address, st.integers(0, 2**128 - 1))
port = st.integers(0, 65535)
pair = st.one_of(
    st.tuples(st.tuples(v4, port), st.tuples(v4, port)),
    st.tuples(st.tuples(v6, port), st.tuples(v6, port)),
)
tlv = st.builds(
    Tlv,
    st.sampled_from([TlvType.ALPN, TlvType.AUTHORITY, TlvType.NOOP, TlvType.UNIQUE_ID, 0xE1]),
    st.binary(max_size=64),
)


@given(pair, st.binary(max_size=32))
def test_v1_round_trip(ends: tuple[tuple[object, int], ...], payload: bytes) -> None:
    src, dst = ends
    hdr = ProxyHeader(1, source=src, destination=dst)  # type: ignore[arg-type]
    raw = build_v1(hdr)
    got = parsed(raw + payload)
    assert got.header == hdr and (raw + payload)[got.length :] == payload


@given(
    pair,
    st.sampled_from([Transport.STREAM, Transport.DGRAM]),
    st.lists(tlv, max_size=4),
    st.booleans(),
    st.binary(max_size=32),
)
def test_v2_round_trip(
    ends: tuple[tuple[object, int], ...],
    transport: Transport,
    tlvs: list[Tlv],
    crc: bool,
    payload: bytes,
) -> None:
    src, dst = ends
    hdr = ProxyHeader(2, Command.PROXY, transport, src, dst, tuple(tlvs))  # type: ignore[arg-type]
    raw = build_v2(hdr, crc=crc)
    got = parsed(raw + payload)
    assert got.length == len(raw) and (raw + payload)[got.length :] == payload
    assert got.header.source == src and got.header.destination == dst
    assert [t for t in got.header.tlvs if t.type != TlvType.CRC32C] == tlvs


@settings(max_examples=300)
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes_never_crash(buf: bytes, final: bool) -> None:
    try:
        parse(buf, final=final)
    except ProxyError as exc:
        assert exc.reason in REASONS


def test_mutation_fuzz_never_crashes() -> None:
    """20,000 mutated valid headers (flips, cuts, insertions), fixed seed: the parser
    returns a header or NEED_MORE, or raises ProxyError with a known reason."""
    rng = random.Random(0x9D0)
    seeds = [
        build_v1(ProxyHeader(1, source=SRC4, destination=DST4)),
        b"PROXY UNKNOWN\r\n",
        build_v2(ProxyHeader(2, source=SRC4, destination=DST4), crc=True),
        build_v2(
            ProxyHeader(
                2,
                source=(IPv6Address("2001:db8::1"), 1),
                destination=(IPv6Address("2001:db8::2"), 2),
                tlvs=(Tlv(TlvType.UNIQUE_ID, b"x" * 128), Tlv(TlvType.SSL, b"\x01" * 9)),
            )
        ),
        build_v2(ProxyHeader(2, Command.LOCAL)),
    ]
    outcomes: dict[str, int] = {}
    for _ in range(20_000):
        buf = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            i = rng.randrange(len(buf) + 1)
            if op == 0 and buf:
                buf[min(i, len(buf) - 1)] ^= 1 << rng.randrange(8)
            elif op == 1:
                del buf[i:]
            else:
                buf[i:i] = bytes([rng.randrange(256)])
        try:
            out = parse(bytes(buf), final=rng.random() < 0.5)
            key = "more" if out is NEED_MORE else "header"
        except ProxyError as exc:
            key = exc.reason
        outcomes[key] = outcomes.get(key, 0) + 1
    # The mutations reach many rules, not one early exit.
    assert len(outcomes) >= 10, outcomes
