"""Raw nf_tables netlink: in-place updates without rule changes as one batch (one
transaction), and reading counters.

libnftables parses text at ~4.5 us per set element; a backend going down on a
65537-slot ring with ten backends moves ~6,500 slots (13,000 element operations), so
text alone costs ~55 ms. Here the elements are packed with numpy (every element that
goes to one backend has the same bytes but its key) and the kernel takes the
whole batch in a few milliseconds. Only what delta.RingEdit describes goes this way;
anything else (rules, counters, set elements) is text through libnftables.

Batch: BATCH_BEGIN, DELSETELEM / NEWSETELEM messages (each with an ACK request), and
BATCH_END in one datagram; the kernel applies all of it or none, and answers every
message (errors included) once the batch is done.
"""

from __future__ import annotations

import errno
import itertools
import socket
import struct
import threading
from collections.abc import Sequence

import numpy as np

from halb.dataplane.base import Counter
from halb.dataplane.nft import ctmsg
from halb.dataplane.nft.ctsock import SO_SNDBUFFORCE, open_netlink
from halb.dataplane.nft.delta import BackendElem, ChainFill, CounterOp, Op, RingEdit, Update
from halb.dataplane.nft.nftcmd import NftError
from halb.dataplane.nft.ruleset import BackendKey, Endpoint

__all__ = ["NfTables"]

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NFT_MSG_NEWOBJ = 18
NFT_MSG_GETOBJ = 19
NFT_MSG_DELOBJ = 20
NFTA_SET_ELEM_OBJREF = 9  # after NFTA_SET_ELEM_PAD (8)
NFTA_OBJ_TABLE = 1
NFTA_OBJ_NAME = 2
NFTA_OBJ_TYPE = 3
NFTA_OBJ_DATA = 4
NFT_OBJECT_COUNTER = 1
NFTA_COUNTER_BYTES = 1
NFTA_COUNTER_PACKETS = 2
NFPROTO_INET = 1
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_DATA_VALUE = 1
_N = ctmsg.NLA_F_NESTED
# An attribute's length is 16 bits: the elements of one message must fit in one.
ELEMENTS_MAX = 0xFFFF - 4
SNDBUF = 64 << 20  # a whole 65537-slot ring (about 6 MB) fits in one batch

# One element with its key (ring slot, host byte order: jhash/numgen results are):
# LIST_ELEM header, KEY header, DATA_VALUE header, the slot; the endpoint follows on adds.
_KEY = np.dtype(
    [("len", "=u2"), ("type", "=u2"), ("klen", "=u2"), ("ktype", "=u2"),
     ("vlen", "=u2"), ("vtype", "=u2"), ("slot", "=u4")]
)  # fmt: skip


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length & 3)


def _endpoint_value(e: Endpoint) -> bytes:
    """`address . port` as nf_tables holds it: each part of a concatenation takes whole
    32-bit registers, so the port is two bytes in network order and two of padding."""
    return e[0].packed + struct.pack("!H", e[1]) + b"\0\0"


def _endpoint(e: Endpoint) -> bytes:
    """NFTA_SET_ELEM_DATA of `address . port`, the same bytes for every slot of a
    backend."""
    return _attr(NFTA_SET_ELEM_DATA | _N, _attr(NFTA_DATA_VALUE, _endpoint_value(e)))


def _backend_value(k: BackendKey) -> bytes:
    """`address . protocol . port` (inet_proto padded to a register too)."""
    return k[0].packed + bytes((k[1].number, 0, 0, 0)) + struct.pack("!H", k[2]) + b"\0\0"


def _one_element(key: bytes, extra: bytes = b"") -> bytes:
    inner = _attr(NFTA_SET_ELEM_KEY | _N, _attr(NFTA_DATA_VALUE, key)) + extra
    return _attr(NFTA_SET_ELEM_LIST_ELEMENTS | _N, _attr(NFTA_LIST_ELEM | _N, inner))


def _string(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


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
    """A NETLINK_NETFILTER socket in ``netns`` for nf_tables requests; one at a time
    (a metrics thread reads counters while the agent applies changes)."""

    def __init__(self, netns: str | None = None) -> None:
        self.sock = open_netlink(netns, rcvbuf=4 << 20)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SNDBUF)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        # The kernel answers every batch; a silent one is a bug, not a wait.
        self.sock.settimeout(10.0)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
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
        return self._apply(self._ring_msgs(table, edits))

    def update(self, table: str, upd: Update) -> int:
        """An in-place update without rule changes (Update.raw) as one transaction:
        counters and set elements of ``head``, the ring edits, then ``tail``."""
        if not upd.raw:
            raise ValueError("rule changes go through libnftables")
        msgs = [
            *(self._op_msg(table, op) for op in upd.head),
            *self._ring_msgs(table, upd.rings),
            *(self._op_msg(table, op) for op in upd.tail),
        ]
        return self._apply(msgs)

    def _apply(self, msgs: list[bytes]) -> int:
        if not msgs:
            return 0
        with self._lock:
            self._send_batch(msgs)
        return len(msgs)

    def _op_msg(self, table: str, op: Op) -> bytes:
        if isinstance(op, ChainFill):
            raise ValueError(f"{op!r} is not a raw operation")
        flags = ctmsg.NLM_F_REQUEST | ctmsg.NLM_F_ACK
        # Adds are exclusive: the diff only adds what the table does not hold.
        create = ctmsg.NLM_F_CREATE | ctmsg.NLM_F_EXCL if op.add else 0
        head = _string(NFTA_SET_ELEM_LIST_TABLE, table)
        if isinstance(op, CounterOp):
            body = (
                _string(NFTA_OBJ_TABLE, table)
                + _string(NFTA_OBJ_NAME, op.name)
                + _attr(NFTA_OBJ_TYPE, struct.pack("!I", NFT_OBJECT_COUNTER))
            )
            if op.add:
                body += _attr(NFTA_OBJ_DATA | _N, b"")
            kind = NFT_MSG_NEWOBJ if op.add else NFT_MSG_DELOBJ
        elif isinstance(op, BackendElem):
            body = head + _string(NFTA_SET_ELEM_LIST_SET, op.set)
            body += _one_element(_backend_value(op.key))
            kind = NFT_MSG_NEWSETELEM if op.add else NFT_MSG_DELSETELEM
        else:
            body = head + _string(NFTA_SET_ELEM_LIST_SET, op.map)
            ref = _string(NFTA_SET_ELEM_OBJREF, op.counter) if op.add else b""
            body += _one_element(_endpoint_value(op.key), ref)
            kind = NFT_MSG_NEWSETELEM if op.add else NFT_MSG_DELSETELEM
        mtype = (NFNL_SUBSYS_NFTABLES << 8) | kind
        return self._msg(mtype, flags | create, NFPROTO_INET, 0, body)

    def _ring_msgs(self, table: str, edits: Sequence[RingEdit]) -> list[bytes]:
        head = _string(NFTA_SET_ELEM_LIST_TABLE, table)
        msgs: list[bytes] = []
        flags = ctmsg.NLM_F_REQUEST | ctmsg.NLM_F_ACK
        for e in edits:
            sets = head + _string(NFTA_SET_ELEM_LIST_SET, e.map)
            groups: list[tuple[int, Sequence[int], bytes]] = [(NFT_MSG_DELSETELEM, e.delete, b"")]
            groups += [(NFT_MSG_NEWSETELEM, s, _endpoint(b)) for b, s in e.add]
            for kind, slots, data in groups:
                per = max(1, ELEMENTS_MAX // (_KEY.itemsize + len(data)))
                mtype = (NFNL_SUBSYS_NFTABLES << 8) | kind
                extra = ctmsg.NLM_F_CREATE if kind == NFT_MSG_NEWSETELEM else 0
                for i in range(0, len(slots), per):
                    elems = _elements(slots[i : i + per], data)
                    body = sets + _attr(NFTA_SET_ELEM_LIST_ELEMENTS | _N, elems)
                    msgs.append(self._msg(mtype, flags | extra, NFPROTO_INET, 0, body))
        return msgs

    def _send_batch(self, msgs: list[bytes]) -> None:
        res = socket.htons(NFNL_SUBSYS_NFTABLES)
        begin = self._msg(NFNL_MSG_BATCH_BEGIN, ctmsg.NLM_F_REQUEST, socket.AF_UNSPEC, res, b"")
        tail = self._msg(NFNL_MSG_BATCH_END, ctmsg.NLM_F_REQUEST, socket.AF_UNSPEC, res, b"")
        self.sock.send(begin + b"".join(msgs) + tail)
        self._results(begin, msgs)

    def counters(self, table: str) -> dict[str, Counter]:
        """The named counters of ``table`` (empty if there is none). A dump of the
        counter objects only: `nft list counters` fetches the whole table, rings
        included, and takes seconds with 65537-slot rings."""
        body = _attr(NFTA_OBJ_TABLE, table.encode() + b"\0") + _attr(
            NFTA_OBJ_TYPE, struct.pack("!I", NFT_OBJECT_COUNTER)
        )
        flags = ctmsg.NLM_F_REQUEST | ctmsg.NLM_F_DUMP
        msg = self._msg((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ, flags, NFPROTO_INET, 0, body)
        with self._lock:
            return self._dump_counters(msg)

    def _dump_counters(self, msg: bytes) -> dict[str, Counter]:
        seq = ctmsg.NLMSG_HDR.unpack_from(msg)[3]
        self.sock.send(msg)
        out: dict[str, Counter] = {}
        while True:
            for m in ctmsg.parse(self.sock.recv(1 << 20)):
                if m.seq != seq:
                    continue
                if m.type == ctmsg.NLMSG_DONE:
                    return out
                if m.type == ctmsg.NLMSG_ERROR:
                    code = ctmsg.decode_error(m.payload)
                    if code in (0, errno.ENOENT):
                        return out
                    raise NftError("nf_tables counter dump", errno.errorcode.get(code, str(code)))
                attrs = ctmsg._attrs(m.payload, "object", off=ctmsg.NFGEN_HDR.size)
                if NFTA_OBJ_NAME not in attrs or NFTA_OBJ_DATA not in attrs:
                    continue
                data = ctmsg._attrs(attrs[NFTA_OBJ_DATA], "object", "data")
                name = attrs[NFTA_OBJ_NAME].rstrip(b"\0").decode()
                packets = int.from_bytes(data.get(NFTA_COUNTER_PACKETS, b""), "big")
                nbytes = int.from_bytes(data.get(NFTA_COUNTER_BYTES, b""), "big")
                out[name] = Counter(packets=packets, bytes=nbytes)

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
            raise NftError("nf_tables update refused", ", ".join(names))
