"""The XDP dataplane's flow source for FlowSync: batch scans of its flow map.

The BPF program records every new flow in its LRU hash map and says nothing about it.
The active therefore scans the map every ``interval`` seconds and diffs consecutive
scans: new or changed entries are upserts, vanished ones (LRU eviction, a freed
backend) are deletes. Why scans and not a ring buffer event from the program: see
halb/dataplane/xdp/README.md (measured there).

The diff works on raw map records (40-byte key + 8-byte value) as bytes, so unchanged
flows cost a slice and a dict probe, never a Flow (hashing a Flow is ~1.5 µs). Only
changed records are translated, with the backend map read at that moment. The pause
between scans grows with their cost so scanning takes at most ``cpu_share`` of a core.

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
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import TYPE_CHECKING

from halb.dataplane.xdp import libbpf as lb
from halb.dataplane.xdp.layout import (
    BACKEND_F_VALID,
    FAMILY_V4,
    BackendInfo,
    FlowKey,
    FlowValue,
    addr_from_words,
)
from halb.dataplane.xdp.loader import BpfMap, open_pinned_maps
from halb.model import Flow, IPAddress, Protocol

if TYPE_CHECKING:
    from halb.dataplane.xdp.adapter import XdpDataplane

__all__ = ["ScanDiff", "ScanStats", "XdpFlowSource", "read_flows"]

log = logging.getLogger(__name__)

KEY_SIZE = ctypes.sizeof(FlowKey)
VALUE_SIZE = ctypes.sizeof(FlowValue)
_CHUNK = 16384  # entries per BPF_MAP_LOOKUP_BATCH call
_BACKEND_SIZE = ctypes.sizeof(BackendInfo)
# Byte offsets in a raw flow record, from the ctypes layout (itself checked against BTF).
_SRC, _DST = FlowKey.src.offset, FlowKey.dst.offset
_SPORT, _DPORT = FlowKey.sport.offset, FlowKey.dport.offset
_PROTO, _FAMILY = FlowKey.proto.offset, FlowKey.family.offset
_BID = FlowValue.backend_id.offset

Push = Callable[[list[Flow], list[Flow]], None]


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


@dataclass(frozen=True, slots=True)
class ScanDiff:
    records: dict[bytes, bytes]  # key bytes -> value bytes, the whole map
    upserts: list[Flow]
    deletes: list[Flow]
    seconds: float
    untranslatable: int


def read_records(flows: BpfMap) -> dict[bytes, bytes]:
    """Every entry of the flow map as raw bytes, by batch lookup (no ctypes objects)."""
    return _read_raw(flows, KEY_SIZE, VALUE_SIZE)


def _read_raw(m: BpfMap, ksize: int, vsize: int) -> dict[bytes, bytes]:
    # Always from the start with a NULL token: a token names the last key already
    # read, so a token of 0 on an array map would skip element 0.
    kbuf = ctypes.create_string_buffer(ksize * _CHUNK)
    vbuf = ctypes.create_string_buffer(vsize * _CHUNK)
    token_in = ctypes.create_string_buffer(max(ksize, 8))
    token_out = ctypes.create_string_buffer(max(ksize, 8))
    opts = lb.BpfMapBatchOpts(sz=ctypes.sizeof(lb.BpfMapBatchOpts))
    out: dict[bytes, bytes] = {}
    first = True
    while True:
        count = ctypes.c_uint32(_CHUNK)
        ret = lb.lib.bpf_map_lookup_batch(
            m.fd,
            None if first else token_in,
            token_out,
            kbuf,
            vbuf,
            ctypes.byref(count),
            ctypes.byref(opts),
        )
        if ret < 0 and ret != -2:  # -ENOENT: this was the last batch
            lb.check(ret, f"batch lookup of {m.name}")
        n = count.value
        rk, rv = kbuf.raw, vbuf.raw
        out.update(
            zip(
                [rk[i : i + ksize] for i in range(0, n * ksize, ksize)],
                [rv[i : i + vsize] for i in range(0, n * vsize, vsize)],
                strict=True,
            )
        )
        if ret == -2 or n == 0:
            return out
        ctypes.memmove(token_in, token_out, len(token_out))
        first = False


class _Translator:
    """Raw records -> Flow, with the backends map read once per translation.

    ``known`` remembers every valid backend row seen, by id, so a deleted flow whose
    backend was freed meanwhile still goes out with its backend (the standby's
    bookkeeping is keyed by the whole flow).
    """

    def __init__(self, backends: BpfMap, known: dict[int, tuple[IPAddress, int]]) -> None:
        self._raw = _read_raw(backends, 4, _BACKEND_SIZE)
        self._rows: dict[int, tuple[IPAddress, int] | None] = {}
        self._known = known
        self._vips: dict[bytes, IPAddress] = {}

    def _backend(self, bid: int) -> tuple[IPAddress, int] | None:
        if bid in self._rows:
            return self._rows[bid]
        raw = self._raw.get(bid.to_bytes(4, sys.byteorder))
        row = None
        if raw is not None:
            info = BackendInfo.from_buffer_copy(raw)
            if info.flags & BACKEND_F_VALID:
                row = (addr_from_words(info.addr, info.family), int(info.port))
                self._known[bid] = row
        self._rows[bid] = row
        return row

    def flow(self, key: bytes, value: bytes, *, gone: bool = False) -> Flow | None:
        """The Flow of a record; None if its backend is not valid (for a deleted
        record: was never seen valid).

        Decoded by slicing at the ctypes layout's offsets rather than through ctypes
        objects: this runs once per new flow, and slices are about 3x cheaper."""
        bid = int.from_bytes(value[_BID : _BID + 4], sys.byteorder)
        backend = self._backend(bid)
        if backend is None and gone:
            backend = self._known.get(bid)
        if backend is None:
            return None
        v4 = key[_FAMILY] == FAMILY_V4
        alen = 4 if v4 else 16
        vip_raw = key[_DST : _DST + alen]
        vip = self._vips.get(vip_raw)
        if vip is None:
            vip = self._vips[vip_raw] = ip_address(vip_raw)
        src_raw = key[_SRC : _SRC + alen]
        addr, port = backend
        return Flow(
            protocol=Protocol.TCP if key[_PROTO] == 6 else Protocol.UDP,
            src=IPv4Address(src_raw) if v4 else IPv6Address(src_raw),
            sport=int.from_bytes(key[_SPORT : _SPORT + 2], "big"),
            vip=vip,
            vport=int.from_bytes(key[_DPORT : _DPORT + 2], "big"),
            backend=addr,
            bport=port,
        )


def diff(
    prev: Mapping[bytes, bytes],
    maps: Mapping[str, BpfMap],
    known: dict[int, tuple[IPAddress, int]],
) -> ScanDiff:
    """Read the flow map and compare it with the previous scan's records."""
    t0 = time.perf_counter()
    cur = read_records(maps["flows"])
    upserts: list[Flow] = []
    deletes: list[Flow] = []
    bad = 0
    # Keys are hashed once (when cur is built); a dict probe per key finds new and
    # changed records (a third of the cost of an item-view set difference, measured),
    # and a key-view difference, in C, finds the deleted ones.
    get = prev.get
    changed = [(k, v) for k, v in cur.items() if get(k) != v]
    gone = prev.keys() - cur.keys() if len(cur) - len(changed) != len(prev) else set()
    if changed or gone:
        tr = _Translator(maps["backends"], known)
        for key, value in changed:
            f = tr.flow(key, value)
            if f is None:
                bad += 1
            else:
                upserts.append(f)
        for key in gone:
            f = tr.flow(key, prev[key], gone=True)
            if f is not None:
                deletes.append(f)
    return ScanDiff(cur, upserts, deletes, time.perf_counter() - t0, bad)


def read_flows(maps: Mapping[str, BpfMap]) -> list[Flow]:
    """Every flow of the map whose backend is valid (a dump, from any process)."""
    tr = _Translator(maps["backends"], {})
    out = []
    for key, value in read_records(maps["flows"]).items():
        f = tr.flow(key, value)
        if f is not None:
            out.append(f)
    return out


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
        self._records: dict[bytes, bytes] = {}
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

    def snapshot(self) -> list[Flow]:
        """A fresh dump of the map (worker thread)."""
        return read_flows(self._maps)

    # -- deltas --------------------------------------------------------------------

    def scan(self) -> ScanDiff:
        """One scan against the last accepted state (worker thread); see accept()."""
        return diff(self._records, self._maps, self._known)

    def accept(self, d: ScanDiff) -> None:
        """Make ``d`` the state the next scan compares with (event-loop thread)."""
        self._records = d.records
        self._scans += 1
        self._last = d.seconds
        self._max = max(self._max, d.seconds)
        self._upserts += len(d.upserts)
        self._deletes += len(d.deletes)
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
                          len(d.upserts), len(d.deletes), len(d.records),
                          d.seconds * 1e3)  # fmt: skip
            await asyncio.sleep(self._interval)

    def stats(self) -> ScanStats:
        return ScanStats(
            scans=self._scans,
            entries=len(self._records),
            last_scan_seconds=self._last,
            max_scan_seconds=self._max,
            interval=self._interval,
            upserts=self._upserts,
            deletes=self._deletes,
            untranslatable=self._bad,
        )
