"""build_table gives exactly the tables of the original pure-Python population loop.

Every node (and the nft dataplane) computes rings on its own, so a faster build must not
move a single slot. `reference` below is a plain copy of the loop as first written;
the digests were taken from that first implementation (commit 795cf44) and pin it
against the copy drifting too.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from halb.lb import maglev
from halb.lb.maglev import EMPTY, build_table, permutation_params

pytestmark = pytest.mark.unit


def reference(weights: dict[str, int], size: int) -> list[int]:
    names = sorted(weights)
    live = [i for i, n in enumerate(names) if weights[n] > 0]
    slots = [EMPTY] * size
    if not live:
        return slots
    params = [permutation_params(names[i], size) for i in live]
    nxt = [offset for offset, _ in params]
    w = [weights[names[i]] for i in live]
    wmax = max(w)
    credit = [0] * len(live)
    left = size
    while left:
        turns = []
        for k in range(len(live)):
            credit[k] += w[k]
            if credit[k] >= wmax:
                credit[k] -= wmax
                turns.append(k)
        for k in turns[:left]:
            skip = params[k][1]
            c = nxt[k]
            while slots[c] != EMPTY:
                c = (c + skip) % size
            slots[c] = live[k]
            nxt[k] = (c + skip) % size
            left -= 1
    return slots


def names(n: int) -> list[str]:
    return [f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}:80" for i in range(n)]


def weights(n: int, kind: str) -> dict[str, int]:
    if kind == "equal":
        return dict.fromkeys(names(n), 1)
    if kind == "mixed":
        return {x: 1 + i % 4 for i, x in enumerate(names(n))}
    return {x: (i * 7) % 5 for i, x in enumerate(names(n))}  # "mixed0": some weight 0


def digest(slots: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, slots)).encode()).hexdigest()[:32]


@pytest.mark.parametrize(
    ("n", "size", "kind", "expected"),
    [
        (1000, 65537, "equal", "fe020baa7f35fff8f00951ad57f38a10"),
        (1000, 65537, "mixed", "17d90135442b4df99d2e65027db982be"),
        (300, 30011, "mixed0", "325c0b0aa2a80cedb10490dc48992519"),
        (150, 65537, "equal", "9828d5c451610306d107c727ad974fde"),
        (10, 65537, "equal", "6446053bad74da322dedcd54a854c146"),
        (3, 307, "mixed", "d189d26fbac90be00119d2a7f5a8c4cb"),
    ],
)
def test_tables_of_the_first_implementation(n: int, size: int, kind: str, expected: str) -> None:
    assert digest(list(build_table(weights(n, kind), size).slots)) == expected


CASES = [
    (2, 7, "equal"),
    (5, 11, "mixed"),
    (40, 4007, "mixed0"),
    (130, 131, "equal"),  # barely more slots than backends: all in the last stretch
    (200, 20011, "mixed"),
    (257, 65537, "mixed0"),
    (1000, 1009, "mixed"),
    (1000, 65537, "equal"),
]


@pytest.mark.parametrize("numpy_from", [1, maglev.VECTOR_MIN], ids=["numpy-always", "default"])
@pytest.mark.parametrize(("n", "size", "kind"), CASES)
def test_same_table_as_the_plain_loop(
    monkeypatch: pytest.MonkeyPatch, numpy_from: int, n: int, size: int, kind: str
) -> None:
    monkeypatch.setattr(maglev, "VECTOR_MIN", numpy_from)
    w = weights(n, kind)
    assert list(build_table(w, size).slots) == reference(w, size)


def test_random_weights_and_sizes_match(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maglev, "VECTOR_MIN", 1)
    rnd = random.Random(3)
    for size in (97, 1009, 10007):
        n = rnd.randrange(2, 300)
        w = {
            f"192.0.2.{i}:{rnd.randrange(1, 65536)}": rnd.choice((0, 1, 1, 2, 5)) for i in range(n)
        }
        w[next(iter(w))] = 3  # at least one live backend
        assert list(build_table(w, size).slots) == reference(w, size), (size, n)
