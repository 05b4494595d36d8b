"""CRC32C (Castagnoli), the checksum of the PROXY v2 ``PP2_TYPE_CRC32C`` TLV.

Table-driven and pure: headers are at most a few hundred bytes, so no extension module
is worth a dependency. Checked against the RFC 3720 test vectors in the unit tests.
"""

from __future__ import annotations

__all__ = ["crc32c"]

_POLY = 0x82F63B78  # the Castagnoli polynomial, bit-reversed


def _table() -> tuple[int, ...]:
    out = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        out.append(c)
    return tuple(out)


_TABLE = _table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC32C of ``data``, continuing from ``crc`` (0 to start)."""
    c = crc ^ 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF
