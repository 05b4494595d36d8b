"""The XDP flow source's diff engine (pure numpy; no maps, no clock).

A scan's map entries (40-byte key + 16-byte value, as native 64-bit words) are kept
sorted by a 64-bit hash of the key; the next scan finds each of its keys among them by
binary search and compares the bytes that sync carries (the backend id: the program's
own bookkeeping, the last-seen stamp and the TCP phase, changes with traffic and is
not a change to send). A hash collision only ever costs an extra (idempotent)
upsert or an exact Python check, never a missed change. No Python object is made per
entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from halb.dataplane.xdp import flowrecords
from halb.dataplane.xdp.flowrecords import KEY_SIZE, VALUE_SIZE
from halb.dataplane.xdp.layout import FlowValue
from halb.flows import records as rec

__all__ = [
    "SYNCED_VALUE",
    "MapState",
    "U64s",
    "compare",
    "key_hash",
    "without",
    "without_keys",
]

U64s = np.ndarray[Any, np.dtype[np.uint64]]
_KEY_WORDS = KEY_SIZE // 8  # keys and values are handled as native 64-bit words:
_VALUE_WORDS = VALUE_SIZE // 8  # 5-8x fewer elements to compare and move than bytes


def _synced_mask() -> U64s:
    """The value bits sync carries (the backend id), as a mask over the value words."""
    raw = bytearray(VALUE_SIZE)
    at = FlowValue.backend_id.offset
    raw[at : at + FlowValue.backend_id.size] = b"\xff" * FlowValue.backend_id.size
    return np.frombuffer(bytes(raw), np.uint64)


SYNCED_VALUE = _synced_mask()


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
        return cls._sorted(k, v)

    @classmethod
    def _sorted(cls, k: U64s, v: U64s) -> MapState:
        h = key_hash(k)
        order = np.argsort(h)
        return cls(h[order], k[order], v[order])

    def with_entries(self, keys: bytes, values: bytes) -> MapState:
        """This state updated with raw entries (in order: a later one of a key wins),
        as the standby knows the map after the events pushed since this scan."""
        if not keys:
            return self
        k = np.frombuffer(keys, np.uint64).reshape(-1, _KEY_WORDS)
        v = np.frombuffer(values, np.uint64).reshape(-1, _VALUE_WORDS)
        # The last entry of each key: unique over the reversed rows keeps first ones.
        rows = np.ascontiguousarray(k[::-1]).view(np.dtype((np.void, KEY_SIZE))).ravel()
        _, first = np.unique(rows, return_index=True)
        last = len(k) - 1 - first
        k, v = k[last], v[last]
        h = key_hash(k)
        idx, found = find(self, h, k)
        keep = np.ones(len(self), np.bool_)
        keep[idx[found]] = False
        hashes = np.concatenate([self.hashes[keep], h])
        order = np.argsort(hashes)
        return MapState(
            hashes[order],
            np.concatenate([self.keys[keep], k])[order],
            np.concatenate([self.values[keep], v])[order],
        )


def key_hash(words: U64s) -> U64s:
    """A 64-bit hash of each key (multiply and xor-shift per word, as splitmix64
    mixes): equal keys hash alike; distinct ones collide only by chance."""
    h = np.full(len(words), 0x9E3779B97F4A7C15, np.uint64)
    mul, shift = np.uint64(0xBF58476D1CE4E5B9), np.uint64(31)
    for i in range(words.shape[1]):
        h ^= words[:, i]
        h *= mul
        h ^= h >> shift
    return h


def find(state: MapState, hashes: U64s, keys: U64s) -> tuple[np.ndarray[Any, Any], Any]:
    """For each key (with its hash): its index in state (clipped) and whether the key
    is there. Among keys of one hash only the first is tried: a collision reads as
    absent (see the callers)."""
    if not len(state):
        return np.zeros(len(keys), np.intp), np.zeros(len(keys), np.bool_)
    idx = np.minimum(np.searchsorted(state.hashes, hashes), len(state) - 1)
    found = (state.hashes[idx] == hashes) & (state.keys[idx] == keys).all(axis=1)
    return idx, found


def compare(prev: MapState, cur: MapState) -> tuple[Any, Any]:
    """(changed, gone): boolean masks over ``cur`` (new entries, or a changed backend)
    and over ``prev`` (entries no longer in the map)."""
    idx, found = find(prev, cur.hashes, cur.keys)
    if len(prev):
        same = ((prev.values[idx] ^ cur.values) & SYNCED_VALUE == 0).all(axis=1)
        changed = ~(found & same)
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
    return changed, gone


def _words(raw: bytes, width: int) -> U64s:
    return np.frombuffer(raw, np.uint64).reshape(-1, width)


def _drop_matching(records: bytes, mine: U64s, theirs: U64s) -> bytes:
    """records minus those whose row of ``mine`` (the record itself, or its flow key)
    equals a row of ``theirs``: hashes first, then the bytes of the candidates."""
    h = key_hash(mine)
    maybe = np.flatnonzero(np.isin(h, key_hash(theirs)))
    if not len(maybe):
        return records
    known = {row.tobytes() for row in theirs}
    gone = [i for i in maybe.tolist() if mine[i].tobytes() in known]
    if not gone:
        return records
    keep = np.ones(len(h), np.bool_)
    keep[gone] = False
    return bytes(rec.rows(records)[keep].tobytes())


def without(records: bytes, drop: bytes) -> bytes:
    """records minus any equal to one of drop."""
    if not records or not drop:
        return records
    width = rec.RECORD_SIZE // 8
    return _drop_matching(records, _words(records, width), _words(drop, width))


def without_keys(records: bytes, keys: bytes) -> bytes:
    """records minus those whose flow (connection) is one of the raw keys."""
    if not records or not keys:
        return records
    mine = _words(flowrecords.records_to_keys(records), _KEY_WORDS)
    return _drop_matching(records, mine, _words(keys, _KEY_WORDS))
