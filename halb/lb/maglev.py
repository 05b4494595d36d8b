"""Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4), weighted.

Pure and deterministic: the table depends only on the backends' stable names
(``str(backend)``, e.g. ``10.0.0.1:80``), their weights and the table size, never on
input order, process or platform, so every balancer builds a byte-identical table.

Weights follow the "turns" extension: in each round of the population loop the
heaviest backend takes one turn and a backend of weight w takes a turn in w/w_max of
the rounds, so its share of slots is proportional to its weight.

Two implementations of the one population loop, with identical results (tests compare
them with a plain copy of the loop): the plain loop for few backends, and for many a
numpy one (_populate_numpy) that plays each round for all backends at once and the
last, nearly full part of the table with a jump to each backend's next free slot.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

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

VECTOR_MIN = 128
"""Live backends from which build_table uses the numpy population (faster from about
there; below, the per-round numpy overhead outweighs the plain loop)."""

TAIL = 600
"""Free slots from which the plain loop stops probing and jumps (_jump_fill): about
where a probe sequence (size / free slots long) costs more than one vector operation
over the free slots."""


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
    if len(live) >= VECTOR_MIN:
        ks = _populate_numpy(params, [merged[names[i]] for i in live], size)
        filled = np.asarray(live, dtype=np.intc)[ks]  # live index -> name index
        slots = array("i")
        slots.frombytes(filled.tobytes())
        return MaglevTable(names, slots)
    nxt = [p[0] for p in params]  # next candidate slot of each backend
    skips = [p[1] for p in params]
    w = [merged[names[i]] for i in live]
    wmax = max(w)
    weighted = len(set(w)) > 1
    credit = [0] * len(live)
    everyone = list(zip(range(len(live)), live, skips, strict=True))

    def round_turns() -> list[tuple[int, int, int]]:
        # Who takes a turn this round: the heaviest always, others in w/wmax of rounds.
        if not weighted:
            return everyone
        turns = []
        for entry in everyone:
            k = entry[0]
            credit[k] += w[k]
            if credit[k] >= wmax:
                credit[k] -= wmax
                turns.append(entry)
        return turns

    left = size
    while left > TAIL:
        turns = round_turns()
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
    if left:
        _jump_fill(slots, [p[0] for p in params], nxt, left, round_turns)
    return MaglevTable(names, slots)


def _jump_fill(
    slots: array[int],
    offsets: list[int],
    nxt: list[int],
    left: int,
    round_turns: Callable[[], list[tuple[int, int, int]]],
) -> None:
    """The last ``left`` slots of the plain loop, each turn jumping straight to the
    backend's next free slot instead of probing for it: nearly full, a probe finds a
    free slot once in size/left tries, so the last 1% of the table would take most of
    the build. Position in backend k's list of slot f = (f - offset) * skip^-1 mod size
    (size is prime): the nearest free slot ahead is one vector operation."""
    size = len(slots)
    free = np.flatnonzero(np.frombuffer(slots, dtype=np.intc) < 0).astype(np.int64)
    inverse: dict[int, int] = {}
    while left:
        turns = round_turns()[:left]
        for k, i, s in turns:
            o = offsets[k]
            inv = inverse.get(k)
            if inv is None:
                inv = inverse[k] = pow(s, -1, size)
            here = (nxt[k] - o) * inv % size
            m = int((((free - o) * inv - here) % size).argmin())
            c = int(free[m])
            slots[c] = i
            free[m] = free[-1]  # order does not matter: positions are distinct
            free = free[:-1]
            nxt[k] = (c + s) % size
        left -= len(turns)


_I64 = np.int64
_Arr = np.ndarray[Any, np.dtype[np.int64]]


def _populate_numpy(params: list[tuple[int, int]], weights: list[int], size: int) -> _Arr:
    """The population loop of build_table for backends 0..n-1 (params, weights), with
    the same result: slot -> backend.

    In a round, backends take their turns in order: each claims the first slot of its
    preference list (offset, offset + skip, ... mod size) that is free, free meaning
    neither filled in an earlier round nor claimed in this one by a backend before it.
    All of a round's backends probe at once (several candidates per step, more as the
    table fills), then collisions are settled by letting the lowest backend keep a slot
    and sending the others on from it, until no two claim the same slot. A slot's
    claimant only ever changes to a lower backend, so a slot skipped because a lower
    one claimed it stays rightly skipped, and the fixed point is the sequential result.

    The last `n` slots are filled turn by turn, each backend jumping straight to its
    next free slot: position in the list of slot f = (f - offset) * skip^-1 mod size
    (size is prime), so the nearest free slot ahead is one vector operation."""
    n = len(params)
    off = np.array([p[0] for p in params], dtype=_I64)
    skip = np.array([p[1] for p in params], dtype=_I64)
    nxt = off.copy()
    w = np.array(weights, dtype=_I64)
    wmax = int(w.max())
    weighted = bool((w != wmax).any())
    credit = np.zeros(n, dtype=_I64)
    everyone = np.arange(n, dtype=_I64)
    slots = np.full(size, -1, dtype=_I64)
    # Per slot: -1 once filled, else the lowest backend that claimed it this round, else
    # `nobody`. A backend may take a slot whose owner value is above its own number.
    nobody = np.iinfo(_I64).max
    owner = np.full(size, nobody, dtype=_I64)

    def turns() -> _Arr:
        if not weighted:
            return everyone
        credit[:] += w
        take = credit >= wmax
        credit[take] -= wmax
        return everyone[take]

    left = size
    while left > n:
        act = turns()[:left]
        # Candidates per probe: about 4 / (free fraction), so most backends find a
        # free slot in the first probe whatever the fill.
        look = np.arange(min(-(-4 * size // left), 1024), dtype=_I64)
        pos = nxt[act]
        step = skip[act]
        pending = np.arange(len(act))
        while pending.size:
            who = act[pending]
            p = pos[pending]
            sp = step[pending]
            idx = np.arange(len(p))
            while idx.size:
                cand = (p[idx, None] + sp[idx, None] * look) % size
                ok = owner[cand] > who[idx, None]
                first = ok.argmax(axis=1)
                found = ok[np.arange(len(idx)), first]
                p[idx[found]] = cand[found, first[found]]
                idx = idx[~found]
                p[idx] = (cand[~found, -1] + sp[idx]) % size
            pos[pending] = p
            np.minimum.at(owner, p, who)
            pending = np.flatnonzero(owner[pos] != act)
        slots[pos] = act
        owner[pos] = -1
        nxt[act] = (pos + step) % size
        left -= len(act)

    free = np.flatnonzero(slots < 0).astype(_I64)
    offs, skips, nxts = off.tolist(), skip.tolist(), nxt.tolist()
    inverse = [pow(s, -1, size) for s in skips]
    while left:
        for k in turns()[:left].tolist():
            o, inv = offs[k], inverse[k]
            here = (nxts[k] - o) * inv % size
            m = int((((free - o) * inv - here) % size).argmin())
            c = int(free[m])
            slots[c] = k
            free[m] = free[-1]  # order does not matter: positions are distinct
            free = free[:-1]
            nxts[k] = (c + skips[k]) % size
            left -= 1
    return slots


def changed_slots(old: Sequence[T] | None, new: Sequence[T]) -> list[tuple[int, T]]:
    """(slot, new value) for every slot whose value differs; all slots if ``old`` is None
    or of another size."""
    if old is None or len(old) != len(new):
        return list(enumerate(new))
    return [(i, v) for i, (o, v) in enumerate(zip(old, new, strict=True)) if o != v]
