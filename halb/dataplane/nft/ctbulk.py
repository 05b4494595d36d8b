"""Ctnetlink create messages for a whole buffer of flow records at once.

Per flow, building a Flow, checking it and packing its message costs ~50 us of
Python, several times what the kernel needs to create the entry. Records already hold
every field in network byte order at fixed offsets (halb.flows.records), and a create
message of one kind (family, protocol, nat or fullnat to one SNAT address) has a fixed
layout, so the messages of a group are one template repeated, with the record's bytes
copied into their columns by numpy.

The template and its columns come from ctmsg.encode_create itself: each field is
located by encoding the template again with that one field changed and comparing the
bytes, so this module cannot drift from the per-flow encoder (a unit test checks the
two give identical messages).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import numpy as np

from halb.dataplane.nft import ctmsg
from halb.dataplane.nft.flows import FlowMap
from halb.flows import records as rec
from halb.model import Flow, Forwarding, IPAddress, Protocol

__all__ = ["Encoded", "encode_creates"]

_U8 = np.uint8
Rows = np.ndarray[Any, np.dtype[np.uint8]]

# Record columns of each message field (network order already).
_FIELDS = ("src", "sport", "vip", "vport", "backend", "bport", "nport", "seq")


@dataclass(frozen=True, slots=True)
class _Layout:
    template: bytes
    columns: dict[str, list[int]]  # field -> message offsets where its bytes go


def _flow(v: int, proto: Protocol, **change: Any) -> tuple[Flow, int, int]:
    """The template's flow, source NAT port and sequence number, with ``change``."""
    a = ("10.1.2.3", "10.4.5.6", "10.7.8.9") if v == 4 else ("fd01::3", "fd04::6", "fd07::9")
    mk = IPv4Address if v == 4 else IPv6Address
    f: dict[str, Any] = {"src": mk(a[0]), "sport": 1000, "vip": mk(a[1]), "vport": 2000,
                         "backend": mk(a[2]), "bport": 3000, "nport": 4000,
                         "seq": 0x01020304}  # fmt: skip
    f.update(change)
    flow = Flow(proto, f["src"], f["sport"], f["vip"], f["vport"], f["backend"], f["bport"])
    return flow, int(f["nport"]), int(f["seq"])


_ALT4 = {"src": IPv4Address("11.2.3.4"), "vip": IPv4Address("11.5.6.7"),
         "backend": IPv4Address("11.8.9.10")}  # fmt: skip
_ALT6 = {"src": IPv6Address("fe10:1111:2222:3333:4444:5555:6666:7777"),
         "vip": IPv6Address("fe20:1111:2222:3333:4444:5555:6666:7777"),
         "backend": IPv6Address("fe30:1111:2222:3333:4444:5555:6666:7777")}  # fmt: skip
# Every byte differs from the template's value: the diff finds the whole field.
_ALT_PORT = {"sport": 0x7A7B, "vport": 0x6C6D, "bport": 0x5E5F, "nport": 0x4142}
_ALT_SEQ = 0xF0E0D0C0


@functools.lru_cache(maxsize=64)
def _layout(v: int, proto: Protocol, snat: IPAddress | None, timeout: int) -> _Layout:
    def encode(**change: Any) -> bytes:
        flow, nport, seq = _flow(v, proto, **change)
        dnat = ctmsg.NatSpec(flow.backend, flow.bport)
        src = ctmsg.NatSpec(snat, nport) if snat is not None else None
        orig = ctmsg.CtTuple(flow.src, flow.vip, proto.number, flow.sport, flow.vport)
        return ctmsg.encode_create(seq, orig, timeout=timeout, nat_dst=dnat, nat_src=src)

    base = encode()
    alts = _ALT4 if v == 4 else _ALT6
    columns: dict[str, list[int]] = {}
    for name in _FIELDS:
        if name == "nport" and snat is None:
            continue
        if name == "seq":
            alt = encode(seq=_ALT_SEQ)
        elif name in alts:
            alt = encode(**{name: alts[name]})
        else:
            alt = encode(**{name: _ALT_PORT[name]})
        diff = np.flatnonzero(np.frombuffer(base, _U8) != np.frombuffer(alt, _U8)).tolist()
        width = 4 if name == "seq" else (2 if name in _ALT_PORT else (4 if v == 4 else 16))
        starts = diff[::width]
        if len(diff) != width * len(starts) or any(
            diff[i * width : (i + 1) * width] != list(range(st, st + width))
            for i, st in enumerate(starts)
        ):
            raise AssertionError(f"create message field {name} not found whole")
        columns[name] = starts
    return _Layout(base, columns)


@dataclass(slots=True)
class Encoded:
    """The messages of the records this module could encode, and the rest."""

    requests: list[tuple[int, bytes]]  # (seq, message)
    row_of_seq: dict[int, int]  # seq -> record index
    others: list[int]  # record indices for the per-flow path (refusals decided there)


def _service_kinds(fmap: FlowMap) -> dict[bytes, tuple[Protocol, IPAddress | None]]:
    """Record service+backend key -> (protocol, SNAT address or None) for every backend
    this node holds; fullnat services without a SNAT address are left to the slow path
    (which refuses them with a reason)."""
    out: dict[bytes, tuple[Protocol, IPAddress | None]] = {}
    for svc in fmap.services.values():
        k = svc.key
        snat = None
        if svc.forwarding is Forwarding.FULLNAT:
            snat = fmap.snat.get(k.vip)
            if snat is None:
                continue
        for b in (*svc.backends, *svc.sorry):
            key = rec.service_backend_key(k.protocol, k.vip, k.port, b.address, b.port)
            out[key] = (k.protocol, snat)
    return out


def encode_creates(
    records: bytes, fmap: FlowMap, timeouts: Mapping[Protocol, int], next_seq: Any
) -> Encoded:
    """Create messages for ``records`` (validated, halb.flows.records); ``next_seq()``
    numbers them. Records of a service or backend this map does not hold, or that the
    fast path cannot vouch for, are left in ``others``."""
    r = rec.rows(records)
    n = len(r)
    if not n:
        return Encoded([], {}, [])
    kinds = _service_kinds(fmap)
    keys, inverse = rec.lookup_keys(r)
    kind_of = [kinds.get(k) for k in keys]
    v4 = rec.is_v4(r[:, rec.SRC : rec.SRC + 16])
    same_family = (v4 == rec.is_v4(r[:, rec.VIP : rec.VIP + 16])) & (
        v4 == rec.is_v4(r[:, rec.BACKEND : rec.BACKEND + 16])
    )
    flagged = (r[:, rec.NAT_FLAGS] & rec.NAT_SRC) != 0
    requests: list[tuple[int, bytes]] = []
    row_of_seq: dict[int, int] = {}
    others: list[int] = []
    for ki, kind in enumerate(kind_of):
        rows_k = np.flatnonzero(inverse == ki)
        if kind is None:
            others += rows_k.tolist()
            continue
        proto, snat = kind
        for v in (4, 6):
            sel = rows_k[(v4[rows_k] == (v == 4)) & same_family[rows_k]]
            if snat is not None and snat.version != v:
                others += sel.tolist()
                continue
            if len(sel):
                _encode_group(r, sel, v, proto, snat, timeouts[proto], flagged, next_seq,
                              requests, row_of_seq)  # fmt: skip
        bad = rows_k[~same_family[rows_k]]
        others += bad.tolist()
    return Encoded(requests, row_of_seq, sorted(others))


def _encode_group(
    r: Rows,
    sel: np.ndarray[Any, np.dtype[np.intp]],
    v: int,
    proto: Protocol,
    snat: IPAddress | None,
    timeout: int,
    flagged: np.ndarray[Any, np.dtype[np.bool_]],
    next_seq: Any,
    requests: list[tuple[int, bytes]],
    row_of_seq: dict[int, int],
) -> None:
    lay = _layout(v, proto, snat, timeout)
    size = len(lay.template)
    out = np.tile(np.frombuffer(lay.template, _U8), (len(sel), 1))
    g = r[sel]
    a = 12 if v == 4 else 0  # v4-mapped: the address is the last 4 of 16 bytes

    def put(name: str, cols: Rows) -> None:
        for start in lay.columns.get(name, []):
            out[:, start : start + cols.shape[1]] = cols

    put("src", g[:, rec.SRC + a : rec.SRC + 16])
    put("vip", g[:, rec.VIP + a : rec.VIP + 16])
    put("backend", g[:, rec.BACKEND + a : rec.BACKEND + 16])
    put("sport", g[:, rec.SPORT : rec.SPORT + 2])
    put("vport", g[:, rec.VPORT : rec.VPORT + 2])
    put("bport", g[:, rec.BPORT : rec.BPORT + 2])
    if snat is not None:
        # The active's source port when it said, else the client's (what nf_nat keeps).
        nport = np.where(
            flagged[sel, None],
            g[:, rec.NAT_PORT : rec.NAT_PORT + 2],
            g[:, rec.SPORT : rec.SPORT + 2],
        )
        put("nport", nport.astype(_U8))
    seqs = np.array([next_seq() for _ in range(len(sel))], dtype=np.uint32)
    put("seq", seqs.view(_U8).reshape(-1, 4))
    flat = out.tobytes()
    for j, (row, seq) in enumerate(zip(sel.tolist(), seqs.tolist(), strict=True)):
        requests.append((seq, flat[j * size : (j + 1) * size]))
        row_of_seq[seq] = row
