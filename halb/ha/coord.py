"""etcd adapter for one VIP group on one node: lease, campaign, watch -> machine events.

Keys: halb.keys (the leader, handover and heartbeat keys of the group, the node's drain
key); their values: halb.ha.values; operator actions on them: halb.ha.admin.

Every node holds one lease per group (so resigning one group revokes only that group's
key) and keeps it alive every ``keepalive_interval`` (TTL/4 by default). The fence
deadline is ``send time of the last successful keepalive + TTL - fence_margin``:
etcd renewed the lease no earlier than we sent the request, so the lease cannot expire
on the etcd side before ``last_ok + TTL``; dropping the VIP at the deadline leaves
``fence_margin`` seconds of safety. ``FenceDeadlinePassed`` is emitted once per lease,
after which this coordinator abandons the lease and grants a new one as soon as etcd
answers again.

Heartbeats (fast takeover, DESIGN.md "Direction"): the active's ``heartbeat(term)``
puts the heartbeat key in a transaction that requires the leader key to still hold the
term. The send time of the last one that succeeded, plus ``heartbeat_timeout``, is a
second fence deadline (the earlier of the two counts): the runtime arms the dataplane's
dead-man switch to it. Until the first heartbeat of a term succeeds the term is not
*ready*: no VIP is added on the strength of a campaign that a standby may already have
revoked. A standby's watchdog emits ``LeaderUnresponsive`` once per term when no
heartbeat of the current leader's term arrived for ``heartbeat_timeout`` (plus its rank
slack) while etcd answered the standby itself (time when its own etcd calls fail, as
while etcd elects a leader, does not count); ``force_takeover`` then records the
reason and revokes the leader's lease.

Watches (halb.etcd.read_then_watch): one read of the group's keys and of the drain
key, then watches from the read revision + 1 that the client resumes across member
failures without losing or repeating an event; after a compaction (or a final error,
retried with backoff) the keys are read again and the current view re-emitted, which
the machine takes idempotently. Before reporting a leader unresponsive, the watchdog
reads the heartbeat key itself: a watch that was moving to another etcd member must
not make a live leader look silent.

Election transactions are create-if-absent and safe to retry: the client may retry a
campaign whose first attempt was applied but whose reply was lost; the retry then
fails its compare, and a leader key found on our own lease means we won.

Coordinator outage (halb.ha.hold): ``etcd_quiet_for()`` is how long etcd has given no
answer at all (keepalive, heartbeat, watch event or read); ``reaches_etcd(window)`` is
the peer's judgement of it. ``hold(until)`` is the one way the peer-witnessed hold
extends the fence deadline: ``fence_deadline`` is then the later of the usual deadline
and ``until`` (the runtime's ownership check and the dead-man switch read it).

Lease resume: with a ``state_dir`` the lease id is stored in
``<state_dir>/lease-<cluster>-<group>``; at start-up a stored lease that LeaseTimeToLive
still reports alive is resumed (``LeaseGranted(resumed=True)``) instead of granting a
new one, so an agent restarted within the TTL keeps its term.

Usage (the runtime does this)::

    client = halb.agent.etcdio.connect(cfg, node)   # an EtcdClient on every endpoint
    coord = Coordinator(client, GroupKeys(prefix, cluster, group), node, priority,
                        ttl=2, emit=queue.put_nowait, state_dir=Path(cfg.state_dir))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(coord.run())
        ...   # machine actions call coord.campaign / resign / request_handover / ...
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from halb.aio import Backoff, within
from halb.etcd import (
    Compare,
    EtcdClient,
    EtcdError,
    EventKind,
    Get,
    KeyValue,
    LeaseNotFound,
    Put,
    RangeResult,
    Snapshot,
    WatchEvent,
    read_then_watch,
)
from halb.ha.clock import Clock, MonotonicClock
from halb.ha.leasefile import LeaseFile
from halb.ha.machine import (
    UNRESPONSIVE,
    CampaignLost,
    CampaignWon,
    Drain,
    Event,
    FenceDeadlinePassed,
    HandoverObserved,
    KeepaliveOk,
    Leader,
    LeaderObserved,
    LeaderUnresponsive,
    LeaseGranted,
    LeaseLost,
    Undrain,
)
from halb.ha.values import (
    handover_value,
    heartbeat_term,
    heartbeat_value,
    leader_value,
    parse_handover,
    parse_leader,
)
from halb.ha.watchdog import LeaderWatchdog
from halb.keys import GroupKeys
from halb.model import Term
from halb.timing import lease_timings, rpc_timeout_for

__all__ = ["Coordinator"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that mean "etcd did not answer as hoped, try again later".
_RETRY = (EtcdError, asyncio.TimeoutError, OSError)


class Coordinator:
    """Turns etcd into machine events for one (node, group); runs machine requests.

    ``emit`` is called from the event loop with each event, in order; it must not block
    (a ``Queue.put_nowait`` is the intended use). Methods other than ``run`` are the
    machine's actions; they return once done or once they no longer matter (the lease
    they were about has gone), and report outcomes as events.
    """

    def __init__(
        self,
        client: EtcdClient,
        keys: GroupKeys,
        node: str,
        priority: int,
        *,
        ttl: float,
        emit: Callable[[Event], None],
        clock: Clock | None = None,
        keepalive_interval: float | None = None,
        fence_margin: float | None = None,
        rpc_timeout: float | None = None,
        state_dir: Path | None = None,
        heartbeat_interval: float = 0.0,
        heartbeat_timeout: float = 0.0,
        watchdog_slack: float = 0.0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.node = node
        self.priority = priority
        # halb.timing derives the cadence and the margin (tests may override them).
        lease = lease_timings(ttl)
        self.ttl = lease.lease_ttl
        self.emit = emit
        self.clock = clock or MonotonicClock()
        self.keepalive_interval = keepalive_interval or lease.keepalive_interval
        self.fence_margin = fence_margin if fence_margin is not None else lease.fence_margin
        self.rpc_timeout = rpc_timeout or rpc_timeout_for(self.keepalive_interval)
        self.state_dir = state_dir
        self._lease_file = LeaseFile(
            state_dir / f"lease-{keys.cluster}-{keys.group}" if state_dir is not None else None
        )
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        # Lower-ranked standbys notice a silent leader a little later, so usually
        # only the best one revokes it.
        self.watchdog_slack = watchdog_slack
        # Active side: the term heartbeating and the send time of its last success.
        self._hb_term: Term | None = None
        self._hb_ok: float | None = None
        self._hb_seq = 0
        # Standby side: the leader's term as last seen, when its last heartbeat (or
        # the term itself) was seen, and whether it was reported unresponsive.
        self.watchdog = LeaderWatchdog(heartbeat_timeout + watchdog_slack)
        # Shutting down: no new lease (and no lease file) after the last resign.
        self._retired = False
        self._lease: int | None = None
        self._granted_ttl = self.ttl
        self.last_keepalive_ok: float | None = None
        # When etcd last answered anything (keepalive, heartbeat, watch, read).
        self._etcd_ok: float | None = None
        # The peer-witnessed hold's end (halb.ha.hold), set by the term's hold task.
        self._hold_until: float | None = None
        # etcd revision of the newest leader/handover view emitted (reads and watch).
        self._view_revision = 0

    # -- observable state ----------------------------------------------------------------

    @property
    def lease_id(self) -> int | None:
        return self._lease

    @property
    def heartbeats(self) -> bool:
        return self.heartbeat_interval > 0 and self.heartbeat_timeout > 0

    @property
    def fence_deadline(self) -> float | None:
        """Clock time by which a keepalive (and, for an active node, a heartbeat) must
        succeed, or the VIP must go; a peer-witnessed hold may extend it."""
        deadline = self.usual_fence_deadline
        if deadline is not None and self._hold_until is not None:
            # Every peer promised not to campaign before this (halb.ha.hold).
            deadline = max(deadline, self._hold_until)
        return deadline

    @property
    def usual_fence_deadline(self) -> float | None:
        """The fence deadline that etcd's answers alone justify (no hold)."""
        if self._lease is None or self.last_keepalive_ok is None:
            return None
        deadline = self.last_keepalive_ok + self._granted_ttl - self.fence_margin
        if self._hb_term is not None and self._hb_ok is not None:
            deadline = min(deadline, self._hb_ok + self.heartbeat_timeout)
        return deadline

    def hold(self, until: float | None) -> None:
        """The peer-witnessed hold lets the current lease's holder keep its VIPs until
        ``until`` (its clock) even without etcd; None ends the hold. Nothing else may
        extend the fence deadline."""
        self._hold_until = until if self._lease is not None else None

    @property
    def holding_until(self) -> float | None:
        return self._hold_until

    def etcd_quiet_for(self) -> float:
        """Seconds since etcd last answered this coordinator (inf: never)."""
        if self._etcd_ok is None:
            return float("inf")
        return self.clock.now() - self._etcd_ok

    def reaches_etcd(self, window: float) -> bool:
        """Whether etcd answered within ``window`` seconds: a peer that does must not
        promise (it can see, and act on, a silent leader itself)."""
        return self.etcd_quiet_for() < window

    async def probe(self, timeout: float) -> bool:
        """One cheap read (the leader key) bounded by ``timeout``: does etcd answer now?
        A peer asked for a promise probes, since its keepalives alone are too sparse to
        tell a dead etcd from a quiet moment."""
        sent = self.clock.now()
        try:
            await within(self.client.get(self.keys.leader, timeout=timeout), timeout + 0.05)
        except (*_RETRY, TimeoutError):
            return False
        self._answered(sent)
        return True

    def _answered(self, sent: float | None = None) -> None:
        t = self.clock.now() if sent is None else sent
        if self._etcd_ok is None or t > self._etcd_ok:
            self._etcd_ok = t

    def ready(self, term: Term) -> bool:
        """Whether ``term`` may hold VIPs as far as heartbeats go: always without
        heartbeats, else once a heartbeat of this term has succeeded."""
        if not self.heartbeats:
            return True
        return self._hb_term == term and self._hb_ok is not None

    @property
    def lease_file(self) -> Path | None:
        return self._lease_file.path

    # -- main loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep a lease, watch the group's keys, fence: until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._lease_loop(), name=f"lease-{self.keys.group}")
            tg.create_task(self._fence_loop(), name=f"fence-{self.keys.group}")
            tg.create_task(self._watch_loop(), name=f"watch-{self.keys.group}")
            if self.heartbeats:
                tg.create_task(self._watchdog_loop(), name=f"watchdog-{self.keys.group}")

    def _observe_leader(self, leader: Leader | None) -> None:
        self.watchdog.observe_leader(leader.term if leader is not None else None, self.clock.now())

    async def _watchdog_loop(self) -> None:
        while True:
            await self.clock.sleep(self.heartbeat_interval / 2)
            if self.client.outages.failing_since is not None:
                # etcd does not answer us either (electing a leader, say): the leader's
                # heartbeats cannot get through now; judge it only once etcd answers.
                self.watchdog.etcd_unavailable(self.clock.now())
                continue
            suspect = self.watchdog.suspect(self.clock.now(), self._lease)
            if suspect is None:
                continue
            term, silent = suspect
            if await self._heartbeat_moved(term):
                continue
            log.warning(
                "no heartbeat from the leader of term %s for %.2fs (limit %.2fs)",
                term,
                silent,
                self.watchdog.limit,
            )
            self.watchdog.report(term)
            self.emit(LeaderUnresponsive(term))

    async def _heartbeat_moved(self, term: Term) -> bool:
        """Whether the heartbeat key, read now, shows ``term`` alive after all."""
        try:
            kv = await self._rpc(lambda t: self.client.get(self.keys.heartbeat, timeout=t))
        except _RETRY:
            return False
        if kv is None:
            return False
        moved = self.watchdog.moved(
            term, heartbeat_term(kv.value), kv.mod_revision, self.clock.now()
        )
        if moved:
            log.info("heartbeat of term %s seen by a read, not yet by the watch", term)
        return moved

    async def _keepalive(self, lease: int, timeout: float) -> int:
        return await self.client.keepalive(lease, timeout=timeout)

    async def _rpc(self, call: Callable[[float], Awaitable[T]]) -> T:
        """One client call under the coordinator's deadline; the client retries and
        moves between etcd members inside it."""
        return await within(call(self.rpc_timeout), self.rpc_timeout + 0.1)

    # -- lease -----------------------------------------------------------------------------

    def retire(self) -> None:
        """The agent is stopping: once the current lease is given up, grant no other
        (a keepalive in flight during the resign would otherwise get one, and store it
        for the next start to 'resume')."""
        self._retired = True

    async def _lease_loop(self) -> None:
        backoff = Backoff()
        failing = False
        while True:
            if self._lease is None and self._retired:
                return
            if self._lease is None:
                lease, last_ok, resumed = await self._acquire(backoff)
                self._lease = lease
                self.last_keepalive_ok = last_ok
                self._answered(last_ok)
                self.emit(LeaseGranted(lease, resumed=resumed))
                await self._reread()
                continue
            lease = self._lease
            sent = self.clock.now()
            try:
                ttl = await self._rpc(functools.partial(self._keepalive, lease))
            except _RETRY as exc:
                if not failing:
                    log.warning("keepalive of lease %x failed: %s", lease, exc or type(exc))
                failing = True
                await self.clock.sleep(min(self.keepalive_interval, 0.1))
                continue
            if self._lease != lease:
                continue  # resigned or fenced meanwhile
            if ttl <= 0:
                log.warning("lease %x is gone on the etcd side", lease)
                self._drop_lease()
                self.emit(LeaseLost(lease))
                continue
            if failing:
                log.info("keepalive of lease %x works again", lease)
                failing = False
            self.last_keepalive_ok = sent
            self._answered(sent)
            self.emit(KeepaliveOk(lease))
            await self.clock.sleep(self.keepalive_interval)

    async def _acquire(self, backoff: Backoff) -> tuple[int, float, bool]:
        """A lease, the send time of the request that proved it alive (etcd started or
        renewed its TTL no earlier), and whether it was resumed."""
        resumed = await self._try_resume()
        if resumed is not None:
            return (*resumed, True)
        backoff.reset()
        while True:
            sent = self.clock.now()
            try:
                lease = await self._rpc(lambda t: self.client.grant(self.ttl, timeout=t))
            except _RETRY as exc:
                delay = backoff.next()
                log.warning("lease grant failed (%s); retrying in %.2fs", exc, delay)
                await self.clock.sleep(delay)
                continue
            self._granted_ttl = int(lease.ttl) or self.ttl
            log.info("granted lease %x ttl %ss for group %s", lease.id, lease.ttl, self.keys.group)
            self._store_lease(lease.id)
            return int(lease.id), sent, False

    async def _try_resume(self) -> tuple[int, float] | None:
        lease = self._lease_file.load()
        if lease is None:
            return None
        try:
            info = await self._rpc(lambda t: self.client.time_to_live(lease, timeout=t))
            ttl = info.ttl
        except _RETRY as exc:
            log.info("cannot check stored lease %x (%s); granting a new one", lease, exc)
            return None
        if ttl <= 0:
            log.info("stored lease %x has expired; granting a new one", lease)
            self._lease_file.remove()
            return None
        self._granted_ttl = info.granted_ttl or self.ttl
        # TimeToLive is whole seconds: renew it now so the fence deadline is exact.
        sent = self.clock.now()
        try:
            left = await self._rpc(lambda t: self.client.keepalive(lease, timeout=t))
        except _RETRY as exc:
            log.info("cannot renew stored lease %x (%s); granting a new one", lease, exc)
            return None
        if left <= 0:
            return None
        log.info("resumed lease %x (%ss were left)", lease, ttl)
        return lease, sent

    def _store_lease(self, lease: int) -> None:
        if not self._retired:
            self._lease_file.store(lease)

    def _drop_lease(self) -> None:
        self._lease = None
        self._hold_until = None
        self.last_keepalive_ok = None
        self._lease_file.remove()

    async def _fence_loop(self) -> None:
        while True:
            lease, deadline = self._lease, self.fence_deadline
            if lease is None or deadline is None:
                await self.clock.sleep(min(0.05, self.keepalive_interval))
                continue
            remaining = deadline - self.clock.now()
            if remaining > 0:
                # A heartbeat can start (and bring the deadline forward) while we sleep;
                # so can a refused promise end a hold.
                if self.heartbeats:
                    remaining = min(remaining, self.heartbeat_interval / 2)
                if self._hold_until is not None:
                    remaining = min(remaining, 0.05)
                await self.clock.sleep(remaining)
                continue
            log.error(
                "no keepalive of lease %x for %.2fs (ttl %ss, margin %.2fs%s): fencing",
                lease,
                self.clock.now() - (self.last_keepalive_ok or 0.0),
                self._granted_ttl,
                self.fence_margin,
                ", no hold" if self._hold_until is None else ", hold ran out",
            )
            self._drop_lease()
            self.emit(FenceDeadlinePassed(lease))

    # -- machine actions -------------------------------------------------------------------

    async def campaign(self, lease: int) -> None:
        """Create the leader key on ``lease`` if absent; emit CampaignWon / CampaignLost."""
        value = leader_value(self.node, self.priority, lease)
        backoff = Backoff()
        while self._lease == lease:
            try:
                result = await self._rpc(
                    lambda t: self.client.txn(
                        [Compare.create(self.keys.leader, "==", 0)],
                        [Put(self.keys.leader, value, lease)],
                        [Get(self.keys.leader)],
                        timeout=t,
                    )
                )
            except LeaseNotFound:
                log.warning("campaign: lease %x is gone", lease)
                if self._lease == lease:
                    self._drop_lease()
                    self.emit(LeaseLost(lease))
                return
            except _RETRY as exc:
                delay = backoff.next()
                log.warning("campaign with lease %x: %s; retrying in %.2fs", lease, exc, delay)
                await self.clock.sleep(delay)
                continue
            if result.succeeded:
                term = Term(lease, result.revision)
                log.info("%s won group %s, term %s", self.node, self.keys.group, term)
                self.emit(CampaignWon(term))
                return
            found = result.responses[0] if result.responses else None
            kv = found.first() if isinstance(found, RangeResult) else None
            if kv is not None and kv.lease == lease:
                # Our own key: an earlier attempt of this campaign was applied and its
                # reply lost, so the client retried. We won then, at its revision.
                term = Term(lease, kv.create_revision)
                log.info("%s won group %s, term %s (retried)", self.node, self.keys.group, term)
                self.emit(CampaignWon(term))
                return
            leader = parse_leader(kv.value, kv.lease, kv.create_revision) if kv else None
            log.info("%s lost the campaign for %s to %s", self.node, self.keys.group, leader)
            self.emit(CampaignLost(leader))
            return

    async def _put_if_term(self, term: Term, key: bytes, value: bytes, lease: int) -> bool:
        """Put ``key`` on ``lease`` only while the leader key holds ``term``; False if it
        no longer does. etcd errors are raised."""
        result = await self._rpc(
            lambda t: self.client.txn(
                [Compare.create(self.keys.leader, "==", term.revision)],
                [Put(key, value, lease)],
                timeout=t,
            )
        )
        return result.succeeded

    async def heartbeat(self, term: Term, ready: Callable[[], None] | None = None) -> None:
        """Active side, until cancelled: put the heartbeat key every interval while the
        leader key holds ``term``; ``ready`` is called after each success (the runtime
        re-arms the dead-man switch). Returns if the term is gone."""
        if not self.heartbeats:
            return
        self._hb_term, self._hb_ok = term, None
        try:
            while self._lease == term.lease_id:
                sent = self.clock.now()
                self._hb_seq += 1
                value = heartbeat_value(term, self._hb_seq)
                ok: bool | None
                try:
                    ok = await self._put_if_term(term, self.keys.heartbeat, value, term.lease_id)
                except LeaseNotFound:
                    log.warning("heartbeat: lease of term %s is gone", term)
                    return
                except _RETRY:
                    ok = None
                if ok is False:
                    log.warning("heartbeat: the leader key no longer holds term %s", term)
                    return
                if ok is not None:
                    self._answered(sent)
                if ok:
                    self._hb_ok = sent
                    if ready is not None:
                        ready()
                elapsed = self.clock.now() - sent
                await self.clock.sleep(max(0.0, self.heartbeat_interval - elapsed))
        finally:
            self._hb_term, self._hb_ok = None, None

    async def force_takeover(self, term: Term) -> None:
        """Standby side: the leader of ``term`` is silent. Record why (a handover request
        naming us, on our lease, only while the key still holds that term), then revoke
        its lease; the machine waits out the fence before campaigning."""
        lease = self._lease
        if lease is None:
            return
        if self.watchdog.alive(term, self.clock.now()):
            # Reported silent, then deferred (a promise, halb.ha.hold): it beats again.
            log.info("leader of term %s heartbeats again: no takeover", term)
            self.watchdog.reread()  # a later silence is reported afresh
            return
        value = handover_value(self.node, term, UNRESPONSIVE, self.node)
        backoff = Backoff()
        while True:
            if self._lease != lease:
                return  # our own lease went meanwhile: not ours to revoke theirs
            try:
                ok = await self._put_if_term(term, self.keys.handover, value, lease)
            except _RETRY as exc:
                log.warning("force takeover of term %s: %s; retrying", term, exc)
                await self.clock.sleep(backoff.next())
                continue
            if not ok:
                log.info("force takeover: term %s is already over", term)
                return
            break
        log.warning(
            "leader of term %s sent no heartbeat for %.2fs: revoking its lease %x",
            term,
            self.heartbeat_timeout,
            term.lease_id,
        )
        await self.resign(term.lease_id)

    async def resign(self, lease: int) -> None:
        """Revoke ``lease`` (the leader key and handover requests on it go with it).

        If it is the coordinator's current lease, a new one is granted afterwards. When
        etcd does not answer, retries until the lease would have expired anyway."""
        if self._lease == lease:
            self._drop_lease()
        give_up = self.clock.now() + self._granted_ttl + 1.0
        backoff = Backoff()
        while True:
            try:
                await self._rpc(lambda t: self.client.revoke(lease, timeout=t))
                log.info("revoked lease %x", lease)
                return
            except LeaseNotFound:
                return  # already expired or revoked
            except _RETRY as exc:
                err: BaseException = exc
            if self.clock.now() > give_up:
                log.warning("could not revoke lease %x (%s); it has expired by now", lease, err)
                return
            await self.clock.sleep(backoff.next())

    async def request_handover(self, target: str, term: Term, reason: str = "preempt") -> None:
        """Ask the leader of ``term`` to hand over to ``target``; the request lives on
        our lease, so it vanishes if we die before it is served."""
        lease = self._lease
        if lease is None:
            return
        value = handover_value(target, term, reason, self.node)
        try:
            await self._rpc(
                lambda t: self.client.put(self.keys.handover, value, lease=lease, timeout=t)
            )
            log.info("asked the leader of term %s to hand %s to %s", term, self.keys.group, target)
        except _RETRY as exc:
            # The machine re-arms the preempt timer, so the request will be repeated.
            log.warning("handover request failed: %s", exc)

    async def clear_handover(self) -> None:
        try:
            await self._rpc(lambda t: self.client.delete(self.keys.handover, timeout=t))
        except _RETRY as exc:
            log.warning("could not delete the handover request: %s", exc)

    # -- watch -----------------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        backoff = Backoff()
        while True:
            exc: BaseException | None = None
            try:
                await self._follow(backoff)
            except* _RETRY as group:  # _follow's task group wraps what its watches raise
                exc = group.exceptions[0]
            delay = backoff.next()
            log.warning("watch on %s ended (%s); re-reading in %.2fs", self.keys.group, exc, delay)
            await self.clock.sleep(delay)

    async def _follow(self, backoff: Backoff) -> None:
        """The group's keys, then the drain key (first views in that order), each read
        then watched; returns only by raising."""
        group_seen = asyncio.Event()

        async def group() -> None:
            async for item in read_then_watch(self.client, self.keys.group_prefix, prefix=True):
                self._answered()
                if isinstance(item, Snapshot):
                    self._emit_group_view(item.revision, item.kvs)
                    group_seen.set()
                    backoff.reset()
                else:
                    self._on_event(item)

        async def drain() -> None:
            await group_seen.wait()
            async for item in read_then_watch(self.client, self.keys.drain(self.node)):
                if isinstance(item, Snapshot):
                    self.emit(Drain() if item.kvs else Undrain())
                else:
                    self._on_event(item)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(group(), name=f"watch-group-{self.keys.group}")
            tg.create_task(drain(), name=f"watch-drain-{self.keys.group}")

    def _emit_group_view(self, revision: int, kvs: tuple[KeyValue, ...]) -> None:
        if revision < self._view_revision:
            return  # the watch already delivered something newer
        self._view_revision = revision
        by_key = {kv.key: kv for kv in kvs}
        leader_kv = by_key.get(self.keys.leader)
        handover_kv = by_key.get(self.keys.handover)
        leader = (
            parse_leader(leader_kv.value, leader_kv.lease, leader_kv.create_revision)
            if leader_kv
            else None
        )
        self._observe_leader(leader)
        # A fresh read (after a reconnect, say): judge the leader's heartbeats anew.
        self.watchdog.reread()
        self.emit(LeaderObserved(leader))
        self.emit(HandoverObserved(parse_handover(handover_kv.value) if handover_kv else None))

    async def _reread(self) -> None:
        """Re-read the group's keys (after a new lease: the machine forgot its view)."""
        try:
            group = await self._rpc(
                lambda t: self.client.range(self.keys.group_prefix, prefix=True, timeout=t)
            )
        except _RETRY as exc:
            log.info(
                "re-read of group %s failed (%s); the watch will catch up", self.keys.group, exc
            )
            return
        self._answered()
        self._emit_group_view(group.revision, group.kvs)

    def _on_event(self, ev: WatchEvent) -> None:
        key = ev.kv.key
        put = ev.kind is EventKind.PUT
        revision = ev.revision
        if revision < self._view_revision:
            return  # older than a read already emitted
        if key in (self.keys.leader, self.keys.handover):
            self._view_revision = revision
        if key == self.keys.leader:
            leader = parse_leader(ev.kv.value, ev.kv.lease, ev.kv.create_revision) if put else None
            self._observe_leader(leader)
            self.emit(LeaderObserved(leader))
        elif key == self.keys.handover:
            self.emit(HandoverObserved(parse_handover(ev.kv.value) if put else None))
        elif key == self.keys.heartbeat:
            if put:
                self.watchdog.heartbeat(heartbeat_term(ev.kv.value), revision, self.clock.now())
        elif key == self.keys.drain(self.node):
            self.emit(Drain() if put else Undrain())
