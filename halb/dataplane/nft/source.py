"""The active node's live flow source for FlowSync on the nft dataplane.

halb.dataplane.base.FlowSource over conntrack: NEW/UPDATE/DESTROY events of halb's
services become pushed upserts and deletes as they happen (events from the adapter's
own installs are already filtered out by FlowEvents, so a flow synced in is never
echoed back). Two things close the gaps events leave:

- overflow: the kernel dropped events (ENOBUFS) -> dump in full at once and push the
  difference from what was pushed so far;
- reconcile: every ``reconcile_interval`` the same dump-and-diff runs anyway, so a
  flow whose event was never raised (conntrack events disabled for a moment, a flow
  that expired silently) is corrected within that interval.

The subscription is opened when the source is built, before any snapshot is taken,
so no flow falls between a snapshot and the first event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from halb.dataplane.nft.events import FlowDelta, FlowEvents, Resync
from halb.dataplane.nft.flows import entry_records
from halb.flows import records

if TYPE_CHECKING:
    from halb.dataplane.nft.adapter import NftDataplane


__all__ = ["NftFlowSource", "SourceStats"]

log = logging.getLogger(__name__)

# Pushed as packed records, so fullnat flows carry the source port nf_nat chose.
Push = Callable[[bytes, bytes], None]
_SVC_BACKEND = slice(records.PROTO, records.NAT_PORT)  # service and backend bytes


@dataclass(slots=True)
class SourceStats:
    entries: int = 0  # flows pushed and not deleted
    events: int = 0  # deltas taken from conntrack events
    resyncs: int = 0  # event overflows answered with a full dump
    reconciles: int = 0
    corrected: int = 0  # flows a dump found that events had missed (both ways)
    ignored_own: int = 0  # events of our own installs, skipped
    last_reconcile_seconds: float = 0.0


class NftFlowSource:
    def __init__(self, dataplane: NftDataplane, reconcile_interval: float = 5.0) -> None:
        self._dp = dataplane
        self.reconcile_interval = reconcile_interval
        self._events: FlowEvents = dataplane.flow_events()
        # Connection (record bytes [0, 38)) -> the record pushed for it (a backend or
        # source port change is another record).
        self._known: dict[bytes, bytes] = {}
        # Connections an event touched while a dump was in flight: it may predate them.
        self._touched: set[bytes] | None = None
        self._stats = SourceStats()

    def snapshot_records(self) -> bytes:
        return self._dp.snapshot_records()

    async def run(self, push: Push) -> None:
        await self._reconcile(push)
        next_dump = time.monotonic() + self.reconcile_interval
        it = aiter(self._events)
        while True:
            try:
                async with asyncio.timeout(max(0.0, next_dump - time.monotonic())):
                    item = await anext(it)
            except TimeoutError:
                await self._reconcile(push)
                next_dump = time.monotonic() + self.reconcile_interval
                continue
            if isinstance(item, Resync):
                self._stats.resyncs += 1
                log.warning("conntrack events lost (%s): resyncing from a dump", item.reason)
                await self._reconcile(push)
                next_dump = time.monotonic() + self.reconcile_interval
                continue
            self._apply(item, push)

    def _apply(self, d: FlowDelta, push: Push) -> None:
        self._stats.events += 1
        row = entry_records([d.entry])
        key = row[: records.CONN_SIZE]
        if self._touched is not None:
            self._touched.add(key)
        old = self._known.get(key)
        if d.op == "delete":
            # Deletes go out even for flows never pushed: a snapshot may hold them.
            if old is None or old == row:
                self._known.pop(key, None)
                push(b"", row)
        elif old != row:
            if old is not None and old[_SVC_BACKEND] != row[_SVC_BACKEND]:
                push(b"", old)  # moved to another backend: drop the old one first
            self._known[key] = row
            push(row, b"")

    async def _reconcile(self, push: Push) -> None:
        self._touched = set()
        t0 = time.monotonic()
        try:
            # Records decoded in bulk: at 100k flows a dump of Flow objects took ~2 s of
            # a core every reconcile interval.
            dumped = await asyncio.to_thread(self._dp.snapshot_records)
        finally:
            touched, self._touched = self._touched or set(), None
        self._stats.last_reconcile_seconds = time.monotonic() - t0
        self._stats.reconciles += 1
        current = records.by_conn(dumped)
        known = self._known
        gone = [r for k, r in known.items() if k not in touched and current.get(k) != r]
        new = [r for k, r in current.items() if k not in touched and known.get(k) != r]
        for r in gone:
            del known[r[: records.CONN_SIZE]]
        # A flow whose source port changed is in both: its delete and upsert name the
        # same connection, and deletes are applied first.
        if gone:
            push(b"", b"".join(gone))
        if new:
            known.update((r[: records.CONN_SIZE], r) for r in new)
            push(b"".join(new), b"")
        if self._stats.reconciles > 1 and (gone or new):
            self._stats.corrected += len(gone) + len(new)
            log.info("conntrack reconcile: %d flows added, %d removed that events missed",
                     len(new), len(gone))  # fmt: skip

    def close(self) -> None:
        self._events.close()

    def stats(self) -> dict[str, Any]:
        self._stats.entries = len(self._known)
        self._stats.ignored_own = self._events.ignored_own
        return {
            "entries": self._stats.entries,
            "events": self._stats.events,
            "resyncs": self._stats.resyncs,
            "reconciles": self._stats.reconciles,
            "corrected": self._stats.corrected,
            "ignored_own": self._stats.ignored_own,
            "last_scan_seconds": self._stats.last_reconcile_seconds,
        }
