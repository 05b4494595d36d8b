"""The peer's side of the hold (halb.ha.hold): answers the node's Promise calls.

One PromiseBook per VIP group this node belongs to, born bound (a restarted node may
have promised and forgotten). A request is granted only when this node cannot reach
etcd (its coordinator heard nothing for the policy's ``quiet`` seconds) and its machine
is neither holding nor campaigning for the group. Every request also starts a probe of
etcd (one read, bounded by the renewal interval) unless one is running: keepalives
alone are too sparse, and a peer that reaches etcd while only the holder is cut off
must refuse (else it would bind itself and never take over); a grant binds the machine at once
(GroupRuntime.promise). Counted by outcome for the metrics and `halb status`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from halb.ha.clock import Clock, MonotonicClock
from halb.ha.coord import Coordinator
from halb.ha.hold import REFUSE_ACTIVE, REFUSE_NOT_MEMBER, Grant, PromiseBook, Refusal
from halb.ha.runtime import GroupRuntime
from halb.model import Term
from halb.timing import HoldPolicy

__all__ = ["PeerWitness"]

log = logging.getLogger(__name__)


@dataclass
class _Witness:
    book: PromiseBook
    members: frozenset[str]
    runtime: GroupRuntime
    coord: Coordinator
    policy: HoldPolicy
    last: dict[str, str] = field(default_factory=dict)  # holder -> last outcome logged
    probing: asyncio.Task[bool] | None = None


class PeerWitness:
    """The node's PromiseDesk (halb.sync.promise), shared by its groups."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or MonotonicClock()
        self._groups: dict[str, _Witness] = {}
        self.answers: dict[tuple[str, str], int] = {}  # (group, outcome) -> count

    def add_group(
        self,
        group: str,
        policy: HoldPolicy,
        members: Sequence[str],
        runtime: GroupRuntime,
        coord: Coordinator,
    ) -> None:
        book = PromiseBook(policy, self.clock.now())
        self._groups[group] = _Witness(book, frozenset(members), runtime, coord, policy)

    def answer(self, group: str, holder: str, term: Term) -> Grant | Refusal:
        w = self._groups.get(group)
        if w is None:
            ans: Grant | Refusal = Refusal(f"{REFUSE_NOT_MEMBER} {group!r} (or it does not hold)")
        else:
            self._probe(w)
            ans = w.book.request(
                holder,
                w.members,
                self.clock.now(),
                reaches_etcd=w.coord.reaches_etcd(w.policy.quiet),
                contending=w.runtime.machine.contending,
            )
            # Same event-loop step as the check: nothing can have started a campaign.
            if isinstance(ans, Grant) and not w.runtime.promise(ans.duration):
                ans = Refusal(REFUSE_ACTIVE)
        outcome = "granted" if isinstance(ans, Grant) else ans.reason
        key = (group, outcome)
        self.answers[key] = self.answers.get(key, 0) + 1
        if w is not None and w.last.get(holder) != outcome:
            w.last[holder] = outcome
            log.info("group %s: promise to %s (term %s): %s%s", group, holder, term, outcome,
                     f" for {ans.duration:.2f}s" if isinstance(ans, Grant) else "")  # fmt: skip
        return ans

    def _probe(self, w: _Witness) -> None:
        if w.probing is None or w.probing.done():
            w.probing = asyncio.get_running_loop().create_task(w.coord.probe(w.policy.renew))

    def bound_for(self, group: str) -> float:
        """Seconds this node is still bound by promises for ``group``."""
        w = self._groups.get(group)
        return 0.0 if w is None else w.book.remaining(self.clock.now())

    def doc(self, group: str) -> dict[str, object]:
        w = self._groups.get(group)
        if w is None:
            return {}
        return {
            "bound_for": round(w.book.remaining(self.clock.now()), 3),
            "granted": w.book.granted,
            "refused": dict(w.book.refused),
        }
