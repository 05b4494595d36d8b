"""A ctnetlink socket: batched requests with per-message results, dumps, events.

Requests are sent many to a datagram and every one asks for an ACK, so one bad entry
fails alone (its errno is reported) while the rest of the batch is applied.
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket
import sys
from collections.abc import Iterator, Sequence

from halb.dataplane.nft import ctmsg
from halb.dataplane.nft.netns import in_netns

log = logging.getLogger(__name__)

__all__ = ["NETLINK_NETFILTER", "CtSocket", "open_netlink"]

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
# Bytes of requests per datagram: the kernel answers each with an ACK skb (~1 KiB of
# receive-buffer accounting), so this bounds the ACK backlog to a few MiB.
BATCH_BYTES = 32 * 1024


def open_netlink(netns: str | None, groups: int = 0, rcvbuf: int = 8 << 20) -> socket.socket:
    """A bound NETLINK_NETFILTER socket in ``netns`` (it stays there for its life)."""

    def make() -> socket.socket:
        s = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        try:
            # FORCE variants ignore net.core.rmem_max (we run as root); fall back if not.
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
                s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 << 20)
            except PermissionError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            # Error ACKs need not echo the whole request back.
            s.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            s.bind((0, groups))
        except BaseException:
            s.close()
            raise
        return s

    return in_netns(netns, make)


def _without_ack(msg: bytes) -> bytes:
    flags = int.from_bytes(msg[6:8], sys.byteorder)
    if not flags & ctmsg.NLM_F_ACK:
        return msg
    return msg[:6] + (flags & ~ctmsg.NLM_F_ACK).to_bytes(2, sys.byteorder) + msg[8:]


class CtSocket:
    """Blocking request/response ctnetlink socket (one per adapter; not thread-safe)."""

    def __init__(self, netns: str | None = None) -> None:
        self.sock = open_netlink(netns)
        self.portid: int = self.sock.getsockname()[0]
        self._seq = itertools.count(1)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> CtSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_seq(self) -> int:
        return next(self._seq) & 0xFFFFFFFF

    def _recv(self) -> bytes:
        while True:
            try:
                return self.sock.recv(1 << 20)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # Only ACKs arrive here (no groups); losing some is reported as
                    # missing results by the caller.
                    log.warning("ctnetlink request socket overflowed; results may be lost")
                    continue
                raise

    def batch(self, build: Sequence[tuple[int, bytes]]) -> dict[int, tuple[int, bytes | None]]:
        """Send (seq, message) requests; return seq -> (errno, payload of a data reply
        for GET requests or None). errno 0 is success.

        Only the last request of each datagram asks for an ACK: the kernel handles a
        datagram's requests in order within send() and reports failures even without
        the flag, so that one ACK is a barrier after which every request without an
        error report succeeded. It saves a receive per request (most of the cost).
        """
        results: dict[int, tuple[int, bytes | None]] = {}
        i = 0
        while i < len(build):
            chunk: list[bytes] = []
            seqs: list[int] = []
            size = 0
            while i < len(build) and (not chunk or size + len(build[i][1]) <= BATCH_BYTES):
                seq, msg = build[i]
                chunk.append(msg)
                seqs.append(seq)
                size += len(msg)
                i += 1
            for k in range(len(chunk) - 1):
                chunk[k] = _without_ack(chunk[k])
            self.sock.send(b"".join(chunk))
            barrier = seqs[-1]
            got: dict[int, tuple[int, bytes | None]] = {}
            data: dict[int, bytes] = {}
            lost = False
            while barrier not in got:
                try:
                    buf = self.sock.recv(1 << 20)
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    # Error reports were dropped: the outcome of this chunk is unknown.
                    log.warning("ctnetlink socket overflowed; %d results unknown", len(seqs))
                    lost = True
                    continue
                for m in ctmsg.parse(buf):
                    if m.type == ctmsg.NLMSG_ERROR:
                        got[m.seq] = (ctmsg.decode_error(m.payload), data.pop(m.seq, None))
                    else:
                        data[m.seq] = m.payload
            for seq in seqs:
                if seq in got:
                    results[seq] = got[seq]
                elif lost:
                    results[seq] = (errno.ENOBUFS, None)
                else:
                    results[seq] = (0, data.pop(seq, None))
        return results

    def dump(self) -> Iterator[ctmsg.CtEntry]:
        """Every TCP/UDP entry of the namespace's table (IPv4 and IPv6)."""
        for payload in self.dump_payloads():
            entry = ctmsg.decode_entry(payload)
            if entry is not None:
                yield entry

    def dump_payloads(self) -> Iterator[bytes]:
        """The payload of every message of a table dump, undecoded."""
        seq = self.next_seq()
        self.sock.send(ctmsg.encode_dump(seq))
        while True:
            for m in ctmsg.parse(self._recv()):
                if m.seq != seq:
                    continue
                if m.type == ctmsg.NLMSG_DONE:
                    return
                if m.type == ctmsg.NLMSG_ERROR:
                    code = ctmsg.decode_error(m.payload)
                    if code:
                        raise OSError(code, f"conntrack dump: {errno.errorcode.get(code, code)}")
                    return
                yield m.payload
