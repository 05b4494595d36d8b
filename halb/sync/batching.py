"""Pure delta batching: pushed upserts and deletes (packed flow records) become ordered
batches.

A batch is applied as "all its deletes, then all its upserts". To keep the pushes'
order without looking at the flows, a delete that follows an upsert in the pending
batch closes that batch and starts the next one. Repeated upserts of one flow may
travel twice; both ops are idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass

from halb.flows.records import RECORD_SIZE

__all__ = ["Batcher", "Delta"]


@dataclass(frozen=True, slots=True)
class Delta:
    upserts: bytes  # packed records
    deletes: bytes

    def __len__(self) -> int:
        return (len(self.upserts) + len(self.deletes)) // RECORD_SIZE


class Batcher:
    """Accumulates pushes into batches of at most `limit` operations, in order."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._del = bytearray()
        self._up = bytearray()

    def __len__(self) -> int:
        return (len(self._del) + len(self._up)) // RECORD_SIZE

    def push(self, upserts: bytes = b"", deletes: bytes = b"") -> list[Delta]:
        """Add one change set (packed records) and return the batches it completed.

        Within one push, upserts and deletes must be disjoint (a scan diff or one
        event each); push twice to order changes to the same flow.
        """
        if len(upserts) % RECORD_SIZE or len(deletes) % RECORD_SIZE:
            raise ValueError("a push must hold whole flow records")
        out: list[Delta] = []
        if deletes:
            if self._up:
                out.append(self._cut(len(self)))  # deletes must not overtake upserts
            self._del += deletes
        self._up += upserts
        while len(self) >= self.limit:
            out.append(self._cut(self.limit))
        return out

    def take(self) -> Delta | None:
        """Close the pending batch (possibly smaller than the limit), if any."""
        return self._cut(self.limit) if self else None

    def _cut(self, n: int) -> Delta:
        nd = min(n, len(self._del) // RECORD_SIZE) * RECORD_SIZE
        deletes = bytes(self._del[:nd])
        del self._del[:nd]
        nu = min(n * RECORD_SIZE - nd, len(self._up))
        upserts = bytes(self._up[:nu])
        del self._up[:nu]
        return Delta(upserts=upserts, deletes=deletes)
