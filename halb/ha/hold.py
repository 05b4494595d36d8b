"""Peer-witnessed hold: keeping a group's VIPs through a coordinator outage (pure).

When no balancer can reach etcd, fencing as usual turns a coordinator outage into a
service outage (every node drops the VIP and none may take it). Instead the active may
keep its VIPs while *every other member of the group* promises, over the authenticated
peer channel, that it cannot reach etcd either and will not campaign (nor revoke the
active's lease) for a stated time. Sans-IO: the holder side (``HoldKeeper``) and the
peer side (``PromiseBook``) take messages and clock readings and return decisions.

The safety argument. Let every node's monotonic clock run at a rate within
``[1 - drift, 1 + drift]`` of real time (no wall clock is ever read, so a wall-clock step
changes nothing). The holder H sends a request at its clock reading ``s``; a peer P
receives it no earlier in real time, grants ``d`` seconds, and from then on does not
campaign before its own clock has advanced ``d`` (re-granting only extends). On P's
clock ``d`` lasts at least ``d / (1 + drift)`` real seconds, so P is bound until at
least ``real(s) + d / (1 + drift)``. H counts on its own clock, which may run slow: it
holds only until ``s + d * (1 - drift) / (1 + drift) - withdraw`` (``hold_end``), which
in real time is no later than P's bound minus the time H needs to withdraw the VIP (its
dead-man switch is armed to that instant, so even a frozen H stops). H holds until the
earliest such end over *every* peer; a peer that refuses (it reaches etcd, it is
campaigning or holds the group) or does not answer gives no extension (its standing
promise still counts: nothing shortens what it bound itself to), and H fences as it
would without the hold once the earliest promise ends. A peer that restarts has
forgotten its promises, so at start-up it treats itself as having promised
``promise`` seconds (``PromiseBook`` is born blocked). When etcd answers again the
holder's lease either survived (etcd restarted: leases get a fresh TTL) and nothing
changes, or it expired (a partition): the holder fences and campaigns at once while
the peers are still bound.

What each side knows: H knows only its send times and the durations granted; P knows
only its receive times and what it granted. Neither needs the other's clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Derived with every other interval in halb.timing (one place); re-exported here.
from halb.timing import HoldPolicy

__all__ = [
    "REFUSE_ACTIVE",
    "REFUSE_NOT_MEMBER",
    "REFUSE_REACHES_ETCD",
    "Grant",
    "HoldKeeper",
    "HoldPolicy",
    "PromiseBook",
    "Refusal",
]

REFUSE_REACHES_ETCD = "reaches etcd"
REFUSE_ACTIVE = "holds or is campaigning for the group"
REFUSE_NOT_MEMBER = "not a member of the group"


@dataclass(frozen=True, slots=True)
class Grant:
    duration: float


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str


class HoldKeeper:
    """The holder's side for one group and one term: which promises it has and until
    when they let it hold."""

    def __init__(self, policy: HoldPolicy, peers: Iterable[str]) -> None:
        self.policy = policy
        self.peers = frozenset(peers)
        self._seq = 0
        self._asked: dict[int, float] = {}  # request round -> its send time
        self._until: dict[str, float] = {}  # peer -> hold end from its latest grant
        self._round: dict[str, int] = {}  # peer -> round of that grant
        self.refusals: dict[str, str] = {}  # peer -> why it refused last

    def ask(self, now: float) -> int:
        """Start a round of requests (one to every peer) sent at ``now``; returns its
        number, which the replies carry."""
        self._seq += 1
        self._asked[self._seq] = now
        # Rounds older than a promise can no longer extend anything.
        for seq in [s for s, t in self._asked.items() if t < now - self.policy.promise]:
            del self._asked[seq]
        return self._seq

    def on_grant(self, peer: str, seq: int, granted: float) -> None:
        asked_at = self._asked.get(seq)
        if peer not in self.peers or asked_at is None or granted <= 0:
            return
        if seq < self._round.get(peer, 0):
            return  # a late reply to an older round: the newer grant counts
        self._round[peer] = seq
        self._until[peer] = self.policy.hold_end(asked_at, granted)
        self.refusals.pop(peer, None)

    def on_refusal(self, peer: str, seq: int, reason: str) -> None:
        """A refusal gives no extension; the peer's standing promise still counts until
        it ends, because a refusal never shortens what the peer is bound to (its
        PromiseBook only extends). Fencing at once would change nothing for the peer
        (it may not campaign before then either), only open a gap in service: the
        holder's own etcd client often reconnects a little after its peers' do."""
        if peer not in self.peers:
            return
        self._round[peer] = max(seq, self._round.get(peer, 0))
        self.refusals[peer] = reason

    def hold_until(self) -> float | None:
        """Until when (holder's clock) every peer's promise lets us hold; None if a
        peer has none. With no peers there is nobody to witness: no hold."""
        if not self.peers or set(self._until) != self.peers:
            return None
        return min(self._until.values())

    def promises(self) -> dict[str, float]:
        """peer -> hold end of its promise (status and metrics)."""
        return dict(self._until)


class PromiseBook:
    """A peer's side for one group: the promises it gave and whether it may campaign.

    Born bound: a node that restarts may have promised before it died and forgotten."""

    def __init__(self, policy: HoldPolicy, started: float) -> None:
        self.policy = policy
        self._until = started + policy.promise
        self.granted = 0
        self.refused: dict[str, int] = {}  # reason -> count

    def request(
        self,
        holder: str,
        members: Iterable[str],
        now: float,
        *,
        reaches_etcd: bool,
        contending: bool,
    ) -> Grant | Refusal:
        """Answer ``holder``'s request. ``contending``: this node holds the group or has
        a campaign in flight (it cannot promise not to win)."""
        reason = None
        if holder not in set(members):
            reason = REFUSE_NOT_MEMBER
        elif reaches_etcd:
            reason = REFUSE_REACHES_ETCD
        elif contending:
            reason = REFUSE_ACTIVE
        if reason is not None:
            self.refused[reason] = self.refused.get(reason, 0) + 1
            return Refusal(reason)
        self._until = max(self._until, now + self.policy.promise)
        self.granted += 1
        return Grant(self.policy.promise)

    def bound_until(self) -> float:
        """This node may not campaign (nor force a takeover) before this instant."""
        return self._until

    def bound(self, now: float) -> bool:
        return now < self._until

    def remaining(self, now: float) -> float:
        return max(0.0, self._until - now)
