"""halb's flows of a conntrack dump as packed flow records, decoded in bulk.

The kernel puts an entry's original and reply tuples first in every dump message, in
a layout fixed per family (ctnetlink_dump_tuples: addresses, then protocol number and
ports), exactly as ctmsg encodes a tuple. The first bytes of all messages of a family
are stacked in one array, checked against that layout, and the record fields are
copied out by numpy: no object per entry. A message that does not fit the layout (a
zone attribute, another protocol) is decoded one by one with ctmsg.decode_entry.
"""

from __future__ import annotations

import functools
import itertools
import socket
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import numpy as np

from halb.dataplane.nft import ctmsg
from halb.dataplane.nft.flows import FlowMap, entry_records
from halb.flows import records as rec

__all__ = ["dump_records", "payload_records"]

_U8 = np.uint8
Rows = np.ndarray[Any, np.dtype[np.uint8]]
_NFGEN = ctmsg.NFGEN_HDR.size


@functools.lru_cache(maxsize=2)
def _layout(v: int) -> tuple[Rows, Rows, dict[str, int]]:
    """(fixed bytes, mask of the fixed bytes, field -> offset) of the two tuples after
    the nfgen header, found by encoding tuples whose every field differs."""
    mk = IPv4Address if v == 4 else IPv6Address
    one = ctmsg.CtTuple(mk(1), mk(2), 6, 0x0102, 0x0304)
    big = (1 << (32 if v == 4 else 128)) - 1
    two = ctmsg.CtTuple(mk(big - 1), mk(big - 2), 17, 0xF0F1, 0xE0E1)

    def enc(t: ctmsg.CtTuple, r: ctmsg.CtTuple) -> Rows:
        raw = ctmsg._tuple(ctmsg.CTA_TUPLE_ORIG, t) + ctmsg._tuple(ctmsg.CTA_TUPLE_REPLY, r)
        return np.frombuffer(raw, _U8)

    a, b = enc(one, one.reverse()), enc(two, two.reverse())
    fixed = a == b
    width = 4 if v == 4 else 16
    half = len(a) // 2
    # Field offsets within one tuple: the first differing runs, in encoding order.
    diff = np.flatnonzero(~fixed[:half]).tolist()
    starts = [diff[0]]
    for p, q in itertools.pairwise(diff):
        if q != p + 1:
            starts.append(q)
    src, dst, proto, sport, dport = starts
    assert [dst - src, proto - dst] == [width + 4, width + 8], starts  # layout sanity
    fields = {"src": src, "dst": dst, "proto": proto, "sport": sport, "dport": dport}
    return a, fixed, {**fields, "reply": half}


def payload_records(payloads: list[bytes], fmap: FlowMap) -> bytes:
    """Records of the payloads (dump messages) that are flows of fmap's services."""
    out: list[bytes] = []
    slow: list[bytes] = []
    for v, fam in ((4, socket.AF_INET), (6, socket.AF_INET6)):
        tmpl, fixed, off = _layout(v)
        size = len(tmpl)
        mine = [p for p in payloads if p[0] == fam]
        fits = [p for p in mine if len(p) >= _NFGEN + size]
        slow += [p for p in mine if len(p) < _NFGEN + size]
        if not fits:
            continue
        head = np.frombuffer(b"".join(p[_NFGEN : _NFGEN + size] for p in fits), _U8)
        head = head.reshape(-1, size)
        ok = (head[:, fixed] == tmpl[fixed]).all(axis=1)
        slow += [p for p, good in zip(fits, ok.tolist(), strict=True) if not good]
        out.append(_rows(head[ok], v, off, fmap))
    if slow:
        entries = [ctmsg.decode_entry(p) for p in slow]
        flows = [fmap.flow_of(e) for e in entries if e is not None]
        out.append(entry_records(fe for fe in flows if fe is not None))
    return b"".join(out)


def _rows(h: Rows, v: int, off: dict[str, int], fmap: FlowMap) -> bytes:
    width = 4 if v == 4 else 16
    r = off["reply"]

    def col(at: int, n: int) -> Rows:
        return h[:, at : at + n]

    o_src, o_dst = col(off["src"], width), col(off["dst"], width)
    o_sport, o_dport = col(off["sport"], 2), col(off["dport"], 2)
    proto = h[:, off["proto"]]
    r_src, r_dst = col(r + off["src"], width), col(r + off["dst"], width)
    r_sport, r_dport = col(r + off["sport"], 2), col(r + off["dport"], 2)
    # A service's entries: protocol, VIP and port of the original destination.
    svc_keys = {
        bytes((k.protocol.number,)) + k.vip.packed + k.port.to_bytes(2, "big")
        for k in fmap.services
        if k.vip.version == v
    }
    keys = np.ascontiguousarray(np.hstack([proto[:, None], o_dst, o_dport]))
    uniq, inverse = np.unique(keys.view(f"V{keys.shape[1]}").ravel(), return_inverse=True)
    known = np.array([bytes(u) in svc_keys for u in uniq], np.bool_)[inverse.ravel()]
    # Traffic to the VIP itself (not translated) is no balanced flow.
    translated = ~((r_src == o_dst).all(axis=1) & (r_sport == o_dport).all(axis=1))
    keep = known & translated
    n = int(keep.sum())
    out = np.zeros((n, rec.RECORD_SIZE), _U8)
    a = 12 if v == 4 else 0
    if v == 4:
        for at in (rec.SRC, rec.VIP, rec.BACKEND):
            out[:, at + 10 : at + 12] = 0xFF  # v4-mapped
    out[:, rec.SRC + a : rec.SRC + 16] = o_src[keep]
    out[:, rec.SPORT : rec.SPORT + 2] = o_sport[keep]
    out[:, rec.PROTO] = proto[keep]
    out[:, rec.VPORT : rec.VPORT + 2] = o_dport[keep]
    out[:, rec.VIP + a : rec.VIP + 16] = o_dst[keep]
    out[:, rec.BPORT : rec.BPORT + 2] = r_sport[keep]
    out[:, rec.BACKEND + a : rec.BACKEND + 16] = r_src[keep]
    # Source translated (fullnat): the reply goes to another address or port.
    snat = ~(
        (r_dst[keep] == o_src[keep]).all(axis=1) & (r_dport[keep] == o_sport[keep]).all(axis=1)
    )
    out[snat, rec.NAT_PORT : rec.NAT_PORT + 2] = r_dport[keep][snat]
    out[snat, rec.NAT_FLAGS] = rec.NAT_SRC
    data: bytes = out.tobytes()
    return data


def dump_records(sock: Any, fmap: FlowMap) -> bytes:
    """Dump the table through ``sock`` (a CtSocket) and return halb's flows as records."""
    return payload_records(list(sock.dump_payloads()), fmap)
