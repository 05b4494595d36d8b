"""The XDP flow map <-> packed flow records (halb.flows.records), in bulk.

FlowSync moves flows from the active's flow map into the standby's as packed records.
Here both conversions work on whole batches with numpy, and the map is read and
written with libbpf's batch calls on raw buffers, so no Python object is made per
flow on either end:

- map_to_records: raw batch-dump bytes (``struct flow_key`` 40 bytes, ``struct
  flow_value`` {backend_id, flags}) -> records, the backend id translated through a
  BackendTable (id -> backend address and port);
- records_to_map: records -> raw keys and values, the backend id found by the
  record's service and backend (bytes [18, 56)), records of no known pair skipped;
- read_all / update / delete: the raw batch map calls.

The byte offsets come from the ctypes layout (itself checked against the object's BTF).
Map keys hold addresses as network-order bytes, IPv4 in the first 4 bytes with a
family byte; ports are network order.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from halb.dataplane.xdp import libbpf as lb
from halb.dataplane.xdp.layout import FAMILY_V4, FAMILY_V6, FlowKey, FlowValue
from halb.dataplane.xdp.loader import BpfMap
from halb.flows import records as rec
from halb.model import IPAddress

__all__ = [
    "KEY_SIZE",
    "VALUE_SIZE",
    "BackendTable",
    "backend_known",
    "delete",
    "map_to_records",
    "read_all",
    "records_to_keys",
    "records_to_map",
    "update",
]

KEY_SIZE = ctypes.sizeof(FlowKey)
VALUE_SIZE = ctypes.sizeof(FlowValue)
_K_SRC, _K_DST = FlowKey.src.offset, FlowKey.dst.offset
_K_SPORT, _K_DPORT = FlowKey.sport.offset, FlowKey.dport.offset
_K_PROTO, _K_FAMILY = FlowKey.proto.offset, FlowKey.family.offset
_V_BID = FlowValue.backend_id.offset // 4  # in u32 words
_U32 = np.dtype(np.uint32).newbyteorder("=" if sys.byteorder == "little" else ">")
_CHUNK = 16384  # entries per batch syscall
_ENOENT = 2

U8Rows = np.ndarray[Any, np.dtype[np.uint8]]


@dataclass(frozen=True, slots=True)
class BackendTable:
    """Backend id -> record bytes [38, 56) (port big-endian, address 16 bytes), for
    the ids that name a backend; built once per conversion from a small mapping."""

    rows: U8Rows  # (size, 18)
    valid: np.ndarray[Any, np.dtype[np.bool_]]  # (size,)

    @classmethod
    def build(cls, backends: Mapping[int, tuple[IPAddress, int]]) -> BackendTable:
        size = max(backends, default=-1) + 1
        rows = np.zeros((size, rec.NAT_PORT - rec.BPORT), np.uint8)
        valid = np.zeros(size, np.bool_)
        for bid, (addr, port) in backends.items():
            rows[bid] = np.frombuffer(port.to_bytes(2, "big") + rec.addr16(addr), np.uint8)
            valid[bid] = True
        return cls(rows, valid)


def _mapped(v4_words: U8Rows) -> U8Rows:
    """(n, 4) IPv4 addresses -> (n, 16) v4-mapped."""
    out = np.zeros((len(v4_words), 16), np.uint8)
    out[:, 10:12] = 0xFF
    out[:, 12:] = v4_words
    return out


def backend_known(values: bytes, table: BackendTable) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """For each raw flow value: whether the table names its backend id."""
    bid = np.frombuffer(values, _U32).reshape(-1, VALUE_SIZE // 4)[:, _V_BID]
    size = len(table.valid)
    if not size:
        return np.zeros(len(bid), np.bool_)
    known: np.ndarray[Any, np.dtype[np.bool_]] = (bid < size) & table.valid[
        np.minimum(bid, size - 1)
    ]
    return known


def map_to_records(keys: bytes, values: bytes, table: BackendTable) -> tuple[bytes, int]:
    """Records of raw flow-map entries, in order, and how many were left out because
    their backend id is not in the table."""
    k = np.frombuffer(keys, np.uint8).reshape(-1, KEY_SIZE)
    bid = np.frombuffer(values, _U32).reshape(-1, VALUE_SIZE // 4)[:, _V_BID]
    n = len(k)
    if len(bid) != n:
        raise ValueError(f"{n} flow keys but {len(bid)} values")
    ok = backend_known(values, table)
    if not ok.all():
        k, bid = k[ok], bid[ok]
    out = np.empty((len(k), rec.RECORD_SIZE), np.uint8)
    v4 = k[:, _K_FAMILY] == FAMILY_V4
    for r_off, k_off in ((rec.SRC, _K_SRC), (rec.VIP, _K_DST)):
        out[:, r_off : r_off + 16] = k[:, k_off : k_off + 16]
        out[v4, r_off : r_off + 16] = _mapped(k[v4, k_off : k_off + 4])
    out[:, rec.SPORT : rec.SPORT + 2] = k[:, _K_SPORT : _K_SPORT + 2]
    out[:, rec.PROTO] = k[:, _K_PROTO]
    out[:, rec.RESERVED] = 0
    out[:, rec.VPORT : rec.VPORT + 2] = k[:, _K_DPORT : _K_DPORT + 2]
    out[:, rec.BPORT : rec.NAT_PORT] = table.rows[bid]
    out[:, rec.NAT_PORT :] = 0  # XDP translates no source
    return out.tobytes(), n - len(k)


def _keys(r: U8Rows) -> U8Rows:
    """(n, 40) flow_key rows of (n, 56) record rows."""
    out = np.zeros((len(r), KEY_SIZE), np.uint8)
    v4 = rec.is_v4(r[:, rec.VIP : rec.VIP + 16])
    v6 = ~v4
    for r_off, k_off in ((rec.SRC, _K_SRC), (rec.VIP, _K_DST)):
        out[v4, k_off : k_off + 4] = r[v4, r_off + 12 : r_off + 16]
        out[v6, k_off : k_off + 16] = r[v6, r_off : r_off + 16]
    out[:, _K_SPORT : _K_SPORT + 2] = r[:, rec.SPORT : rec.SPORT + 2]
    out[:, _K_DPORT : _K_DPORT + 2] = r[:, rec.VPORT : rec.VPORT + 2]
    out[:, _K_PROTO] = r[:, rec.PROTO]
    out[:, _K_FAMILY] = np.where(v4, FAMILY_V4, FAMILY_V6)
    return out


def records_to_keys(records: bytes) -> bytes:
    """The raw flow keys of records (their connection part only)."""
    keys: bytes = _keys(rec.rows(records)).tobytes()
    return keys


def records_to_map(records: bytes, backend_ids: Mapping[bytes, int]) -> tuple[bytes, bytes]:
    """Raw keys and values for records; backend_ids maps a record's bytes [18, 56)
    (service and backend, see halb.flows.records.service_backend_key) to the backend
    id. Records whose pair is not in it are left out (count: len(keys) // KEY_SIZE)."""
    r = rec.rows(records)
    if not len(r):
        return b"", b""
    uniq, inverse = rec.lookup_keys(r)
    bid = np.array([backend_ids.get(u, -1) for u in uniq], np.int64)[inverse]
    ok = bid >= 0
    if not ok.all():
        r, bid = r[ok], bid[ok]
    values = np.zeros((len(r), VALUE_SIZE // 4), _U32)
    values[:, _V_BID] = bid
    return _keys(r).tobytes(), values.tobytes()


# --- raw batch map calls -------------------------------------------------------------


def _sizes(m: BpfMap) -> tuple[int, int]:
    if m.percpu:
        raise ValueError(f"{m.name}: raw batch access is for plain maps")
    return ctypes.sizeof(m.key_type), ctypes.sizeof(m.value_type)


def read_all(m: BpfMap) -> tuple[bytes, bytes]:
    """Every entry of a hash map as raw keys and values (same order), by batch lookup."""
    _sizes(m)  # plain maps only
    keys: list[bytes] = []
    values: list[bytes] = []
    for k, v, _ in m.raw_batches(_CHUNK):
        keys.append(k)
        values.append(v)
    return b"".join(keys), b"".join(values)


def update(m: BpfMap, keys: bytes, values: bytes) -> int:
    """Write raw entries (any existing ones replaced); returns how many."""
    ksize, vsize = _sizes(m)
    n = len(keys) // ksize
    if len(keys) != n * ksize or len(values) != n * vsize:
        raise ValueError(f"{m.name}: {len(keys)} key bytes and {len(values)} value bytes")
    if not n:
        return 0
    kbuf = ctypes.create_string_buffer(keys, len(keys))
    vbuf = ctypes.create_string_buffer(values, len(values))
    kaddr, vaddr = ctypes.addressof(kbuf), ctypes.addressof(vbuf)
    opts = lb.BpfMapBatchOpts(sz=ctypes.sizeof(lb.BpfMapBatchOpts), elem_flags=lb.BPF_ANY)
    done = 0
    while done < n:
        count = ctypes.c_uint32(min(_CHUNK, n - done))
        ret = lb.lib.bpf_map_update_batch(
            m.fd,
            kaddr + done * ksize,
            vaddr + done * vsize,
            ctypes.byref(count),
            ctypes.byref(opts),
        )
        lb.check(ret, f"batch update of {m.name}")
        done += count.value
    return done


def delete(m: BpfMap, keys: bytes) -> int:
    """Delete the raw keys that exist; returns how many were deleted."""
    ksize, _ = _sizes(m)
    n = len(keys) // ksize
    if len(keys) != n * ksize:
        raise ValueError(f"{m.name}: {len(keys)} key bytes")
    if not n:
        return 0
    kbuf = ctypes.create_string_buffer(keys, len(keys))
    kaddr = ctypes.addressof(kbuf)
    opts = lb.BpfMapBatchOpts(sz=ctypes.sizeof(lb.BpfMapBatchOpts))
    pos = deleted = 0
    while pos < n:
        count = ctypes.c_uint32(min(_CHUNK, n - pos))
        ret = lb.lib.bpf_map_delete_batch(
            m.fd, kaddr + pos * ksize, ctypes.byref(count), ctypes.byref(opts)
        )
        deleted += count.value
        pos += count.value
        if ret == -_ENOENT:
            pos += 1  # the kernel stops at the first missing key: skip it, go on
        else:
            lb.check(ret, f"batch delete from {m.name}")
    return deleted
