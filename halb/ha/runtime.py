"""Runs one VIP group on one node: coordinator events -> machine -> actions.

One asyncio task per *term*: when the machine enters ACTIVE(term) the runtime starts
a task that adds the VIPs (with a kernel lifetime), runs the sync-server role and
announces the VIPs ``announce.count`` times every ``announce.interval`` seconds (then
every ``announce.refresh`` seconds for the rest of the term),
re-checking that the machine still holds the term before every add and every send.
Leaving the term cancels that task; its ``finally`` removes the VIPs (or, on a restart
in place, leaves them to their lifetime). Nothing else ever adds a VIP: a config change
goes through ``set_addresses``, which applies it under the same checks, and every address
a term added is removed when it ends.

Everything with I/O is injected, so the runtime is unit-tested with fakes and
integration-tested with real etcd and a real namespace:

- ``coord``: halb.ha.coord.Coordinator (or a fake with the same methods).
- ``vips``: a VipPort, e.g. halb.net.vip.InterfaceVips.
- ``sync``: SyncRoles, whose ``serve(group, term)`` / ``follow(group, leader)`` run
  until cancelled (``name`` is the group)
  (a follower's cancellation must return only once its flows are in the dataplane:
  the runtime awaits it before adding VIPs).
- ``dataplane``: its dead-man switch is armed to the fence deadline on every keepalive
  and every heartbeat, and disarmed when the term ends cleanly (a frozen or killed
  agent leaves it armed, so its node stops forwarding and answering ARP for the VIP).
  With several groups on one node, pass each a ``DeadlineMux`` port.

Coordinator outage (``hold``, with a ``promise_port``): the term task also runs the
holder's side of the peer-witnessed hold (halb.ha.holding.TermHold) and ``promise`` is
the peer's side: it binds the machine (PromiseGiven) unless it is contending, in one
step of the event loop so no campaign can start between the check and the promise.

With heartbeats (fast takeover) the term task first runs the coordinator's heartbeat
loop and adds VIPs only once a heartbeat of the term has succeeded.

Usage (the agent, one per VIP group)::

    async with InterfaceVips(node.interface) as port:
        rt = GroupRuntime(machine, coord=None, vips=port, addresses=[...],
                          announce_count=3, announce_interval=0.2, lifetime=1)
        rt.coord = Coordinator(client, keys, node, prio, ttl=2, emit=rt.emit)
        task = asyncio.create_task(rt.run())
        ...
        await rt.stop(handoff=True)   # on SIGTERM; run() returns after cleanup
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from halb.aio import cancel_and_wait
from halb.ha.clock import Clock, MonotonicClock
from halb.ha.holding import HoldStatus, PromisePort, TermHold
from halb.ha.machine import (
    Action,
    AddVips,
    ArmTimer,
    Campaign,
    CancelTimer,
    ClearHandover,
    DetachVips,
    Event,
    ForceTakeover,
    Leader,
    Machine,
    PromiseGiven,
    RefreshVips,
    RemoveVips,
    RequestHandover,
    Resign,
    Shutdown,
    StartAnnouncing,
    StartSyncClient,
    StartSyncServer,
    State,
    StopSyncClient,
    StopSyncServer,
    Timer,
    TimerFired,
)
from halb.model import IPAddress, Term
from halb.timing import HoldPolicy

__all__ = ["CoordPort", "DeadlineSink", "GroupRuntime", "SyncRoles", "VipPort"]

log = logging.getLogger(__name__)


class VipPort(Protocol):
    async def add(self, vip: IPAddress, lifetime: int | None) -> None: ...

    async def remove(self, vip: IPAddress) -> bool: ...

    def announce(self, vip: IPAddress) -> int: ...


class DeadlineSink(Protocol):
    def set_deadline(self, monotonic_ns: int | None) -> None: ...


class CoordPort(Protocol):
    @property
    def fence_deadline(self) -> float | None: ...

    @property
    def heartbeats(self) -> bool: ...

    def ready(self, term: Term) -> bool: ...

    async def heartbeat(self, term: Term, ready: Callable[[], None] | None = None) -> None: ...

    async def force_takeover(self, term: Term) -> None: ...

    async def run(self) -> None: ...

    async def campaign(self, lease: int) -> None: ...

    async def resign(self, lease: int) -> None: ...

    async def request_handover(self, target: str, term: Term, reason: str = ...) -> None: ...

    async def clear_handover(self) -> None: ...

    def retire(self) -> None: ...

    @property
    def usual_fence_deadline(self) -> float | None: ...

    def hold(self, until: float | None) -> None: ...

    def etcd_quiet_for(self) -> float: ...


class SyncRoles(Protocol):
    """The node's flow-sync roles, shared by its groups; each call names its group."""

    async def serve(self, group: str, term: Term) -> None:
        """Serve ``group``'s flows under ``term`` until cancelled (the node's one server
        keeps serving the other groups it holds)."""
        ...

    async def follow(self, group: str, leader: Leader) -> None:
        """Install ``group``'s flows from ``leader`` until cancelled; on cancellation,
        return only once every received flow is in the dataplane."""
        ...

    def caught_up(self, group: str, leader: Leader) -> bool:
        """Whether ``group``'s flows of ``leader`` are all here (snapshot done, stream
        up)."""
        ...


class _TermTask:
    def __init__(self, term: Term) -> None:
        self.term = term
        self.serve = False
        self.announce = False
        self.keep_vips = False
        # Set once the term may hold VIPs (after its first heartbeat, if any): from
        # then on the addresses follow ``GroupRuntime.addresses``.
        self.holding = False
        # Every address this term added (or was adding when cancelled): all of them
        # go when the term ends.
        self.added: list[IPAddress] = []
        self.task: asyncio.Task[None] | None = None


class GroupRuntime:
    def __init__(
        self,
        machine: Machine,
        coord: CoordPort | None,
        vips: VipPort,
        *,
        addresses: Sequence[IPAddress],
        announce_count: int = 3,
        announce_interval: float = 0.2,
        announce_refresh: float = 0.0,
        lifetime: int | None = None,
        clock: Clock | None = None,
        sync: SyncRoles | None = None,
        dataplane: DeadlineSink | None = None,
        name: str = "group",
        preempt_sync_timeout: float = 30.0,
        hold: HoldPolicy | None = None,
        peers: Sequence[str] = (),
        promise_port: PromisePort | None = None,
    ) -> None:
        self.machine = machine
        self.coord = coord
        self.vips = vips
        self.addresses = list(addresses)
        self.announce_count = announce_count
        self.announce_interval = announce_interval
        self.announce_refresh = announce_refresh
        self.lifetime = lifetime
        self.clock = clock or MonotonicClock()
        self.sync = sync
        self.dataplane = dataplane
        self.name = name
        # A preemption waits for the flow sync from the leader, at most this long.
        self.preempt_sync_timeout = preempt_sync_timeout
        self._preempt_deferred_since: float | None = None
        # The peer-witnessed hold (halb.ha.hold): its policy, the group's other members
        # and the channel to them; None / no port: an outage fences.
        self.hold = hold
        self.peers = list(peers)
        self.promise_port = promise_port
        self.hold_status = HoldStatus()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.announcements = 0  # rounds sent, for tests and metrics
        self.refreshes = 0  # refresh rounds sent
        self._term: _TermTask | None = None
        self._follow: asyncio.Task[None] | None = None
        self._timers: dict[Timer, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._state_changed = asyncio.Condition()
        # VIP adds and removes of the term and of set_addresses, one at a time.
        self._vip_lock = asyncio.Lock()

    # -- inputs --------------------------------------------------------------------------

    def emit(self, ev: Event) -> None:
        """Queue an event (the coordinator's ``emit``); never blocks."""
        self.events.put_nowait(ev)

    async def set_addresses(self, addresses: Sequence[IPAddress]) -> None:
        """A new VIP list (config reload). A term that holds its VIPs adds the new ones
        under the same ownership checks as its start and removes the dropped ones; a
        term still starting picks the list up itself. The only way to change VIPs."""
        self.addresses = list(addresses)
        tt = self._term
        if tt is not None and tt.holding and tt.task is not None and not tt.task.done():
            for vip in await self._reconcile_vips(tt):
                self.vips.announce(vip)

    def promise(self, duration: float) -> bool:
        """Peer side of the hold: bind this node not to campaign (nor force a takeover)
        for ``duration`` seconds, unless it holds or is campaigning for the group.
        Checked and fed in one step, so nothing can start a campaign in between."""
        if self.machine.contending:
            return False
        for action in self.machine.feed(PromiseGiven(duration)):
            self._timer_action(action)
        return True

    async def stop(self, *, handoff: bool = True) -> None:
        """SIGTERM: hand off (or detach for a restart in place); ``run`` then returns."""
        self.emit(Shutdown(handoff=handoff))

    async def wait_for(self, state: State, timeout: float) -> None:
        """Wait until the machine is in ``state`` (tests, drills)."""
        async with asyncio.timeout(timeout), self._state_changed:
            await self._state_changed.wait_for(lambda: self.machine.state is state)

    # -- main loop -----------------------------------------------------------------------

    async def run(self) -> None:
        assert self.coord is not None, "set runtime.coord before run()"
        coord_task = asyncio.create_task(self.coord.run(), name=f"coord-{self.name}")
        try:
            while True:
                get = asyncio.ensure_future(self.events.get())
                done, _ = await asyncio.wait({get, coord_task}, return_when="FIRST_COMPLETED")
                if get not in done:
                    get.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await get
                    coord_task.result()  # raises what killed the coordinator
                    raise RuntimeError("coordinator stopped")
                await self._handle(get.result())
                if self.machine.state is State.STOPPING:
                    break
            # Let the last resign reach etcd, bounded.
            if self._background:
                await asyncio.wait(self._background, timeout=2.0)
        finally:
            coord_task.cancel()
            await self._cleanup()
            # Bounded: an etcd call stuck in a dead connection must not keep the agent
            # (or a hand-over) from finishing.
            done, _ = await asyncio.wait({coord_task}, timeout=5.0)
            if coord_task in done and not coord_task.cancelled():
                coord_task.exception()  # retrieved; what killed it was raised above
            elif not done:
                log.warning("%s: the coordinator did not stop within 5 s", self.name)

    async def _handle(self, ev: Event) -> None:
        if isinstance(ev, Shutdown) and self.coord is not None:
            self.coord.retire()
        before = self.machine.st
        actions = self.machine.feed(ev)
        after = self.machine.st
        if before.state is not after.state or before.term != after.term:
            log.info(
                "%s: %s -> %s on %s (term %s)",
                self.name,
                before.state,
                after.state,
                type(ev).__name__,
                after.term,
            )
        for action in actions:
            await self._do(action)
        async with self._state_changed:
            self._state_changed.notify_all()

    async def _do(self, a: Action) -> None:
        match a:
            case AddVips(term=term):
                await self._end_term()
                self._term = _TermTask(term)
                self._term.task = asyncio.create_task(self._run_term(self._term))
            case StartSyncServer(term=term):
                if self._term and self._term.term == term:
                    self._term.serve = True
            case StartAnnouncing(term=term):
                if self._term and self._term.term == term:
                    self._term.announce = True
            case RefreshVips(term=term):
                await self._refresh(term)
            case RemoveVips(term=term) | DetachVips(term=term):
                if self._term and self._term.term == term:
                    self._term.keep_vips = isinstance(a, DetachVips)
                    await self._end_term()
            case StopSyncServer():
                pass  # the server runs inside the term task and ended with it
            case StartSyncClient(leader=leader):
                await self._stop_follow()
                if self.sync is not None:
                    self._follow = asyncio.create_task(self.sync.follow(self.name, leader))
            case StopSyncClient():
                await self._stop_follow()
            case Campaign(lease_id=lease):
                self._spawn(self._coord().campaign(lease))
            case Resign(lease_id=lease):
                self._spawn(self._coord().resign(lease))
            case ForceTakeover(term=term):
                self._spawn(self._coord().force_takeover(term))
            case RequestHandover(target=target, term=term, reason=reason):
                if reason == "preempt" and not self._synced_for_preempt():
                    return  # the machine re-arms its preempt timer and asks again
                self._spawn(self._coord().request_handover(target, term, reason))
            case ClearHandover():
                self._spawn(self._coord().clear_handover())
            case ArmTimer() | CancelTimer():
                self._timer_action(a)

    def _timer_action(self, a: Action) -> None:
        match a:
            case ArmTimer(timer=kind, delay=delay, token=token):
                self._cancel_timer(kind)
                self._timers[kind] = asyncio.create_task(self._timer(kind, delay, token))
            case CancelTimer(timer=kind):
                self._cancel_timer(kind)
            case _:
                raise AssertionError(f"not a timer action: {a}")

    def _coord(self) -> CoordPort:
        assert self.coord is not None
        return self.coord

    # -- the term task -------------------------------------------------------------------

    async def _run_term(self, tt: _TermTask) -> None:
        term = tt.term
        try:
            async with asyncio.TaskGroup() as tg:
                coord = self.coord
                if coord is not None and coord.heartbeats:
                    beating = asyncio.Event()

                    def beat() -> None:
                        self._arm_deadline()
                        beating.set()

                    tg.create_task(coord.heartbeat(term, beat))
                    # A won campaign may already have been revoked by a standby that
                    # thought us dead: only a heartbeat of this term proves otherwise.
                    await beating.wait()
                if not self._owns(term):
                    return
                tt.holding = True
                await self._reconcile_vips(tt)
                if not self._owns(term):
                    return
                self._arm_deadline()
                log.info("%s: term %s holds %s", self.name, term, ", ".join(map(str, tt.added)))
                if tt.serve and self.sync is not None:
                    tg.create_task(self.sync.serve(self.name, term))
                if tt.announce:
                    tg.create_task(self._announce(tt))
                if self.hold is not None and self.promise_port is not None and coord:
                    tg.create_task(self._term_hold(term, coord, self.hold, self.promise_port))
                # The term lasts until the machine ends it (cancellation).
                await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: term %s task failed", self.name, term)
        finally:
            tt.holding = False
            if not tt.keep_vips:
                # After any add in flight (set_addresses) has landed, so it goes too.
                async with self._vip_lock:
                    for vip in tt.added:
                        try:
                            await self.vips.remove(vip)
                        except Exception:
                            log.exception("%s: could not remove VIP %s", self.name, vip)
                # A clean end: this node is a hot standby now and may keep forwarding
                # stray packets for the VIP (clients whose ARP still names it).
                if self.dataplane is not None:
                    self.dataplane.set_deadline(None)
                log.info("%s: term %s over, VIPs removed", self.name, term)
            else:
                log.info("%s: term %s detached, VIPs left to their lifetime", self.name, term)

    async def _term_hold(
        self, term: Term, coord: CoordPort, policy: HoldPolicy, port: PromisePort
    ) -> None:
        await TermHold(
            group=self.name,
            term=term,
            policy=policy,
            peers=self.peers,
            port=port,
            coord=coord,
            clock=self.clock,
            refresh=lambda: self._refresh(term),
            status=self.hold_status,
        ).run()

    async def _reconcile_vips(self, tt: _TermTask) -> list[IPAddress]:
        """Make the term hold exactly ``self.addresses``: each add only while it owns
        the term (checked before every add). Returns the addresses added."""
        new: list[IPAddress] = []
        async with self._vip_lock:
            for vip in [v for v in tt.added if v not in self.addresses]:
                tt.added.remove(vip)
                await self.vips.remove(vip)
                log.info("%s: term %s no longer holds %s", self.name, tt.term, vip)
            for vip in self.addresses:
                if vip in tt.added:
                    continue
                if not (tt.holding and self._owns(tt.term)):
                    break
                # Listed before the add: a cancellation mid-add still removes it.
                tt.added.append(vip)
                await self.vips.add(vip, self.lifetime)
                new.append(vip)
        return new

    async def _announce(self, tt: _TermTask) -> None:
        term = tt.term
        for i in range(self.announce_count):
            if not self._owns(term):
                log.info("%s: lost term %s, announcements stop", self.name, term)
                return
            for vip in list(tt.added):
                self.vips.announce(vip)
            self.announcements += 1
            if i + 1 < self.announce_count:
                await self.clock.sleep(self.announce_interval)
        # Refresh for the rest of the term, ownership checked before every round.
        while self.announce_refresh > 0:
            await self.clock.sleep(self.announce_refresh)
            if not self._owns(term):
                log.info("%s: lost term %s, refresh announcements stop", self.name, term)
                return
            for vip in list(tt.added):
                self.vips.announce(vip)
            self.refreshes += 1

    async def _refresh(self, term: Term) -> None:
        tt = self._term
        if tt is None or tt.term != term or tt.task is None or tt.task.done():
            return
        if not self._owns(term):
            return
        if self.lifetime is not None:
            async with self._vip_lock:
                for vip in list(tt.added):
                    await self.vips.add(vip, self.lifetime)
        self._arm_deadline()

    def _synced_for_preempt(self) -> bool:
        """A preemption is planned: take the group only once every flow of the leader
        is here, so its connections survive the move (bounded, so a broken sync does
        not block preemption for ever)."""
        leader = self.machine.st.leader
        if self.sync is None or leader is None or self.sync.caught_up(self.name, leader):
            self._preempt_deferred_since = None
            return True
        now = self.clock.now()
        if self._preempt_deferred_since is None:
            self._preempt_deferred_since = now
            log.info(
                "%s: preemption of %s deferred: flow sync from it is not complete",
                self.name,
                leader.holder,
            )
            return False
        if now - self._preempt_deferred_since >= self.preempt_sync_timeout:
            log.warning(
                "%s: flow sync from %s still incomplete after %.0fs: preempting anyway",
                self.name,
                leader.holder,
                now - self._preempt_deferred_since,
            )
            self._preempt_deferred_since = None
            return True
        return False

    def _owns(self, term: Term) -> bool:
        """Holding the term *and* inside the fence deadline. A process frozen past its
        deadline (SIGSTOP, a stalled host) resumes before its machine has been told the
        term is over: it must not announce or re-add a VIP on the strength of that
        stale belief."""
        if not self.machine.holds(term):
            return False
        if self.coord is None:
            return True
        if not self.coord.ready(term):
            return False
        # No deadline means no lease: the coordinator has just fenced (dropped the
        # lease) and the machine has not yet been told. Not owning, then.
        deadline = self.coord.fence_deadline
        return deadline is not None and self.clock.now() < deadline

    def _arm_deadline(self) -> None:
        if self.dataplane is None or self.coord is None:
            return
        deadline = self.coord.fence_deadline
        if deadline is not None:
            self.dataplane.set_deadline(int(deadline * 1e9))

    async def _end_term(self) -> None:
        tt, self._term = self._term, None
        if tt is None or tt.task is None:
            return
        tt.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tt.task

    # -- helpers -------------------------------------------------------------------------

    async def _stop_follow(self) -> None:
        task, self._follow = self._follow, None
        # Sync is a helper of the term, never a reason to lose the election: logged.
        await cancel_and_wait(task, log, "%s: the sync client failed", self.name)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: coordinator action failed", self.name, exc_info=task.exception())

    async def _timer(self, kind: Timer, delay: float, token: int) -> None:
        await self.clock.sleep(delay)
        self._timers.pop(kind, None)
        self.emit(TimerFired(kind, token))

    def _cancel_timer(self, kind: Timer) -> None:
        task = self._timers.pop(kind, None)
        if task is not None:
            task.cancel()

    async def _cleanup(self) -> None:
        for t in list(self._timers.values()) + list(self._background):
            t.cancel()
        pending = list(self._timers.values()) + list(self._background)
        self._timers.clear()
        await self._end_term()
        await self._stop_follow()
        if pending:
            _, late = await asyncio.wait(pending, timeout=5.0)
            if late:
                log.warning("%s: %d background tasks did not stop within 5 s", self.name, len(late))
