"""Delta batching of packed records: order is kept, batches respect the limit."""

from __future__ import annotations

import ipaddress

import pytest

from halb.flows.records import from_flows, to_flows
from halb.model import Flow, Protocol
from halb.sync.batching import Batcher, Delta

pytestmark = pytest.mark.unit


def flow(i: int) -> Flow:
    return Flow(
        Protocol.TCP,
        ipaddress.ip_address(f"192.0.2.{i}"),
        1000 + i,
        ipaddress.ip_address("10.0.0.100"),
        80,
        ipaddress.ip_address("10.0.0.21"),
        80,
    )


def r(*ids: int) -> bytes:
    """The records of flow(i) for each id."""
    return from_flows(flow(i) for i in ids)


def apply(batches: list[Delta], state: set[Flow]) -> set[Flow]:
    """What a standby does: per batch, deletes first, then upserts."""
    for b in batches:
        state = (state - set(to_flows(b.deletes))) | set(to_flows(b.upserts))
    return state


def drain(b: Batcher, done: list[Delta]) -> list[Delta]:
    last = b.take()
    return [*done, last] if last is not None else done


def test_a_delete_after_an_upsert_starts_a_new_batch() -> None:
    b = Batcher(100)
    done = b.push(upserts=r(1))
    done += b.push(deletes=r(1))
    assert [(d.upserts, d.deletes) for d in done] == [(r(1), b"")]
    batches = drain(b, done)
    assert apply(batches, set()) == set()  # upsert then delete: gone


def test_upsert_after_delete_stays_in_one_batch() -> None:
    b = Batcher(100)
    done = b.push(deletes=r(1)) + b.push(upserts=r(1, 2))
    assert done == []
    batches = drain(b, done)
    assert len(batches) == 1
    assert apply(batches, {flow(1)}) == {flow(1), flow(2)}


def test_limit_splits_in_order() -> None:
    b = Batcher(4)
    done = b.push(deletes=r(10, 11, 12))
    done += b.push(upserts=r(*range(1, 7)))
    assert [len(d) for d in done] == [4, 4]
    assert done[0].deletes == r(10, 11, 12) and done[0].upserts == r(1)
    assert done[1].deletes == b"" and done[1].upserts == r(2, 3, 4, 5)
    rest = b.take()
    assert rest is not None and rest.upserts == r(6)
    assert b.take() is None and len(b) == 0


def test_random_sequences_match_sequential_application() -> None:
    import random

    rng = random.Random(5)
    for _ in range(200):
        b = Batcher(rng.randint(1, 6))
        want: set[Flow] = set(flow(i) for i in range(3))
        state = set(want)
        done: list[Delta] = []
        for _ in range(rng.randint(1, 12)):
            ids = [rng.randint(0, 5) for _ in range(rng.randint(1, 3))]
            fl = [flow(i) for i in ids]
            if rng.random() < 0.5:
                want |= set(fl)
                done += b.push(upserts=r(*ids))
            else:
                want -= set(fl)
                done += b.push(deletes=r(*ids))
        assert apply(drain(b, done), state) == want


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit"):
        Batcher(0)


def test_a_push_must_hold_whole_records() -> None:
    b = Batcher(4)
    with pytest.raises(ValueError, match="whole"):
        b.push(upserts=r(1)[:-1])
    assert len(b) == 0
