"""Python mirror of bpf/structs.h (keys, values, states, counters of the PROXY protocol
programs). tests/kernel/test_proxyproto_layout.py checks the structures against the
compiled object's BTF and the maps' key and value sizes."""

from __future__ import annotations

import ctypes
from enum import IntEnum

from halb.dataplane.xdp.layout import FAMILY_V4, FAMILY_V6, addr_to_words
from halb.model import IPAddress

__all__ = [
    "MAP_TYPES",
    "MAX_HDR",
    "PP_F_ISN",
    "PP_F_LOST",
    "STATS",
    "STRUCTS",
    "PpConfig",
    "PpFlow",
    "PpKey",
    "PpState",
    "make_flow",
    "make_key",
]

MAX_HDR = 108
"""HALB_PP_MAX_HDR: the longest header the program inserts (a v1 line is <= 107)."""
PP_F_ISN = 1
"""pp_flow.flags: isn_next is known."""
PP_F_LOST = 2
"""pp_flow.flags: SENT, and the backend acked the insertion point after the header went
out (it lacks the header): the next client segment there carries it, whatever its size."""


class PpState(IntEnum):
    PENDING = 0  # nothing inserted yet
    SENT = 1  # inserted; a client segment at the insertion point carries it again
    ACKED = 2  # the backend acknowledged the header: every client segment only shifts
    MISSED = 3  # the entry came after the stream started: the flow is left alone


# pp_stats index -> name (enum pp_stat)
STATS = (
    "inserted",
    "inserted_data",
    "reinserted",
    "trimmed",
    "seq_adjusted",
    "ack_adjusted",
    "sack_adjusted",
    "missed",
    "error",
)

_U8 = ctypes.c_uint8
_U16 = ctypes.c_uint16
_U32 = ctypes.c_uint32


class PpKey(ctypes.Structure):
    _fields_ = [
        ("local", _U32 * 4),
        ("backend", _U32 * 4),
        ("lport", _U16),
        ("bport", _U16),
        ("family", _U8),
        ("pad", _U8 * 3),
    ]


class PpFlow(ctypes.Structure):
    _fields_ = [
        ("isn_next", _U32),
        ("hdr_len", _U16),
        ("state", _U8),
        ("flags", _U8),
        ("hdr", _U8 * MAX_HDR),
    ]


class PpConfig(ctypes.Structure):
    _fields_ = [("mtu", _U32), ("pad", _U32)]


STRUCTS: dict[str, type[ctypes.Structure]] = {
    "pp_key": PpKey,
    "pp_flow": PpFlow,
    "pp_config": PpConfig,
}

CType = type[ctypes.Structure] | type[ctypes.c_uint32] | type[ctypes.c_uint64]
# map name -> (key type, value type, per-CPU)
MAP_TYPES: dict[str, tuple[CType, CType, bool]] = {
    "pp_flows": (PpKey, PpFlow, False),
    "pp_stats": (_U32, ctypes.c_uint64, True),
    "pp_config": (_U32, PpConfig, False),
}


def _net16(port: int) -> int:
    """A port as the u16 the program compares: network byte order read natively."""
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def make_key(local: IPAddress, lport: int, backend: IPAddress, bport: int) -> PpKey:
    """The post-NAT connection as the backend sees it: the balancer's full-NAT source
    (``local``, ``lport``) and the backend."""
    if local.version != backend.version:
        raise ValueError(f"{local} and {backend} differ in family")
    return PpKey(
        local=addr_to_words(local),
        backend=addr_to_words(backend),
        lport=_net16(lport),
        bport=_net16(bport),
        family=FAMILY_V4 if local.version == 4 else FAMILY_V6,
    )


def make_flow(
    header: bytes, isn_next: int | None = None, state: PpState = PpState.PENDING
) -> PpFlow:
    """A flow entry inserting ``header`` at the client's ISN + 1 (``isn_next``; None: the
    program learns it from the client's SYN or the backend's SYN-ACK)."""
    if not 0 < len(header) <= MAX_HDR:
        raise ValueError(f"a PROXY header of {len(header)} bytes (1-{MAX_HDR} fit)")
    flow = PpFlow(
        isn_next=(isn_next or 0) & 0xFFFFFFFF,
        hdr_len=len(header),
        state=int(state),
        flags=0 if isn_next is None else PP_F_ISN,
    )
    # zero after the header: the program sums it in whole 4-byte words
    ctypes.memmove(flow.hdr, header, len(header))
    return flow
