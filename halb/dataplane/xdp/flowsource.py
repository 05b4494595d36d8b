"""The XDP dataplane's flow source for FlowSync: batch scans of its flow map.

The BPF program records every new flow in its LRU hash map and says nothing about it.
The active therefore scans the map every ``interval`` seconds and diffs consecutive
scans: new or changed entries are upserts, vanished ones (LRU eviction, a freed
backend) are deletes. Why scans and not a ring buffer event from the program: see
halb/dataplane/xdp/README.md (measured there).

The diff works on the raw map entries (40-byte key + 8-byte value) with numpy: each
key gets a 64-bit hash, the entries are kept sorted by it, and a scan finds every key
among the previous scan's by binary search and compares the bytes (a hash collision
only ever costs an extra upsert, or a Python check, never a missed change). No Python
object is made per entry; only changed entries are translated, all at once into
packed flow records (halb.sync.records, via halb.dataplane.xdp.flowrecords), with the
backend map read at that moment; the server streams those records as they are. The
pause between scans grows with their cost so scanning takes at most ``cpu_share`` of
a core.

Thread rules: scan() and snapshot() run in worker threads and only read the maps;
``run()`` swaps the scan state and pushes on the event loop thread, so a snapshot taken
after a push reflects at least that push (what FlowSyncServer requires).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from halb.dataplane.xdp import flowrecords
from halb.dataplane.xdp.flowrecords import KEY_SIZE, VALUE_SIZE
from halb.dataplane.xdp.layout import BACKEND_F_VALID, BackendInfo, addr_from_words
from halb.dataplane.xdp.loader import BpfMap, open_pinned_maps
from halb.model import Flow, IPAddress
from halb.sync import records as rec

if TYPE_CHECKING:
    from halb.dataplane.xdp.adapter import XdpDataplane

__all__ = ["ScanDiff", "ScanStats", "XdpFlowSource", "read_records"]

log = logging.getLogger(__name__)

_BACKEND_SIZE = ctypes.sizeof(BackendInfo)

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


U64s = np.ndarray[Any, np.dtype[np.uint64]]
_KEY_WORDS = KEY_SIZE // 8  # keys and values are handled as native 64-bit words:
_VALUE_WORDS = VALUE_SIZE // 8  # 5-8x fewer elements to compare and move than bytes


@dataclass(frozen=True, slots=True)
class MapState:
    """A scan's entries, sorted by key hash: what the next scan compares with."""

    hashes: U64s  # (n,), ascending
    keys: U64s  # (n, KEY_SIZE / 8): the raw key bytes as words
    values: U64s  # (n, VALUE_SIZE / 8)

    def __len__(self) -> int:
        return len(self.hashes)

    @classmethod
    def empty(cls) -> MapState:
        return cls(
            np.zeros(0, np.uint64),
            np.zeros((0, _KEY_WORDS), np.uint64),
            np.zeros((0, _VALUE_WORDS), np.uint64),
        )

    @classmethod
    def of(cls, keys: bytes, values: bytes) -> MapState:
        k = np.frombuffer(keys, np.uint64).reshape(-1, _KEY_WORDS)
        v = np.frombuffer(values, np.uint64).reshape(-1, _VALUE_WORDS)
        h = _hash(k)
        order = np.argsort(h)
        return cls(h[order], k[order], v[order])


def _hash(words: U64s) -> U64s:
    """A 64-bit hash of each key (multiply and xor-shift per word, as splitmix64
    mixes): equal keys hash alike; distinct ones collide only by chance."""
    h = np.full(len(words), 0x9E3779B97F4A7C15, np.uint64)
    mul, shift = np.uint64(0xBF58476D1CE4E5B9), np.uint64(31)
    for i in range(words.shape[1]):
        h ^= words[:, i]
        h *= mul
        h ^= h >> shift
    return h


def _find(state: MapState, hashes: U64s, keys: U64s) -> tuple[np.ndarray[Any, Any], Any]:
    """For each key (with its hash): its index in state (clipped) and whether the key
    is there. Among keys of one hash only the first is tried: a collision reads as
    absent (see the callers)."""
    if not len(state):
        return np.zeros(len(keys), np.intp), np.zeros(len(keys), np.bool_)
    idx = np.minimum(np.searchsorted(state.hashes, hashes), len(state) - 1)
    found = (state.hashes[idx] == hashes) & (state.keys[idx] == keys).all(axis=1)
    return idx, found


@dataclass(frozen=True, slots=True)
class ScanDiff:
    state: MapState  # the whole map, for the next scan
    upserts: bytes  # packed flow records
    deletes: bytes
    seconds: float
    untranslatable: int


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


def diff(
    prev: MapState,
    maps: Mapping[str, BpfMap],
    known: dict[int, tuple[IPAddress, int]],
) -> ScanDiff:
    """Read the flow map and compare it with the previous scan's entries.

    ``known`` remembers every valid backend seen, by id, so a deleted flow whose backend
    was freed meanwhile still goes out with its backend (a record needs one, and a
    standby on the Flow-object path removes whole flows)."""
    t0 = time.perf_counter()
    cur = MapState.of(*flowrecords.read_all(maps["flows"]))
    # New or changed: the key is not in prev, or its value differs. A key that only
    # collided with another reads as new: one more (idempotent) upsert.
    idx, found = _find(prev, cur.hashes, cur.keys)
    if len(prev):
        changed = ~(found & (prev.values[idx] == cur.values).all(axis=1))
    else:
        changed = np.ones(len(cur), np.bool_)
    # Gone: a previous key no current key found. One whose hash is still among the
    # current ones may have been hidden by a collision: those (rare) are checked exactly.
    gone = np.ones(len(prev), np.bool_)
    gone[idx[found]] = False
    g = np.flatnonzero(gone)
    if len(g) and len(cur):
        pos = np.minimum(np.searchsorted(cur.hashes, prev.hashes[g]), len(cur) - 1)
        maybe = g[cur.hashes[pos] == prev.hashes[g]]
        if len(maybe):
            present = {k.tobytes() for k in cur.keys[np.isin(cur.hashes, prev.hashes[maybe])]}
            gone[maybe[[prev.keys[j].tobytes() in present for j in maybe]]] = False
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
            table = flowrecords.BackendTable.build(known)
            deletes, _ = flowrecords.map_to_records(
                prev.keys[gone].tobytes(), prev.values[gone].tobytes(), table
            )
    return ScanDiff(cur, upserts, deletes, time.perf_counter() - t0, bad)


class XdpFlowSource:
    """FlowSource (snapshot) plus a scan loop that pushes deltas, over the ``flows``
    and ``backends`` maps (owned by the source: close() closes them)."""

    def __init__(
        self,
        maps: Mapping[str, BpfMap],
        *,
        interval: float = 0.02,
        max_interval: float = 1.0,
        cpu_share: float = 0.1,
    ) -> None:
        """interval: pause between scans when the map is small; it grows so that
        scanning takes at most ``cpu_share`` of one core (up to max_interval)."""
        self._maps = dict(maps)
        self.min_interval = interval
        self.max_interval = max_interval
        self.cpu_share = cpu_share
        self._interval = interval
        self._state = MapState.empty()
        self._known: dict[int, tuple[IPAddress, int]] = {}
        self._scans = 0
        self._last = 0.0
        self._max = 0.0
        self._upserts = 0
        self._deletes = 0
        self._bad = 0

    @classmethod
    def from_dataplane(cls, dp: XdpDataplane, **options: float) -> XdpFlowSource:
        """Over the adapter's own maps, by duplicated fds. Not by pin path: another
        agent with the same cluster and node names (a second lab) re-pins that path."""
        maps = {}
        for name in ("flows", "backends"):
            m = dp._maps[name]  # no public accessor on XdpDataplane yet
            fd = os.dup(m.fd)
            maps[name] = BpfMap(fd, name, m.key_type, m.value_type, m.max_entries, owns_fd=True)
        return cls(maps, **options)

    @classmethod
    def from_pins(cls, pin_dir: Path, **options: float) -> XdpFlowSource:
        """Over the maps an adapter pinned in pin_dir (any process, e.g. the CLI)."""
        maps = open_pinned_maps(pin_dir)
        keep: dict[str, BpfMap] = {n: maps.pop(n) for n in ("flows", "backends") if n in maps}
        for m in (*maps.values(), *(keep.values() if len(keep) < 2 else ())):
            m.close()
        if len(keep) < 2:
            raise FileNotFoundError(f"{pin_dir}: no pinned flows and backends maps")
        return cls(keep, **options)

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps = {}

    # -- FlowSource ----------------------------------------------------------------

    def snapshot_records(self) -> bytes:
        """A fresh dump of the map as packed records (worker thread)."""
        return read_records(self._maps)

    def snapshot(self) -> list[Flow]:
        """A fresh dump of the map as Flow objects (`halb flows`, tests)."""
        return rec.to_flows(self.snapshot_records())

    # -- deltas --------------------------------------------------------------------

    def scan(self) -> ScanDiff:
        """One scan against the last accepted state (worker thread); see accept()."""
        return diff(self._state, self._maps, self._known)

    def accept(self, d: ScanDiff) -> None:
        """Make ``d`` the state the next scan compares with (event-loop thread)."""
        self._state = d.state
        self._scans += 1
        self._last = d.seconds
        self._max = max(self._max, d.seconds)
        self._upserts += rec.count(d.upserts)
        self._deletes += rec.count(d.deletes)
        self._bad = d.untranslatable
        self._interval = min(self.max_interval, max(self.min_interval, d.seconds / self.cpu_share))

    async def run(self, push: Push) -> None:
        """Scan, push the diff, sleep; until cancelled. The first scan pushes every
        flow already in the map (flows synced from the previous active included)."""
        while True:
            d = await asyncio.to_thread(self.scan)
            self.accept(d)
            if d.upserts or d.deletes:
                # Disjoint, as push() requires: the diff is per key, so a flow deleted
                # and re-created within one interval is an upsert only.
                push(d.upserts, d.deletes)
                log.debug("flow scan: %d new or changed, %d gone, %d entries, %.1f ms",
                          rec.count(d.upserts), rec.count(d.deletes), len(d.state),
                          d.seconds * 1e3)  # fmt: skip
            await asyncio.sleep(self._interval)

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
        )
