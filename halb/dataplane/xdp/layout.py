"""Python mirror of bpf/structs.h and the map names of bpf/maps.h.

tests/kernel/test_xdp_layout.py checks every structure here against the compiled
object's BTF, so C and Python cannot drift apart silently.
"""

from __future__ import annotations

import ctypes
import ipaddress
import struct

from halb.model import IPAddress

__all__ = [
    "BACKEND_F_TUNNEL",
    "BACKEND_F_VALID",
    "CFG_F_FLOW_EVENTS",
    "FAMILY_V4",
    "FAMILY_V6",
    "FLOW_F_CLOSING",
    "MAP_TYPES",
    "NO_BACKEND",
    "RINGBUF_MAPS",
    "STATS",
    "SVC_F_TUNNEL",
    "BackendInfo",
    "Counter",
    "FlowEvent",
    "FlowKey",
    "FlowValue",
    "LbConfig",
    "ServiceInfo",
    "VipAddr",
    "VipKey",
    "addr_from_words",
    "addr_to_words",
    "mac_from_bytes",
    "mac_to_bytes",
]

FAMILY_V4 = 4
FAMILY_V6 = 6
SVC_F_TUNNEL = 1 << 0
BACKEND_F_VALID = 1 << 0
BACKEND_F_TUNNEL = 1 << 1
CFG_F_FLOW_EVENTS = 1 << 0
"""lb_config.flags: the program writes each new flow to the flow_events ring buffer."""
FLOW_F_CLOSING = 1 << 0
"""flow_value.flags: a FIN or RST was seen, the closing timeout applies."""
NO_BACKEND = 0xFFFFFFFF
"""Ring value of a service with no usable backend: out of range, so the packet drops."""

# stats_global index -> name (constants.h STAT_*)
STATS = {
    0: "deadline_drop",
    1: "no_backend",
    2: "encap_fail",
    3: "arp_fence_drop",
    4: "ns_fence_drop",
    5: "event_lost",  # flow_events was full: the flow source must rescan
    6: "flow_expired",  # a packet found its flow idle past its timeout (ring again)
    7: "flow_swept",  # idle flows the active's scans deleted (user space counts here)
    8: "frag_drop",  # IPv4 fragments for a VIP address (never answered by the stack)
    9: "icmp_relayed",  # frag-needed / packet-too-big sent on to a VIP flow's backend
}

_U8 = ctypes.c_uint8
_U16 = ctypes.c_uint16
_U32 = ctypes.c_uint32
_U64 = ctypes.c_uint64


class VipKey(ctypes.Structure):
    _fields_ = [("addr", _U32 * 4), ("port", _U16), ("proto", _U8), ("family", _U8)]


class ServiceInfo(ctypes.Structure):
    _fields_ = [("index", _U32), ("ring_size", _U32), ("flags", _U32)]


class BackendInfo(ctypes.Structure):
    _fields_ = [
        ("addr", _U32 * 4),
        ("mac", _U8 * 6),
        ("port", _U16),
        ("family", _U8),
        ("flags", _U8),
        ("service", _U16),
    ]


class VipAddr(ctypes.Structure):
    _fields_ = [("addr", _U32 * 4), ("family", _U8), ("pad", _U8 * 3)]


class FlowKey(ctypes.Structure):
    _fields_ = [
        ("src", _U32 * 4),
        ("dst", _U32 * 4),
        ("sport", _U16),
        ("dport", _U16),
        ("proto", _U8),
        ("family", _U8),
        ("pad", _U8 * 2),
    ]


class FlowValue(ctypes.Structure):
    _fields_ = [
        ("backend_id", _U32),
        ("flags", _U32),  # FLOW_F_*: the program's own; not synced
        ("last_seen", _U64),  # jiffies; 0 = written by user space, not seen here yet
    ]


class FlowEvent(ctypes.Structure):
    """A flow_events record. Not in STRUCTS: a type only used for a local variable is
    not in the object's BTF; the record size is checked on a real event instead
    (tests/kernel/test_xdp_events.py), its parts are in STRUCTS."""

    _fields_ = [("key", FlowKey), ("value", FlowValue)]


class LbConfig(ctypes.Structure):
    _fields_ = [
        ("deadline_ns", _U64),
        ("local_v4", _U32),
        ("local_v6", _U32 * 4),
        ("local_mac", _U8 * 6),
        ("pad", _U8 * 2),
        ("flags", _U32),  # CFG_F_*
        ("timeout_tcp", _U64),  # idle timeouts in jiffies (0 = never)
        ("timeout_closing", _U64),
        ("timeout_udp", _U64),
        ("deadline_jiffies", _U64),  # what the program tests (0 = disarmed)
        ("clock_jiffies", _U64),  # the program's clock for user space (halb...clock)
        ("clock_ns", _U64),
        ("tick_ns", _U64),
    ]


class Counter(ctypes.Structure):
    _fields_ = [("packets", _U64), ("bytes", _U64)]


STRUCTS: dict[str, type[ctypes.Structure]] = {
    "vip_key": VipKey,
    "service_info": ServiceInfo,
    "backend_info": BackendInfo,
    "vip_addr": VipAddr,
    "flow_key": FlowKey,
    "flow_value": FlowValue,
    "lb_config": LbConfig,
    "counter": Counter,
}

# map name -> (key type, value type, per-CPU)
CType = type[ctypes.Structure] | type[ctypes.c_uint32]
MAP_TYPES: dict[str, tuple[CType, CType, bool]] = {
    "services": (VipKey, ServiceInfo, False),
    "ring": (_U32, _U32, False),
    "backends": (_U32, BackendInfo, False),
    "vip_addrs": (VipAddr, _U32, False),
    "vip_filter": (_U32, _U32, False),
    "flows": (FlowKey, FlowValue, False),
    "stats_service": (_U32, Counter, True),
    "stats_backend": (_U32, Counter, True),
    "stats_global": (_U32, Counter, True),
    "config": (_U32, LbConfig, False),
}

# Ring buffer maps (no key or value; read through libbpf's ring_buffer) -> record type.
RINGBUF_MAPS: dict[str, type[ctypes.Structure]] = {"flow_events": FlowEvent}


def addr_to_words(addr: IPAddress) -> tuple[int, int, int, int]:
    """Network-order bytes as four native u32 words (IPv4 in word 0), as the C side reads."""
    raw = addr.packed.ljust(16, b"\0")
    words: tuple[int, int, int, int] = struct.unpack("=4I", raw)
    return words


def addr_from_words(words: ctypes.Array[ctypes.c_uint32], family: int) -> IPAddress:
    raw = struct.pack("=4I", *words)
    if family == FAMILY_V4:
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw)


def mac_to_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def mac_from_bytes(raw: bytes | ctypes.Array[ctypes.c_uint8]) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))
