"""Ring slot edits as one raw nf_tables netlink batch (one transaction).

libnftables parses text at ~4.5 us per set element; a backend going down on a
65537-slot ring with ten backends moves ~6,500 slots (13,000 element operations), so
text alone costs ~55 ms. Here the elements are packed with numpy (every element that
goes to one backend chain has the same bytes but its key) and the kernel takes the
whole batch in a few milliseconds. Only what delta.RingEdit describes goes this way;
anything else (chains, rules, counters) is text through libnftables.

Batch: BATCH_BEGIN, DELSETELEM / NEWSETELEM messages (each with an ACK request), and
BATCH_END in one datagram; the kernel applies all of it or none, and answers every
message (errors included) once the batch is done.
"""

from __future__ import annotations

import errno
import itertools
import socket
import struct
from collections.abc import Sequence

import numpy as np

from halb.dataplane.nft import ctmsg
from halb.dataplane.nft.ctsock import SO_SNDBUFFORCE, open_netlink
from halb.dataplane.nft.delta import RingEdit
from halb.dataplane.nft.nftcmd import NftError

__all__ = ["NfTables"]

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NFPROTO_INET = 1
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_DATA_VALUE = 1
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2
NFT_GOTO = -4
_N = ctmsg.NLA_F_NESTED
# An attribute's length is 16 bits: the elements of one message must fit in one.
ELEMENTS_MAX = 0xFFFF - 4
SNDBUF = 64 << 20  # a whole 65537-slot ring (about 6 MB) fits in one batch

# One element with its key (ring slot, host byte order: jhash/numgen results are):
# LIST_ELEM header, KEY header, DATA_VALUE header, the slot; a verdict follows on adds.
_KEY = np.dtype(
    [("len", "=u2"), ("type", "=u2"), ("klen", "=u2"), ("ktype", "=u2"),
     ("vlen", "=u2"), ("vtype", "=u2"), ("slot", "=u4")]
)  # fmt: skip


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length & 3)


def _verdict(chain: str) -> bytes:
    """NFTA_SET_ELEM_DATA of `goto chain`, the same bytes for every slot of a chain."""
    inner = _attr(NFTA_VERDICT_CODE, struct.pack("!i", NFT_GOTO)) + _attr(
        NFTA_VERDICT_CHAIN, chain.encode() + b"\0"
    )
    return _attr(NFTA_SET_ELEM_DATA | _N, _attr(NFTA_DATA_VERDICT | _N, inner))


def _elements(slots: Sequence[int], data: bytes) -> bytes:
    """Packed NFTA_LIST_ELEMs of ``slots``, each followed by ``data``."""
    rows = np.zeros(len(slots), dtype=np.dtype([("k", _KEY), ("d", f"V{len(data)}")]))
    k = rows["k"]
    k["len"] = _KEY.itemsize + len(data)
    k["type"] = NFTA_LIST_ELEM | _N
    k["klen"] = 12
    k["ktype"] = NFTA_SET_ELEM_KEY | _N
    k["vlen"] = 8
    k["vtype"] = NFTA_DATA_VALUE
    k["slot"] = np.asarray(slots, dtype=np.uint32)
    if data:
        rows["d"] = np.frombuffer(data, dtype=f"V{len(data)}")[0]
    return rows.tobytes()


class NfTables:
    """A NETLINK_NETFILTER socket in ``netns`` for nf_tables batches (not thread-safe)."""

    def __init__(self, netns: str | None = None) -> None:
        self.sock = open_netlink(netns, rcvbuf=4 << 20)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SNDBUF)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        # The kernel answers every batch; a silent one is a bug, not a wait.
        self.sock.settimeout(10.0)
        self._seq = itertools.count(1)

    def close(self) -> None:
        self.sock.close()

    def _msg(self, mtype: int, flags: int, family: int, res_id: int, body: bytes) -> bytes:
        seq = next(self._seq) & 0xFFFFFFFF
        head = ctmsg.NFGEN_HDR.pack(family, 0, res_id)
        length = ctmsg.NLMSG_HDR.size + len(head) + len(body)
        return ctmsg.NLMSG_HDR.pack(length, mtype, flags, seq, 0) + head + body

    def ring_edits(self, table: str, edits: Sequence[RingEdit]) -> int:
        """Apply every edit in one transaction (deletes of a map before its adds);
        returns the number of messages. Raises NftError if the kernel refused any of it
        (then nothing changed)."""
        head = _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
        msgs: list[bytes] = []
        flags = ctmsg.NLM_F_REQUEST | ctmsg.NLM_F_ACK
        for e in edits:
            sets = head + _attr(NFTA_SET_ELEM_LIST_SET, e.map.encode() + b"\0")
            groups: list[tuple[int, list[int], bytes]] = [(NFT_MSG_DELSETELEM, list(e.delete), b"")]
            by_chain: dict[str, list[int]] = {}
            for slot, chain in e.add:
                by_chain.setdefault(chain, []).append(slot)
            groups += [(NFT_MSG_NEWSETELEM, s, _verdict(c)) for c, s in sorted(by_chain.items())]
            for kind, slots, data in groups:
                per = max(1, ELEMENTS_MAX // (_KEY.itemsize + len(data)))
                mtype = (NFNL_SUBSYS_NFTABLES << 8) | kind
                extra = ctmsg.NLM_F_CREATE if kind == NFT_MSG_NEWSETELEM else 0
                for i in range(0, len(slots), per):
                    elems = _elements(slots[i : i + per], data)
                    body = sets + _attr(NFTA_SET_ELEM_LIST_ELEMENTS | _N, elems)
                    msgs.append(self._msg(mtype, flags | extra, NFPROTO_INET, 0, body))
        if not msgs:
            return 0
        res = socket.htons(NFNL_SUBSYS_NFTABLES)
        begin = self._msg(NFNL_MSG_BATCH_BEGIN, ctmsg.NLM_F_REQUEST, socket.AF_UNSPEC, res, b"")
        end = self._msg(NFNL_MSG_BATCH_END, ctmsg.NLM_F_REQUEST, socket.AF_UNSPEC, res, b"")
        self.sock.send(begin + b"".join(msgs) + end)
        self._results(begin, msgs)
        return len(msgs)

    def _results(self, begin: bytes, msgs: list[bytes]) -> None:
        waiting = {ctmsg.NLMSG_HDR.unpack_from(m)[3] for m in msgs}
        begin_seq = ctmsg.NLMSG_HDR.unpack_from(begin)[3]
        failed: list[int] = []
        while waiting:
            for m in ctmsg.parse(self.sock.recv(1 << 20)):
                if m.type != ctmsg.NLMSG_ERROR:
                    continue
                code = ctmsg.decode_error(m.payload)
                if code:
                    failed.append(code)
                if m.seq == begin_seq:
                    waiting.clear()  # the whole batch was refused (commit failed)
                waiting.discard(m.seq)
        if failed:
            names = sorted({errno.errorcode.get(c, str(c)) for c in failed})
            raise NftError("nf_tables ring update refused", ", ".join(names))
