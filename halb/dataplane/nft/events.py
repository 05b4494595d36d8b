"""Follow conntrack events for halb's services as an async stream of flow deltas.

A NETLINK_NETFILTER socket bound to the NEW, UPDATE and DESTROY groups. Each event of
a flow of a configured service becomes an upsert (first seen, or its backend / SNAT
binding changed) or a delete (destroyed, or TCP reached TIME_WAIT/CLOSE: the
connection is over). UPDATE events that change nothing halb syncs are swallowed.

Events carry the netlink port id of the request that caused them; those of our own
installs are skipped so two nodes never echo flows back and forth. When the kernel
cannot queue an event (the receive buffer is full) recv fails with ENOBUFS: the stream
yields Resync and the consumer must take a full dump.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from halb.dataplane.nft import ctmsg
from halb.dataplane.nft.ctsock import open_netlink
from halb.dataplane.nft.flows import FlowEntry, FlowMap
from halb.model import Flow

log = logging.getLogger(__name__)

__all__ = ["GROUPS", "FlowDelta", "FlowEvents", "Resync"]

# NFNLGRP_CONNTRACK_NEW (1), _UPDATE (2), _DESTROY (3) as a bind() group mask.
GROUPS = 0b111
TCP_CONNTRACK_TIME_WAIT = 7
TCP_CONNTRACK_CLOSE = 8
_OVER = (TCP_CONNTRACK_TIME_WAIT, TCP_CONNTRACK_CLOSE)


@dataclass(frozen=True, slots=True)
class FlowDelta:
    op: Literal["upsert", "delete"]
    entry: FlowEntry

    @property
    def flow(self) -> Flow:
        return self.entry.flow


@dataclass(frozen=True, slots=True)
class Resync:
    """Events were lost; the consumer must replace its view with a full dump."""

    reason: str


class FlowEvents:
    """``async for item in FlowEvents(...)``: FlowDelta or Resync items. Use as an async
    context manager, or call close()."""

    def __init__(
        self,
        netns: str | None,
        flowmap: Callable[[], FlowMap],
        *,
        ignore_portids: frozenset[int] = frozenset(),
        rcvbuf: int = 64 << 20,
    ) -> None:
        self._flowmap = flowmap
        self._ignore = ignore_portids
        self.sock = open_netlink(netns, groups=GROUPS, rcvbuf=rcvbuf)
        self.sock.setblocking(False)
        # Flows announced and not yet deleted: dedupes the many UPDATEs of one flow.
        self._known: dict[Flow, FlowEntry] = {}
        self._queue: deque[FlowDelta | Resync] = deque()
        self.overflows = 0
        self.ignored_own = 0

    def __enter__(self) -> FlowEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> FlowEvents:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def __aiter__(self) -> FlowEvents:
        return self

    async def __anext__(self) -> FlowDelta | Resync:
        loop = asyncio.get_running_loop()
        while not self._queue:
            try:
                data = await loop.sock_recv(self.sock, 1 << 20)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overflows += 1
                    self._known.clear()
                    log.warning("conntrack events overflowed the receive buffer; full resync")
                    return Resync("event receive buffer overflow (ENOBUFS)")
                if self.sock.fileno() < 0:
                    raise StopAsyncIteration from None
                raise
            self._handle(data)
        return self._queue.popleft()

    def _handle(self, data: bytes) -> None:
        fmap = self._flowmap()
        for msg in ctmsg.parse(data):
            kind = ctmsg.msg_kind(msg)
            if kind is None:
                continue
            if msg.pid in self._ignore:
                self.ignored_own += 1
                continue
            entry = ctmsg.decode_entry(msg.payload)
            if entry is None:
                continue
            fe = fmap.flow_of(entry)
            if fe is None:
                continue
            over = kind == "destroy" or entry.tcp_state in _OVER
            if over:
                known = self._known.pop(fe.flow, None)
                # Deletes go out even for flows we never announced: they may be in the
                # consumer's snapshot.
                if known is not None or kind == "destroy":
                    self._queue.append(FlowDelta("delete", fe))
            elif self._known.get(fe.flow) != fe:
                self._known[fe.flow] = fe
                self._queue.append(FlowDelta("upsert", fe))
