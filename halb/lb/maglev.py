"""Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4), weighted.

Pure and deterministic: the table depends only on the backends' stable names
(``str(backend)``, e.g. ``10.0.0.1:80``), their weights and the table size, never on
input order, process or platform, so every balancer builds a byte-identical table.

Weights follow the "turns" extension: in each round of the population loop the
heaviest backend takes one turn and a backend of weight w takes a turn in w/w_max of
the rounds, so its share of slots is proportional to its weight.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

__all__ = [
    "EMPTY",
    "MaglevTable",
    "build_table",
    "changed_slots",
    "is_prime",
    "permutation_params",
]

EMPTY = -1
"""Slot value of a table with no backend that has a positive weight."""

T = TypeVar("T", bound=Hashable)


@dataclass(frozen=True, slots=True)
class MaglevTable:
    """``slots[i]`` is an index into ``names`` (sorted), or EMPTY."""

    names: tuple[str, ...]
    slots: array[int]

    @property
    def size(self) -> int:
        return len(self.slots)

    def counts(self) -> dict[str, int]:
        """Slots held by each backend name."""
        tally = [0] * len(self.names)
        for i in self.slots:
            if i != EMPTY:
                tally[i] += 1
        return dict(zip(self.names, tally, strict=True))

    def mapped(self, value_of: Callable[[str], T]) -> list[T | None]:
        """The table with each slot translated through ``value_of(name)``."""
        values = [value_of(n) for n in self.names]
        return [values[i] if i != EMPTY else None for i in self.slots]


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def permutation_params(name: str, size: int) -> tuple[int, int]:
    """(offset, skip) of a backend's preference list; blake2b so it is fixed everywhere."""
    digest = hashlib.blake2b(name.encode(), digest_size=16).digest()
    h1 = int.from_bytes(digest[:8], "little")
    h2 = int.from_bytes(digest[8:], "little")
    return h1 % size, h2 % (size - 1) + 1


def build_table(weights: dict[str, int] | Iterable[tuple[str, int]], size: int) -> MaglevTable:
    """Populate a Maglev lookup table of ``size`` (a prime) slots.

    ``weights`` maps each backend's stable name to its weight; weight 0 excludes it.
    """
    if not is_prime(size):
        raise ValueError(f"Maglev table size {size} is not prime")
    items = weights.items() if isinstance(weights, dict) else list(weights)
    merged: dict[str, int] = {}
    for name, weight in items:
        if weight < 0:
            raise ValueError(f"backend {name!r} has a negative weight")
        if name in merged:
            raise ValueError(f"backend {name!r} appears twice")
        merged[name] = weight
    names = tuple(sorted(merged))
    live = [i for i, n in enumerate(names) if merged[n] > 0]
    slots = array("i", [EMPTY]) * size
    if not live:
        return MaglevTable(names, slots)

    params = [permutation_params(names[i], size) for i in live]
    nxt = [p[0] for p in params]  # next candidate slot of each backend
    skips = [p[1] for p in params]
    w = [merged[names[i]] for i in live]
    wmax = max(w)
    credit = [0] * len(live)
    everyone = list(zip(range(len(live)), live, skips, strict=True))
    left = size
    while left:
        # Who takes a turn this round: the heaviest always, others in w/wmax of rounds.
        turns = everyone
        if len(set(w)) > 1:
            turns = []
            for entry in everyone:
                k = entry[0]
                credit[k] += w[k]
                if credit[k] >= wmax:
                    credit[k] -= wmax
                    turns.append(entry)
        if len(turns) > left:
            turns = turns[:left]
        left -= len(turns)
        # Hot loop: locals and constants only (EMPTY is -1, so "taken" is ">= 0").
        for k, i, s in turns:
            c = nxt[k]
            while slots[c] >= 0:
                c = (c + s) % size
            slots[c] = i
            c += s
            nxt[k] = c if c < size else c - size
    return MaglevTable(names, slots)


def changed_slots(old: Sequence[T] | None, new: Sequence[T]) -> list[tuple[int, T]]:
    """(slot, new value) for every slot whose value differs; all slots if ``old`` is None
    or of another size."""
    if old is None or len(old) != len(new):
        return list(enumerate(new))
    return [(i, v) for i, (o, v) in enumerate(zip(old, new, strict=True)) if o != v]
