"""Pure delta batching: pushed upserts and deletes become ordered batches.

A batch is applied as "all its deletes, then all its upserts". To keep the pushes'
order without hashing every flow (hashing a Flow costs more than encoding it), a
delete that follows an upsert in the pending batch closes that batch and starts the
next one. Repeated upserts of one flow may travel twice; both ops are idempotent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from halb.model import Flow

__all__ = ["Batcher", "Delta"]


@dataclass(frozen=True, slots=True)
class Delta:
    upserts: tuple[Flow, ...] | list[Flow]
    deletes: tuple[Flow, ...] | list[Flow]

    def __len__(self) -> int:
        return len(self.upserts) + len(self.deletes)


class Batcher:
    """Accumulates pushes into batches of at most `limit` operations, in order."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._del: list[Flow] = []
        self._up: list[Flow] = []

    def __len__(self) -> int:
        return len(self._del) + len(self._up)

    def push(self, upserts: Iterable[Flow] = (), deletes: Iterable[Flow] = ()) -> list[Delta]:
        """Add one change set and return the batches it completed.

        Within one push, upserts and deletes must be disjoint (a scan diff or one
        event each); push twice to order changes to the same flow.
        """
        out: list[Delta] = []
        dels = list(deletes)
        if dels:
            if self._up:
                out.append(self._cut(len(self)))  # deletes must not overtake upserts
            self._del.extend(dels)
        self._up.extend(upserts)
        while len(self) >= self.limit:
            out.append(self._cut(self.limit))
        return out

    def take(self) -> Delta | None:
        """Close the pending batch (possibly smaller than the limit), if any."""
        return self._cut(self.limit) if self else None

    def _cut(self, n: int) -> Delta:
        nd = min(n, len(self._del))
        deletes, self._del = self._del[:nd], self._del[nd:]
        nu = min(n - nd, len(self._up))
        upserts, self._up = self._up[:nu], self._up[nu:]
        return Delta(upserts=upserts, deletes=deletes)
