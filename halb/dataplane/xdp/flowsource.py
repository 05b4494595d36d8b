"""The XDP dataplane's flow source for FlowSync: flow-creation events from the
program's ring buffer, plus batch scans of its flow map.

Events (lag): while a source consumes, the program writes every flow it records to the
``flow_events`` ring buffer (key and value as in the map; lb_config.flags arms it, so a
hot standby's program writes none). The source reads them on the event loop
(``loop.add_reader`` on libbpf's epoll fd, coalesced for ``event_delay``), converts each
batch at once and pushes it as upserts: a new flow reaches the standby in milliseconds
whatever the size of the map.

Scans (everything else): creation events say nothing of LRU evictions, flows deleted
with a freed backend, or a flow re-routed by user space, and a full ring loses events.
So the map is still scanned every ``interval`` seconds and compared with what the
standby was told: the previous scan's entries plus the events pushed since. New or
changed entries are upserts, vanished ones deletes; a flow an event already pushed is
not sent again. A scan runs at once when the program counts a lost event
(``event_lost``: the ring was full, the consumer fell behind).

Expiry: the active's source (from_dataplane) also deletes the flows idle past their
timeouts (halb.dataplane.xdp.expiry; the timeouts are the program's, read from its
config entry at each scan) right after reading the map, so they are gone from that
scan's state and go out as deletes; counted in stats_global ``flow_swept``. A flow the
program re-records between the read and the delete (its packet found it expired too)
is kept: each expired entry is read again just before its delete (up to
SWEEP_RECHECK_MAX per scan).

The diff works on the raw map entries (40-byte key + 16-byte value) with numpy: each
key gets a 64-bit hash, the entries are kept sorted by it, and a scan finds every key
among the previous scan's by binary search and compares the bytes (a hash collision
only ever costs an extra upsert, or a Python check, never a missed change). No Python
object is made per entry; only changed entries are translated, all at once into
packed flow records (halb.flows.records, via halb.dataplane.xdp.flowrecords), with the
backend map read at that moment; the server streams those records as they are. The
pause between scans grows with their cost so scanning takes at most ``cpu_share`` of
a core. Why both and the figures: halb/dataplane/xdp/README.md.

Thread rules: scan() and snapshot() run in worker threads and only read the maps
(scan() also deletes expired flows);
``run()`` consumes events, swaps the scan state and pushes on the event loop thread,
so a snapshot taken after a push reflects at least that push (what FlowSyncServer
requires).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from halb.dataplane.xdp import flowrecords
from halb.dataplane.xdp.clock import Clock
from halb.dataplane.xdp.expiry import expired_mask
from halb.dataplane.xdp.flowrecords import KEY_SIZE, VALUE_SIZE
from halb.dataplane.xdp.layout import (
    BACKEND_F_VALID,
    STATS,
    BackendInfo,
    FlowEvent,
    FlowKey,
    addr_from_words,
)
from halb.dataplane.xdp.loader import BpfMap, open_pinned_maps
from halb.dataplane.xdp.mapdiff import MapState, compare, without, without_keys
from halb.dataplane.xdp.ringbuf import RingBuffer
from halb.flows import records as rec
from halb.model import Flow, IPAddress

if TYPE_CHECKING:
    from halb.dataplane.xdp.adapter import XdpDataplane

__all__ = ["FlowEvents", "ScanDiff", "ScanStats", "XdpFlowSource", "read_records"]

log = logging.getLogger(__name__)

# Scan budget of a source with creation events (from_dataplane): 2% of a core, at least
# one scan every 5 s (deletions, evictions and re-routed flows wait that long at most).
EVENT_SCAN_SHARE = 0.02
EVENT_MAX_INTERVAL = 5.0

_BACKEND_SIZE = ctypes.sizeof(BackendInfo)
_EVENT_SIZE = ctypes.sizeof(FlowEvent)
_EVENT_LOST = next(i for i, name in STATS.items() if name == "event_lost")
_FLOW_SWEPT = next(i for i, name in STATS.items() if name == "flow_swept")

# Receives (upserts, deletes) as packed flow records.
Push = Callable[[bytes, bytes], None]


@dataclass(frozen=True, slots=True)
class ScanStats:
    scans: int
    entries: int  # flow map entries at the last scan
    last_scan_seconds: float  # map read + diff of the last scan
    max_scan_seconds: float
    interval: float  # current pause between scans
    upserts: int  # pushed since start
    deletes: int
    untranslatable: int  # entries whose backend id names no valid backend
    events: int = 0  # upserts pushed from flow_events (included in upserts)
    events_untranslatable: int = 0  # events left to the next scan (backend unknown)
    event_lost: int = 0  # the program's count of events the full ring refused
    rescans: int = 0  # scans run at once for lost events
    swept: int = 0  # idle flows deleted by the scans


@dataclass(frozen=True, slots=True)
class ScanDiff:
    state: MapState  # the whole map, for the next scan
    upserts: bytes  # packed flow records
    deletes: bytes
    seconds: float
    untranslatable: int
    swept: int = 0  # idle flows this scan deleted from the map


def _valid_backends(backends: BpfMap) -> dict[int, tuple[IPAddress, int]]:
    """Backend id -> (address, port) of every valid row of the backends map."""
    ids, rows = flowrecords.read_all(backends)
    out = {}
    for i in range(len(ids) // 4):
        info = BackendInfo.from_buffer_copy(rows, i * _BACKEND_SIZE)
        if info.flags & BACKEND_F_VALID:
            bid = int.from_bytes(ids[i * 4 : i * 4 + 4], sys.byteorder)
            out[bid] = (addr_from_words(info.addr, info.family), int(info.port))
    return out


def read_records(maps: Mapping[str, BpfMap]) -> bytes:
    """Every flow of the map whose backend is valid, as packed records (a dump, from
    any process)."""
    keys, values = flowrecords.read_all(maps["flows"])
    table = flowrecords.BackendTable.build(_valid_backends(maps["backends"]))
    out, _ = flowrecords.map_to_records(keys, values, table)
    return out


def count_swept(stats_global: BpfMap, n: int) -> None:
    """Add n to stats_global flow_swept (CPU 0's slot: the program never writes that
    index, and one source per map sweeps)."""
    per_cpu = stats_global.lookup(_FLOW_SWEPT)
    if per_cpu is None or not n:
        return
    per_cpu[0].packets += n
    stats_global.update(_FLOW_SWEPT, per_cpu)


# Expired entries re-read one by one before the delete (per-entry lookups, a few µs
# each); a larger burst is deleted as the scan read it.
SWEEP_RECHECK_MAX = 4096


def sweep(
    maps: Mapping[str, BpfMap], keys: bytes, values: bytes, since: int
) -> tuple[bytes, bytes, int]:
    """Delete the entries idle past their timeouts from the flow map; returns the
    entries left (as the map holds them) and how many were deleted. ``since``: when
    this node began to sweep, in jiffies (the idle time of a synced flow no packet
    touched here counts from it).

    The scan read the map a while ago (0.1 s for 150k entries): each expired entry is
    read again and deleted only if it is still expired, so a flow whose packet came (or
    that the program re-recorded) meanwhile is kept. What remains is the microseconds
    between that read and the delete."""
    cfg = maps["config"].lookup(0)
    if cfg is None or not keys:
        return keys, values, 0
    now = Clock.of(cfg).now()
    old = expired_mask(keys, values, cfg, now, since)
    if not old.any():
        return keys, values, 0
    k = np.frombuffer(keys, np.uint8).reshape(-1, KEY_SIZE)
    v = np.frombuffer(values, np.uint8).reshape(-1, VALUE_SIZE).copy()
    idx = np.flatnonzero(old)
    drop = old.copy()  # deleted or already gone: not in the entries returned
    if len(idx) <= SWEEP_RECHECK_MAX:
        flows = maps["flows"]
        for i in idx.tolist():
            now_value = flows.lookup(FlowKey.from_buffer_copy(k[i].tobytes()))
            if now_value is not None:
                v[i] = np.frombuffer(bytes(now_value), np.uint8)
            else:
                old[i] = False  # gone already (evicted, deleted): nothing to delete
        still = expired_mask(k[idx].tobytes(), v[idx].tobytes(), cfg, now, since)
        drop[idx[~still & old[idx]]] = False  # touched meanwhile: kept, with its value
        old[idx[~still]] = False
    n = flowrecords.delete(maps["flows"], k[old].tobytes())
    if "stats_global" in maps:
        count_swept(maps["stats_global"], n)
    return k[~drop].tobytes(), v[~drop].tobytes(), n


def diff(
    prev: MapState,
    maps: Mapping[str, BpfMap],
    known: dict[int, tuple[IPAddress, int]],
    sweep_since: int | None = None,
) -> ScanDiff:
    """Read the flow map and compare it with the previous scan's entries, after
    deleting its expired flows when ``sweep_since`` is given (see sweep()).

    ``known`` remembers every valid backend seen, by id, so a deleted flow whose backend
    was freed meanwhile still goes out with its backend (a record needs one, and a
    standby on the Flow-object path removes whole flows)."""
    t0 = time.perf_counter()
    keys, values = flowrecords.read_all(maps["flows"])
    swept = 0
    if sweep_since is not None:
        keys, values, swept = sweep(maps, keys, values, sweep_since)
    cur = MapState.of(keys, values)
    # New or changed: the key is not in prev, or its value differs. A key that only
    # collided with another reads as new: one more (idempotent) upsert.
    changed, gone = compare(prev, cur)
    upserts = deletes = b""
    bad = 0
    if changed.any() or gone.any():
        valid = _valid_backends(maps["backends"])
        known.update(valid)
        if changed.any():
            # Only what changed is translated, all at once (halb.dataplane.xdp.flowrecords).
            table = flowrecords.BackendTable.build(valid)
            upserts, bad = flowrecords.map_to_records(
                cur.keys[changed].tobytes(), cur.values[changed].tobytes(), table
            )
        if gone.any():
            # A copy (made in one step under the GIL): the event path adds to known
            # from the event-loop thread while this runs in a worker thread.
            table = flowrecords.BackendTable.build(dict(known))
            deletes, _ = flowrecords.map_to_records(
                prev.keys[gone].tobytes(), prev.values[gone].tobytes(), table
            )
    return ScanDiff(cur, upserts, deletes, time.perf_counter() - t0, bad, swept)


@dataclass
class FlowEvents:
    """What the source needs of its dataplane for creation events (see from_dataplane)."""

    ring_fd: int  # the flow_events map (owned: closed with the source)
    arm: Callable[[bool], None]  # XdpDataplane.set_flow_events
    backends_generation: Callable[[], int]  # even and unchanged: the backends map too
    stats_global: BpfMap  # event_lost


@dataclass
class _Pushed:
    """One batch of events pushed: raw entries (for the scan's comparison) and their
    records (to leave out of a scan that read the map before they were pushed)."""

    keys: bytes
    values: bytes
    records: bytes


class XdpFlowSource:
    """FlowSource (snapshot) plus a loop that pushes deltas, over the ``flows`` and
    ``backends`` maps (owned by the source: close() closes them): creation events
    when ``events`` is given, and scans."""

    def __init__(
        self,
        maps: Mapping[str, BpfMap],
        *,
        interval: float = 0.02,
        max_interval: float = 1.0,
        cpu_share: float = 0.1,
        event_delay: float = 0.001,
    ) -> None:
        """interval: pause between scans when the map is small; it grows so that
        scanning takes at most ``cpu_share`` of one core (up to max_interval).
        event_delay: how long the first waiting event waits for others to join its
        batch (each wakeup costs a loop turn and a consume call)."""
        self._maps = dict(maps)
        self.min_interval = interval
        self.max_interval = max_interval
        self.cpu_share = cpu_share
        self.event_delay = event_delay
        self._interval = interval
        self._state = MapState.empty()
        self._known: dict[int, tuple[IPAddress, int]] = {}
        self._scans = 0
        self._last = 0.0
        self._max = 0.0
        self._upserts = 0
        self._deletes = 0
        self._bad = 0
        self._events: FlowEvents | None = None  # set by from_dataplane
        self._ring: RingBuffer | None = None
        self._reader: tuple[asyncio.AbstractEventLoop, int, list[asyncio.TimerHandle]] | None = None
        self._pushed: list[_Pushed] = []  # events pushed since the last scan began
        self._table: flowrecords.BackendTable | None = None  # for events
        self._table_generation = -1
        self._event_count = 0
        self._event_bad = 0
        self._lost = 0  # event_lost as last read
        self._lost_checked = 0.0
        self._rescans = 0
        self._wake: asyncio.Event | None = None
        self._sweep_since: int | None = None  # set by from_dataplane: expire idle flows
        self._swept = 0

    @classmethod
    def from_dataplane(
        cls, dp: XdpDataplane, *, events: bool = True, expire: bool = True, **options: float
    ) -> XdpFlowSource:
        """Over the adapter's own maps, by duplicated fds. Not by pin path: another
        agent with the same cluster and node names (a second lab) re-pins that path.
        With ``events`` it also reads the adapter's flow_events ring (armed while
        run() runs); with ``expire`` its scans delete idle flows (the active's job:
        a standby's map loses them through sync)."""
        maps = {}
        for name in ("flows", "backends", "stats_global", "config"):
            m = dp.map(name)
            fd = os.dup(m.fd)
            maps[name] = BpfMap(
                fd, name, m.key_type, m.value_type, m.max_entries, m.percpu, owns_fd=True
            )
        if events:
            # Events bring new flows; scans are the safety net and bring the rest, at a
            # slower cadence: a scan of a large map (~0.1 s at 150k entries) competes
            # with the event path for the CPU and the GIL, and in the bench it is what
            # the lag's tail is made of (README: p99 ~15-24 ms at 1 s, ~9-10 ms at 5 s).
            options.setdefault("cpu_share", EVENT_SCAN_SHARE)
            options.setdefault("max_interval", EVENT_MAX_INTERVAL)
        source = cls(maps, **options)
        if expire:
            cfg = maps["config"].lookup(0)
            source._sweep_since = Clock.of(cfg).now() if cfg is not None else 0
        if events:
            source._events = FlowEvents(
                dp.flow_events_fd(),
                dp.set_flow_events,
                lambda: dp.backends_generation,
                maps["stats_global"],
            )
        return source

    @classmethod
    def from_pins(cls, pin_dir: Path, **options: float) -> XdpFlowSource:
        """Over the maps an adapter pinned in pin_dir (any process, e.g. the CLI); scans
        only."""
        maps = open_pinned_maps(pin_dir)
        keep: dict[str, BpfMap] = {n: maps.pop(n) for n in ("flows", "backends") if n in maps}
        for m in (*maps.values(), *(keep.values() if len(keep) < 2 else ())):
            m.close()
        if len(keep) < 2:
            raise FileNotFoundError(f"{pin_dir}: no pinned flows and backends maps")
        return cls(keep, **options)

    def close(self) -> None:
        self._stop_events()
        for m in self._maps.values():
            m.close()
        self._maps = {}
        if self._events is not None:
            os.close(self._events.ring_fd)
            self._events = None

    # -- FlowSource ----------------------------------------------------------------

    def snapshot_records(self) -> bytes:
        """A fresh dump of the map as packed records (worker thread)."""
        return read_records(self._maps)

    def snapshot(self) -> list[Flow]:
        """A fresh dump of the map as Flow objects (`halb flows`, tests)."""
        return rec.to_flows(self.snapshot_records())

    # -- scans ---------------------------------------------------------------------

    def scan(self, pushed: int | None = None) -> ScanDiff:
        """One scan (worker thread) against the last accepted state updated with the
        first ``pushed`` event batches (default: all so far); see accept()."""
        batches = self._pushed[: len(self._pushed) if pushed is None else pushed]
        told = self._state.with_entries(
            b"".join(p.keys for p in batches), b"".join(p.values for p in batches)
        )
        return diff(told, self._maps, self._known, self._sweep_since)

    def accept(self, d: ScanDiff, pushed: int | None = None) -> ScanDiff:
        """Make ``d`` the state the next scan compares with (event-loop thread), and
        return it as it should be pushed. ``pushed``: the event batches the scan
        compared with (scan()'s argument); later ones were pushed while it ran: the
        scan's upserts equal to them are not sent again, and its deletes of a flow they
        re-created are dropped (the event is newer)."""
        cut = len(self._pushed) if pushed is None else pushed
        later = self._pushed[cut:]
        self._pushed = later  # still newer than the state: the next scan compares with them
        if later:
            ups = without(d.upserts, b"".join(p.records for p in later))
            dels = without_keys(d.deletes, b"".join(p.keys for p in later))
            if ups is not d.upserts or dels is not d.deletes:
                d = ScanDiff(d.state, ups, dels, d.seconds, d.untranslatable, d.swept)
        self._state = d.state
        self._scans += 1
        self._last = d.seconds
        self._max = max(self._max, d.seconds)
        self._upserts += rec.count(d.upserts)
        self._deletes += rec.count(d.deletes)
        self._swept += d.swept
        self._bad = d.untranslatable
        self._interval = min(self.max_interval, max(self.min_interval, d.seconds / self.cpu_share))
        return d

    # -- events --------------------------------------------------------------------

    def _event_table(self) -> flowrecords.BackendTable:
        """The id -> backend table for events, re-read when the backends map changed."""
        assert self._events is not None
        gen = self._events.backends_generation()
        if self._table is None or gen != self._table_generation or gen % 2:
            valid = _valid_backends(self._maps["backends"])
            self._known.update(valid)
            self._table = flowrecords.BackendTable.build(valid)
            # Trusted next time only if no write began or ended while it was read.
            after = self._events.backends_generation()
            self._table_generation = gen if after == gen and not gen % 2 else -1
        return self._table

    def take_events(self) -> bytes:
        """Consume the waiting events and return them as records to push as upserts
        (event-loop thread). Events whose backend id names no valid backend (a
        config change in progress) are left to the next scan."""
        if self._ring is None:
            return b""
        raw = self._ring.consume()
        if not raw:
            return b""
        ev = np.frombuffer(raw, np.uint8).reshape(-1, _EVENT_SIZE)
        keys, values = ev[:, :KEY_SIZE], ev[:, KEY_SIZE:]
        table = self._event_table()
        ok = flowrecords.backend_known(values.tobytes(), table)
        if not ok.all():
            self._event_bad += int((~ok).sum())
            keys, values = keys[ok], values[ok]
        k, v = keys.tobytes(), values.tobytes()
        records, _ = flowrecords.map_to_records(k, v, table)
        if records:
            self._pushed.append(_Pushed(k, v, records))
            n = rec.count(records)
            self._event_count += n
            self._upserts += n
        return records

    def events_lost(self) -> int:
        """The program's event_lost count (events a full ring refused)."""
        if self._events is None:
            return 0
        per_cpu = self._events.stats_global.lookup(_EVENT_LOST) or []
        return sum(c.packets for c in per_cpu)

    def _check_lost(self) -> None:
        """Wake the scan loop at once if the program lost events since the last look."""
        lost = self.events_lost()
        if lost != self._lost:
            log.info("flow events: %d lost (ring full); rescanning the flow map",
                     lost - self._lost)  # fmt: skip
            self._lost = lost
            self._rescans += 1
            if self._wake is not None:
                self._wake.set()

    def open_events(self) -> bool:
        """Open the ring buffer (run() does; it also arms the program); whether this
        source has events at all."""
        if self._events is None:
            return False
        if self._ring is None:
            self._ring = RingBuffer(self._events.ring_fd, _EVENT_SIZE)
        return True

    def _start_events(self, push: Push) -> None:
        if self._reader is not None or not self.open_events():
            return
        assert self._ring is not None and self._events is not None
        loop = asyncio.get_running_loop()
        fd = self._ring.epoll_fd()
        pending: list[asyncio.TimerHandle] = []

        def drain() -> None:
            pending.clear()
            if self._ring is None:
                return
            try:
                records = self.take_events()
                if records:
                    push(records, b"")
                now = time.monotonic()
                if now - self._lost_checked >= 0.01:  # a per-CPU map read: not per batch
                    self._lost_checked = now
                    self._check_lost()
            except Exception:
                log.exception("flow events: consuming failed; the scans go on")
                if self._wake is not None:
                    self._wake.set()
            loop.add_reader(fd, readable)

        def readable() -> None:
            # Level-triggered: stop watching until the batch is drained, and let the
            # first event wait event_delay for others (one consume call per batch).
            loop.remove_reader(fd)
            pending.append(loop.call_later(self.event_delay, drain))

        self._reader = (loop, fd, pending)
        self._lost = self.events_lost()
        self._events.arm(True)
        loop.add_reader(fd, readable)

    def _stop_events(self) -> None:
        if self._reader is not None:
            loop, fd, pending = self._reader
            self._reader = None
            for h in pending:
                h.cancel()
            with contextlib.suppress(Exception):  # the loop may be closed already
                loop.remove_reader(fd)
            if self._events is not None:
                self._events.arm(False)
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    # -- the loop ------------------------------------------------------------------

    async def run(self, push: Push) -> None:
        """Push events as they come and scan diffs, until cancelled. The first scan
        pushes every flow already in the map (flows synced from the previous active
        included)."""
        self._wake = asyncio.Event()
        # Armed before the first scan: a flow is then either in the map that scan reads
        # or announced by an event (or both: accept() keeps that from going out twice).
        self._start_events(push)
        try:
            while True:
                cut = len(self._pushed)
                d = await asyncio.to_thread(self.scan, cut)
                d = self.accept(d, cut)
                if d.upserts or d.deletes:
                    # Disjoint, as push() requires: the diff is per key, so a flow
                    # deleted and re-created within one interval is an upsert only.
                    push(d.upserts, d.deletes)
                    log.debug("flow scan: %d new or changed, %d gone, %d entries, %.1f ms",
                              rec.count(d.upserts), rec.count(d.deletes), len(d.state),
                              d.seconds * 1e3)  # fmt: skip
                if self._events is not None:
                    self._check_lost()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._interval)
        finally:
            self._stop_events()
            self._wake = None

    def stats(self) -> ScanStats:
        return ScanStats(
            scans=self._scans,
            entries=len(self._state),
            last_scan_seconds=self._last,
            max_scan_seconds=self._max,
            interval=self._interval,
            upserts=self._upserts,
            deletes=self._deletes,
            untranslatable=self._bad,
            events=self._event_count,
            events_untranslatable=self._event_bad,
            event_lost=self._lost,
            rescans=self._rescans,
            swept=self._swept,
        )
