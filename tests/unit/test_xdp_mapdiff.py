"""The XDP flow source's diff engine (halb.dataplane.xdp.mapdiff) on synthetic map
entries, including forced hash collisions: every change found, nothing live reported
gone."""

from __future__ import annotations

import random

import numpy as np
import pytest

from halb.dataplane.xdp import mapdiff
from halb.dataplane.xdp.flowrecords import KEY_SIZE, VALUE_SIZE
from halb.dataplane.xdp.mapdiff import MapState, compare

pytestmark = pytest.mark.unit


def entries(rng: random.Random, n: int) -> dict[bytes, bytes]:
    return {rng.randbytes(KEY_SIZE): rng.randbytes(VALUE_SIZE) for _ in range(n)}


def state(m: dict[bytes, bytes]) -> MapState:
    return MapState.of(b"".join(m), b"".join(m.values()))


def changes(prev: dict[bytes, bytes], cur: dict[bytes, bytes]) -> tuple[set[bytes], set[bytes]]:
    p, c = state(prev), state(cur)
    changed, gone = compare(p, c)
    return (
        {c.keys[i].tobytes() for i in np.flatnonzero(changed)},
        {p.keys[i].tobytes() for i in np.flatnonzero(gone)},
    )


@pytest.mark.parametrize("collide", [False, True], ids=["hash", "colliding-hash"])
def test_compare_finds_every_change_and_never_a_live_key_gone(
    collide: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if collide:  # two hash values: every key collides with half of the others
        monkeypatch.setattr(mapdiff, "key_hash", lambda words: words[:, 0] & np.uint64(1))
    rng = random.Random(7)
    prev = entries(rng, 400)
    cur = dict(prev)
    keys = list(prev)
    for k in keys[:30]:
        cur[k] = rng.randbytes(VALUE_SIZE)  # changed value
    for k in keys[30:60]:
        del cur[k]  # gone
    added = entries(rng, 25)
    cur.update(added)
    changed, gone = changes(prev, cur)
    want = set(keys[:30]) | set(added)
    assert want <= changed <= set(cur)  # a collision may add an (idempotent) upsert
    if not collide:
        assert changed == want
    assert gone == set(keys[30:60])
    same_changed, same_gone = changes(cur, cur)
    assert same_gone == set()  # an unchanged map: nothing gone, collisions or not
    if not collide:
        assert same_changed == set()


def test_with_entries_lets_the_last_entry_of_a_key_win() -> None:
    rng = random.Random(3)
    base = entries(rng, 5)
    k = next(iter(base))
    v1, v2 = rng.randbytes(VALUE_SIZE), rng.randbytes(VALUE_SIZE)
    extra = rng.randbytes(KEY_SIZE)
    s = state(base).with_entries(k + extra + k, v1 + v1 + v2)
    got = {s.keys[i].tobytes(): s.values[i].tobytes() for i in range(len(s))}
    assert got == {**base, k: v2, extra: v1}
    assert list(s.hashes) == sorted(s.hashes)


def test_stamp_and_phase_changes_are_not_changes_to_sync() -> None:
    """The program rewrites last_seen and the TCP phase as traffic flows; only a
    new backend id is news for the standby."""
    from halb.dataplane.xdp.layout import FLOW_F_CLOSING, FlowValue

    k = bytes(range(KEY_SIZE))
    before = bytes(FlowValue(backend_id=3, flags=0, last_seen=10**9))
    touched = bytes(FlowValue(backend_id=3, flags=FLOW_F_CLOSING, last_seen=5 * 10**9))
    moved = bytes(FlowValue(backend_id=4, flags=0, last_seen=10**9))
    assert changes({k: before}, {k: touched}) == (set(), set())
    assert changes({k: before}, {k: moved}) == ({k}, set())
