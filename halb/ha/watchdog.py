"""A standby's view of the leader's heartbeats (fast takeover), sans-IO: the coordinator
feeds it what it sees (the leader's term, heartbeats with their etcd revision, clock
readings) and asks it which term, if any, has been silent too long.

A term is reported at most once; a fresh read of the keys (after a reconnect) judges it
anew, because heartbeats may have been missed while the watch was down. Before a report
the coordinator reads the heartbeat key itself (``moved``): a watch moving to another
etcd member must not make a live leader look silent.
"""

from __future__ import annotations

from halb.model import Term

__all__ = ["LeaderWatchdog"]


class LeaderWatchdog:
    def __init__(self, limit: float) -> None:
        self.limit = limit  # heartbeat timeout plus this node's rank skew
        self.watched: Term | None = None
        self._since = 0.0  # when the watched term's last heartbeat (or the term) was seen
        self._reported: Term | None = None
        self._seen = 0  # etcd revision of the newest heartbeat of the watched term seen

    def observe_leader(self, term: Term | None, now: float) -> None:
        """The leader key names ``term``: its heartbeat clock starts now."""
        if term != self.watched:
            self._reported = None
        self.watched = term
        self._since = now

    def reread(self) -> None:
        """The keys were read afresh: judge the current term again."""
        self._reported = None

    def heartbeat(self, term: Term | None, revision: int, now: float) -> None:
        if term is not None and term == self.watched:
            self._since = now
            self._seen = max(self._seen, revision)

    def etcd_unavailable(self, now: float) -> None:
        """etcd does not answer this node now: no heartbeat could reach it either, so
        the silence counts only from when etcd answers again."""
        self._since = max(self._since, now)

    def suspect(self, now: float, own_lease: int | None) -> tuple[Term, float] | None:
        """The watched term and how long it has been silent, if past the limit and not
        yet reported (never our own term)."""
        term = self.watched
        if term is None or term == self._reported:
            return None
        if own_lease is not None and term.lease_id == own_lease:
            return None
        silent = now - self._since
        return (term, silent) if silent > self.limit else None

    def moved(self, term: Term, beat_term: Term | None, revision: int, now: float) -> bool:
        """A read of the heartbeat key found a beat of ``beat_term`` at ``revision``:
        whether it shows ``term`` alive after all (the clock restarts then)."""
        if revision <= self._seen or beat_term != term:
            return False
        if self.watched == term:
            self._seen = revision
            self._since = now
        return True  # (or the term changed meanwhile: the new one has its own clock)

    def report(self, term: Term) -> None:
        self._reported = term

    def alive(self, term: Term, now: float) -> bool:
        """Whether ``term`` beat within the limit (after a report: a takeover deferred
        by a promise must not revoke a leader that came back meanwhile)."""
        return self.watched == term and now - self._since <= self.limit
