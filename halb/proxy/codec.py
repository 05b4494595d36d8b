"""Build and parse PROXY protocol headers, versions 1 and 2 (HAProxy's specification,
``doc/proxy-protocol.txt``). Pure and sans-IO: bytes in, a header or a verdict out.

``parse(buf)`` follows the receiver rules of the specification:
- a buffer that is still a prefix of a valid header needs more data (``NEED_MORE``);
  with ``final=True`` (the connection ended, or a UDP datagram, which must carry the
  whole header) it is rejected as partial;
- v1: ``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`` in at most 107 bytes, single
  spaces, addresses of the named family in canonical form, ports 0-65535 without
  leading zeros; ``PROXY UNKNOWN...\\r\\n`` is accepted and carries no addresses;
- v2: the 12-byte signature, version 2, command LOCAL or PROXY, a known family and
  transport, a length that holds the family's address block and stays within
  ``max_length``, TLVs that do not overrun it, a CRC32C TLV that matches, a UNIQUE_ID
  of at most 128 bytes. LOCAL (health checks, the sender's own connections) carries no
  addresses the receiver may use.

Every rejection is a ``ProxyError`` whose ``reason`` is one of ``REASONS``, so a caller
counts them by reason.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Final

from halb.model import IPAddress
from halb.proxy.crc32c import crc32c

__all__ = [
    "MAX_V1",
    "NEED_MORE",
    "REASONS",
    "SIGNATURE_V2",
    "Command",
    "Family",
    "Parsed",
    "ProxyError",
    "ProxyHeader",
    "Tlv",
    "TlvType",
    "Transport",
    "build_v1",
    "build_v2",
    "parse",
]

SIGNATURE_V2: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX: Final = b"PROXY "
MAX_V1: Final = 107  # the longest v1 line, CRLF included
V2_FIXED: Final = 16  # signature, version/command, family/transport, length
MAX_UNIQUE_ID: Final = 128
# What a receiver accepts by default: every address block plus room for TLVs.
DEFAULT_MAX_V2: Final = 1024

REASONS: Final = (
    "not_proxy",  # neither a v1 nor a v2 header
    "partial",  # the data ended inside a header
    "v1_too_long",  # no CRLF within 107 bytes
    "v1_syntax",  # wrong token count, spacing or protocol word
    "v1_address",  # not an address of the named family, or not canonical
    "v1_port",  # not a decimal 0-65535 without leading zeros
    "version",  # v2 version nibble is not 2
    "command",  # neither LOCAL nor PROXY
    "family",  # unknown address family
    "transport",  # unknown transport
    "length",  # length shorter than the family's address block
    "too_long",  # header longer than the receiver accepts
    "tlv",  # a TLV overruns the header, or a CRC32C TLV is not 4 bytes
    "crc32c",  # the CRC32C TLV does not match the header
    "unique_id",  # UNIQUE_ID longer than 128 bytes
)


class ProxyError(ValueError):
    """A header the receiver must reject; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Command(IntEnum):
    LOCAL = 0
    PROXY = 1


class Family(IntEnum):
    UNSPEC = 0
    INET = 1
    INET6 = 2
    UNIX = 3


class Transport(IntEnum):
    UNSPEC = 0
    STREAM = 1
    DGRAM = 2


class TlvType(IntEnum):
    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    NOOP = 0x04
    UNIQUE_ID = 0x05
    SSL = 0x20
    NETNS = 0x30


# Bytes of the address block by family: two addresses and two ports (UNIX: two paths).
ADDRESS_BLOCK: Final = {Family.UNSPEC: 0, Family.INET: 12, Family.INET6: 36, Family.UNIX: 216}


@dataclass(frozen=True, slots=True)
class Tlv:
    type: int
    value: bytes


Endpoint = tuple[IPAddress, int]


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One header. ``source`` / ``destination`` are None when the header carries no
    address the receiver may use (LOCAL, v1 UNKNOWN, v2 UNSPEC or UNIX family)."""

    version: int
    command: Command = Command.PROXY
    transport: Transport = Transport.STREAM
    source: Endpoint | None = None
    destination: Endpoint | None = None
    tlvs: tuple[Tlv, ...] = ()

    def tlv(self, kind: int) -> bytes | None:
        return next((t.value for t in self.tlvs if t.type == kind), None)


@dataclass(frozen=True, slots=True)
class Parsed:
    header: ProxyHeader
    length: int  # bytes the header took: the payload starts here


class _NeedMore:
    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = _NeedMore()


# --- building --------------------------------------------------------------------------


def _family_of(src: Endpoint, dst: Endpoint) -> Family:
    if src[0].version != dst[0].version:
        raise ValueError(f"source {src[0]} and destination {dst[0]} differ in family")
    return Family.INET if src[0].version == 4 else Family.INET6


def _check_port(port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is outside 0-65535")


def build_v1(header: ProxyHeader) -> bytes:
    """The v1 line; a header without addresses gives ``PROXY UNKNOWN``."""
    if header.source is None or header.destination is None:
        return b"PROXY UNKNOWN\r\n"
    if header.transport is not Transport.STREAM:
        raise ValueError("PROXY v1 carries TCP only")
    src, dst = header.source, header.destination
    fam = _family_of(src, dst)
    _check_port(src[1])
    _check_port(dst[1])
    word = "TCP4" if fam is Family.INET else "TCP6"
    return f"PROXY {word} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode()


def build_v2(header: ProxyHeader, *, crc: bool = False) -> bytes:
    """The v2 header; ``crc`` appends a CRC32C TLV over the whole header."""
    if header.command is Command.LOCAL or header.source is None or header.destination is None:
        fam, block = Family.UNSPEC, b""
        transport = Transport.UNSPEC if header.command is Command.LOCAL else header.transport
    else:
        src, dst = header.source, header.destination
        fam = _family_of(src, dst)
        _check_port(src[1])
        _check_port(dst[1])
        block = src[0].packed + dst[0].packed + struct.pack("!HH", src[1], dst[1])
        transport = header.transport
    tlvs = b""
    for t in header.tlvs:
        if t.type == TlvType.CRC32C:
            raise ValueError("pass crc=True instead of a CRC32C TLV")
        if t.type == TlvType.UNIQUE_ID and len(t.value) > MAX_UNIQUE_ID:
            raise ValueError(f"UNIQUE_ID is {len(t.value)} bytes, at most {MAX_UNIQUE_ID}")
        if not 0 <= t.type <= 0xFF or len(t.value) > 0xFFFF:
            raise ValueError(f"TLV type {t.type} or length {len(t.value)} out of range")
        tlvs += struct.pack("!BH", t.type, len(t.value)) + t.value
    if crc:
        tlvs += struct.pack("!BH", TlvType.CRC32C, 4) + b"\0\0\0\0"
    body = block + tlvs
    if len(body) > 0xFFFF:
        raise ValueError(f"header body of {len(body)} bytes exceeds 65535")
    out = bytearray(
        SIGNATURE_V2
        + bytes([0x20 | header.command, (fam << 4) | transport])
        + struct.pack("!H", len(body))
        + body
    )
    if crc:
        out[-4:] = struct.pack("!I", crc32c(bytes(out)))
    return bytes(out)


# --- parsing ---------------------------------------------------------------------------


def parse(
    buf: bytes, *, final: bool = False, max_length: int = DEFAULT_MAX_V2
) -> Parsed | _NeedMore:
    """The header at the start of ``buf``, ``NEED_MORE`` while ``buf`` may still become
    one (never with ``final``), or ``ProxyError``."""
    if buf[:12] == SIGNATURE_V2[: len(buf[:12])] and buf[:1] == b"\r":
        return _v2(buf, final, max_length)
    if buf[:6] == V1_PREFIX[: len(buf[:6])] and buf[:1] == b"P":
        return _v1(buf, final)
    if not buf:
        return _more(final, "no data")
    raise ProxyError("not_proxy", f"starts with {buf[:12]!r}")


def _more(final: bool, what: str) -> _NeedMore:
    if final:
        raise ProxyError("partial", what)
    return NEED_MORE


_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")


def _v1_port(tok: bytes) -> int:
    if not _PORT.fullmatch(tok) or int(tok) > 0xFFFF:
        raise ProxyError("v1_port", f"port {tok!r}")
    return int(tok)


def _v1_addr(tok: bytes, version: int) -> IPAddress:
    try:
        text = tok.decode("ascii")
        addr = ip_address(text)
    except (UnicodeDecodeError, ValueError):
        raise ProxyError("v1_address", f"address {tok!r}") from None
    if addr.version != version or str(addr) != text:
        raise ProxyError("v1_address", f"{tok!r} is not a canonical IPv{version} address")
    return addr


def _v1(buf: bytes, final: bool) -> Parsed | _NeedMore:
    end = buf.find(b"\r\n", 0, MAX_V1)
    if end < 0:
        if len(buf) >= MAX_V1:
            raise ProxyError("v1_too_long", f"no CRLF within {MAX_V1} bytes")
        if b"\n" in buf or b"\r" in buf[:-1]:
            raise ProxyError("v1_syntax", "a line break that is not CRLF")
        return _more(final, f"v1 line without CRLF after {len(buf)} bytes")
    line, length = buf[:end], end + 2
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        return Parsed(ProxyHeader(version=1, transport=Transport.UNSPEC), length)
    parts = line.split(b" ")
    if len(parts) != 6 or parts[0] != b"PROXY" or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyError("v1_syntax", f"line {line[:60]!r}")
    version = 4 if parts[1] == b"TCP4" else 6
    src, dst = _v1_addr(parts[2], version), _v1_addr(parts[3], version)
    sport, dport = _v1_port(parts[4]), _v1_port(parts[5])
    header = ProxyHeader(version=1, source=(src, sport), destination=(dst, dport))
    return Parsed(header, length)


def _addresses(fam: Family, block: bytes) -> tuple[Endpoint, Endpoint] | None:
    if fam is Family.INET:
        sport, dport = struct.unpack_from("!HH", block, 8)
        return (IPv4Address(block[0:4]), sport), (IPv4Address(block[4:8]), dport)
    if fam is Family.INET6:
        sport, dport = struct.unpack_from("!HH", block, 32)
        return (IPv6Address(block[0:16]), sport), (IPv6Address(block[16:32]), dport)
    return None  # UNSPEC, UNIX: nothing the receiver may use as an IP endpoint


def _tlvs(raw: bytes, header: bytes, at: int) -> tuple[Tlv, ...]:
    out = []
    i = 0
    while i < len(raw):
        if len(raw) - i < 3:
            raise ProxyError("tlv", f"{len(raw) - i} stray bytes at the end")
        kind, n = raw[i], struct.unpack_from("!H", raw, i + 1)[0]
        value = raw[i + 3 : i + 3 + n]
        if len(value) != n:
            raise ProxyError("tlv", f"TLV 0x{kind:02x} of {n} bytes overruns the header")
        if kind == TlvType.CRC32C:
            if n != 4:
                raise ProxyError("tlv", f"CRC32C TLV of {n} bytes")
            pos = at + i + 3
            zeroed = header[:pos] + b"\0\0\0\0" + header[pos + 4 :]
            if crc32c(zeroed) != struct.unpack("!I", value)[0]:
                raise ProxyError("crc32c", "the CRC32C TLV does not match the header")
        if kind == TlvType.UNIQUE_ID and n > MAX_UNIQUE_ID:
            raise ProxyError("unique_id", f"UNIQUE_ID of {n} bytes")
        out.append(Tlv(kind, value))
        i += 3 + n
    return tuple(out)


def _v2(buf: bytes, final: bool, max_length: int) -> Parsed | _NeedMore:
    if len(buf) < V2_FIXED:
        return _more(final, f"v2 header of {len(buf)} bytes")
    ver, cmd = buf[12] >> 4, buf[12] & 0x0F
    if ver != 2:
        raise ProxyError("version", f"version {ver}")
    if cmd not in (Command.LOCAL, Command.PROXY):
        raise ProxyError("command", f"command {cmd}")
    fam_n, tr_n = buf[13] >> 4, buf[13] & 0x0F
    if fam_n not in Family._value2member_map_:
        raise ProxyError("family", f"family {fam_n}")
    if tr_n not in Transport._value2member_map_:
        raise ProxyError("transport", f"transport {tr_n}")
    fam, transport = Family(fam_n), Transport(tr_n)
    n = struct.unpack_from("!H", buf, 14)[0]
    total = V2_FIXED + n
    if total > max_length:
        raise ProxyError("too_long", f"{total} bytes, at most {max_length} accepted")
    block = ADDRESS_BLOCK[fam]
    if n < block:
        raise ProxyError("length", f"length {n} is shorter than the {fam.name} block ({block})")
    if len(buf) < total:
        return _more(final, f"v2 header of {len(buf)} of {total} bytes")
    header = buf[:total]
    tlvs = _tlvs(header[V2_FIXED + block :], header, V2_FIXED + block)
    addrs = _addresses(fam, header[V2_FIXED : V2_FIXED + block])
    command = Command(cmd)
    if command is Command.LOCAL or addrs is None:
        return Parsed(ProxyHeader(2, command, transport, tlvs=tlvs), total)
    return Parsed(ProxyHeader(2, command, transport, addrs[0], addrs[1], tlvs), total)
