"""The HA state machine for one VIP group on one node: pure ``(state, event) -> actions``.

No I/O and no clock: the coordinator (halb.ha.coord) turns etcd into events, the
runtime (halb.ha.runtime) turns actions into addresses, announcements, sync roles and
timers. Timers are actions too (``ArmTimer`` / ``CancelTimer``), and their firing comes
back as ``TimerFired`` carrying the token it was armed with, so a late fire from a
cancelled timer is recognised and ignored.

Leadership is holding the current term: a node is ACTIVE only while the leader key
carries *its current lease* (``Term.lease_id``); the term (lease id, create revision)
rides on every term-scoped action so the runtime can check it before each VIP add and
each announcement.

States
  INIT         no lease yet (start-up).
  STANDBY      holds a lease, follows the leader (sync client) or waits to campaign.
  CAMPAIGNING  a create-revision transaction on the leader key is in flight.
  ACTIVE       holds the term: VIPs, announcements, sync server.
  FENCED       could not renew the lease in time (or lost it): VIPs removed, lease
               given up; waits for the coordinator to grant a fresh lease.
  DRAINED      operator drain: never campaigns; keeps a lease and follows the leader.
  STOPPING     shutdown: terminal, every later event is ignored.

Preemption is cooperative: a healthy higher-priority standby that has seen a lower
leader for ``preempt_delay`` seconds writes a handover request naming itself; the
leader removes its VIPs and resigns (revokes its lease) only then, so two owners never
overlap. A planned failover (CLI) writes the same request naming another node. While
a handover to another node is pending, the other standbys wait ``handover_timeout``
before campaigning, so the named node wins unless it is gone.

Fast takeover (``fence_wait > 0``): the active heartbeats into etcd and arms its
dataplane's dead-man switch on each success. A standby told that the heartbeats
stopped (``LeaderUnresponsive``) writes a handover request naming itself with reason
``unresponsive`` and revokes the leader's lease (``ForceTakeover``). Everyone who sees
that request remembers the term as *forced*, and nobody campaigns for the vacancy
until ``fence_wait`` after seeing it: by then the old leader's last possible deadline
has passed, so even a frozen leader no longer forwards or answers ARP for the VIP.

Usage::

    m = Machine(MachineConfig(node="lb1", priority=200))
    for action in m.feed(LeaseGranted(lease_id=0x1234)):
        ...   # run it; results come back as further events
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from halb.model import Term

__all__ = [
    "UNRESPONSIVE",
    "Action",
    "AddVips",
    "ArmTimer",
    "Campaign",
    "CampaignLost",
    "CampaignWon",
    "CancelTimer",
    "ClearHandover",
    "DetachVips",
    "Drain",
    "Event",
    "FenceDeadlinePassed",
    "ForceTakeover",
    "GroupState",
    "Handover",
    "HandoverObserved",
    "KeepaliveOk",
    "Leader",
    "LeaderObserved",
    "LeaderUnresponsive",
    "LeaseGranted",
    "LeaseLost",
    "Machine",
    "MachineConfig",
    "PromiseGiven",
    "RefreshVips",
    "RemoveVips",
    "RequestHandover",
    "Resign",
    "Shutdown",
    "StartAnnouncing",
    "StartSyncClient",
    "StartSyncServer",
    "State",
    "StopSyncClient",
    "StopSyncServer",
    "Timer",
    "TimerFired",
    "Undrain",
    "step",
]


class State(enum.StrEnum):
    INIT = "init"
    STANDBY = "standby"
    CAMPAIGNING = "campaigning"
    ACTIVE = "active"
    FENCED = "fenced"
    DRAINED = "drained"
    STOPPING = "stopping"


class Timer(enum.StrEnum):
    PREEMPT = "preempt"
    CAMPAIGN = "campaign"
    # A promise to a holder (halb.ha.hold) binds this node until it fires.
    PROMISE = "promise"


@dataclass(frozen=True, slots=True)
class Leader:
    """What the leader key says: who holds the group, at which priority, which term."""

    holder: str
    priority: int
    term: Term


@dataclass(frozen=True, slots=True)
class Handover:
    """A request that the current leader hand the group to ``target``.

    ``term`` is the leader term the request is addressed to; a request for another
    term is stale and ignored. None addresses whatever term is current (CLI use).
    """

    target: str
    term: Term | None = None
    reason: str = "planned"


@dataclass(frozen=True, slots=True)
class MachineConfig:
    node: str
    priority: int
    preempt: bool = True
    preempt_delay: float = 3.0
    # Wait before campaigning for a vacant group; the agent may skew it by priority
    # rank so the best standby usually wins without a later preemption.
    campaign_delay: float = 0.0
    # How long the other standbys defer to the target of a pending handover.
    handover_timeout: float = 3.0
    # Fast takeover: how long to wait after a forced revoke before campaigning (the
    # old leader's heartbeat deadline plus margins); 0 disables forced takeovers.
    fence_wait: float = 0.0


# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseGranted:
    lease_id: int
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class LeaseLost:
    """etcd says the lease is gone (keepalive answered TTL 0, or TimeToLive -1)."""

    lease_id: int


@dataclass(frozen=True, slots=True)
class KeepaliveOk:
    lease_id: int


@dataclass(frozen=True, slots=True)
class FenceDeadlinePassed:
    """No keepalive succeeded for TTL - margin: the lease may expire any moment."""

    lease_id: int


@dataclass(frozen=True, slots=True)
class LeaderUnresponsive:
    """The leader of ``term`` sent no heartbeat for the heartbeat timeout."""

    term: Term


@dataclass(frozen=True, slots=True)
class LeaderObserved:
    """The leader key as last read or watched; None when the key is absent."""

    leader: Leader | None


@dataclass(frozen=True, slots=True)
class CampaignWon:
    term: Term


@dataclass(frozen=True, slots=True)
class CampaignLost:
    """The key already existed; ``leader`` is its holder (None if it vanished since)."""

    leader: Leader | None


@dataclass(frozen=True, slots=True)
class HandoverObserved:
    handover: Handover | None


@dataclass(frozen=True, slots=True)
class Drain:
    pass


@dataclass(frozen=True, slots=True)
class Undrain:
    pass


@dataclass(frozen=True, slots=True)
class TimerFired:
    timer: Timer
    token: int


@dataclass(frozen=True, slots=True)
class PromiseGiven:
    """This node promised (halb.ha.hold) not to campaign nor force a takeover for the
    next ``duration`` seconds; a later promise extends, never shortens. The runtime
    also feeds one at start-up (a restarted node may have promised and forgotten)."""

    duration: float


@dataclass(frozen=True, slots=True)
class Shutdown:
    """SIGTERM. ``handoff=False`` is a restart in place: VIPs stay with their kernel
    lifetime and the lease is not revoked, so the next agent can resume the term."""

    handoff: bool = True


Event = (
    LeaseGranted
    | LeaseLost
    | KeepaliveOk
    | FenceDeadlinePassed
    | LeaderObserved
    | LeaderUnresponsive
    | CampaignWon
    | CampaignLost
    | HandoverObserved
    | Drain
    | Undrain
    | TimerFired
    | PromiseGiven
    | Shutdown
)


# --- actions --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddVips:
    term: Term


@dataclass(frozen=True, slots=True)
class RefreshVips:
    """A keepalive succeeded: push the VIP lifetimes forward."""

    term: Term


@dataclass(frozen=True, slots=True)
class StartAnnouncing:
    term: Term


@dataclass(frozen=True, slots=True)
class StartSyncServer:
    term: Term


@dataclass(frozen=True, slots=True)
class RemoveVips:
    """End the term: stop announcing, remove the addresses."""

    term: Term


@dataclass(frozen=True, slots=True)
class DetachVips:
    """End the term's tasks but leave the addresses to their kernel lifetime."""

    term: Term


@dataclass(frozen=True, slots=True)
class StopSyncServer:
    term: Term


@dataclass(frozen=True, slots=True)
class StartSyncClient:
    """Follow ``leader`` (restart the client if it followed another term)."""

    leader: Leader


@dataclass(frozen=True, slots=True)
class StopSyncClient:
    pass


@dataclass(frozen=True, slots=True)
class Campaign:
    lease_id: int


@dataclass(frozen=True, slots=True)
class Resign:
    """Revoke the lease: the leader key (and anything else on it) goes with it."""

    lease_id: int


@dataclass(frozen=True, slots=True)
class ForceTakeover:
    """Write a handover request for ``term`` naming this node (reason ``unresponsive``),
    then revoke the term's lease."""

    term: Term


@dataclass(frozen=True, slots=True)
class RequestHandover:
    target: str
    term: Term
    reason: str = "preempt"


@dataclass(frozen=True, slots=True)
class ClearHandover:
    pass


@dataclass(frozen=True, slots=True)
class ArmTimer:
    """(Re)arm ``timer`` to fire ``TimerFired(timer, token)`` after ``delay`` seconds."""

    timer: Timer
    delay: float
    token: int


@dataclass(frozen=True, slots=True)
class CancelTimer:
    timer: Timer


Action = (
    AddVips
    | RefreshVips
    | StartAnnouncing
    | StartSyncServer
    | RemoveVips
    | DetachVips
    | StopSyncServer
    | StartSyncClient
    | StopSyncClient
    | Campaign
    | Resign
    | ForceTakeover
    | RequestHandover
    | ClearHandover
    | ArmTimer
    | CancelTimer
)


# --- state ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupState:
    state: State = State.INIT
    lease: int | None = None
    # The term held; set exactly when state is ACTIVE.
    term: Term | None = None
    leader: Leader | None = None
    # Whether the leader key was read since start-up; no campaign before that.
    leader_known: bool = False
    # The last term seen held by anyone, to tell a handover for it from a stale one.
    last_term: Term | None = None
    handover: Handover | None = None
    drained: bool = False
    # The leader the sync client was told to follow.
    following: Leader | None = None
    # A term whose lease was revoked for missing heartbeats: no campaign for the
    # vacancy it leaves before ``fence_wait``.
    forced: Term | None = None
    # Bound by a promise to a holder (Timer.PROMISE armed): no campaign, no forced
    # takeover, no preemption until it runs out.
    promised: bool = False
    # A silent leader reported while promised: acted on once the promise runs out.
    unresponsive: Term | None = None
    # Armed timers: kind -> (token, delay).
    timers: tuple[tuple[Timer, int, float], ...] = ()
    next_token: int = 1

    def timer(self, kind: Timer) -> tuple[int, float] | None:
        for k, token, delay in self.timers:
            if k is kind:
                return token, delay
        return None


@dataclass
class _Step:
    st: GroupState
    actions: list[Action] = field(default_factory=list)

    def set(self, **changes: object) -> None:
        self.st = replace(self.st, **changes)  # type: ignore[arg-type]

    def arm(self, kind: Timer, delay: float) -> None:
        token = self.st.next_token
        rest = tuple(t for t in self.st.timers if t[0] is not kind)
        self.set(timers=(*rest, (kind, token, delay)), next_token=token + 1)
        self.actions.append(ArmTimer(kind, delay, token))

    def resign(self, lease_id: int) -> None:
        self.actions.append(Resign(lease_id))
        if lease_id == self.st.lease:
            self.set(lease=None)
        leader = self.st.leader
        if leader is not None and leader.term.lease_id == lease_id:
            # The revoke deletes the key: forget it and wait for the watch to confirm.
            self.set(leader=None, leader_known=False)

    def cancel(self, kind: Timer) -> None:
        if self.st.timer(kind) is not None:
            self.set(timers=tuple(t for t in self.st.timers if t[0] is not kind))
            self.actions.append(CancelTimer(kind))


def step(cfg: MachineConfig, st: GroupState, ev: Event) -> tuple[GroupState, list[Action]]:
    """Apply one event; return the new state and the actions to run, in order."""
    if st.state is State.STOPPING:
        return st, []
    s = _Step(st)
    match ev:
        case Shutdown(handoff=handoff):
            _shutdown(s, handoff)
            return s.st, s.actions
        case LeaseGranted(lease_id=lease_id):
            _lease_granted(cfg, s, lease_id)
        case LeaseLost(lease_id=lease_id) | FenceDeadlinePassed(lease_id=lease_id):
            if lease_id != s.st.lease:
                return st, []
            _fence(s, lost=isinstance(ev, LeaseLost))
        case KeepaliveOk(lease_id=lease_id):
            if s.st.state is State.ACTIVE and s.st.term and lease_id == s.st.lease:
                return st, [RefreshVips(s.st.term)]
            return st, []
        case LeaderObserved(leader=leader):
            _leader_observed(cfg, s, leader)
        case LeaderUnresponsive(term=term):
            _leader_unresponsive(cfg, s, term)
        case PromiseGiven(duration=duration):
            if duration > 0:
                s.set(promised=True)
                s.arm(Timer.PROMISE, duration)
        case CampaignWon(term=term):
            _campaign_won(cfg, s, term)
        case CampaignLost(leader=leader):
            if s.st.state is State.CAMPAIGNING:
                s.set(state=State.STANDBY)
            if s.st.state is not State.ACTIVE:
                _leader_observed(cfg, s, leader)
        case HandoverObserved(handover=handover):
            _handover_observed(cfg, s, handover)
        case Drain():
            s.set(drained=True)
            if s.st.state is State.ACTIVE:
                _leave_active(s, resign=True)
            if s.st.state in (State.STANDBY, State.CAMPAIGNING, State.ACTIVE):
                # An in-flight campaign that wins anyway is resigned in _campaign_won.
                s.set(state=State.DRAINED)
        case Undrain():
            s.set(drained=False)
            if s.st.state is State.DRAINED:
                s.set(state=State.STANDBY if s.st.lease is not None else State.INIT)
        case TimerFired(timer=kind, token=token):
            armed = s.st.timer(kind)
            if armed is None or armed[0] != token:
                return st, []  # a late fire of a cancelled or re-armed timer
            s.set(timers=tuple(t for t in s.st.timers if t[0] is not kind))
            if kind is Timer.PREEMPT:
                _preempt_fired(cfg, s)
            elif kind is Timer.PROMISE:
                pending = s.st.unresponsive
                s.set(promised=False, unresponsive=None)
                if pending is not None:
                    _leader_unresponsive(cfg, s, pending)
            else:
                _settle(cfg, s, campaign_now=True)
                return s.st, s.actions
    _settle(cfg, s)
    return s.st, s.actions


# --- transitions ----------------------------------------------------------------------


def _enter_active(s: _Step, term: Term) -> None:
    s.cancel(Timer.PREEMPT)
    s.cancel(Timer.CAMPAIGN)
    # State before address: the sync client hands its flows to the dataplane before
    # the VIP moves here (the runtime awaits it before AddVips).
    if s.st.following is not None:
        s.actions.append(StopSyncClient())
        s.set(following=None)
    s.set(state=State.ACTIVE, term=term, last_term=term)
    s.actions += [AddVips(term), StartSyncServer(term), StartAnnouncing(term)]
    if s.st.handover is not None:
        # Whoever wins consumes the request, whether or not it was the target.
        s.actions.append(ClearHandover())
        s.set(handover=None)


def _leave_active(s: _Step, *, resign: bool, keep_vips: bool = False) -> None:
    term = s.st.term
    assert term is not None
    s.actions.append(DetachVips(term) if keep_vips else RemoveVips(term))
    s.actions.append(StopSyncServer(term))
    s.set(state=State.STANDBY, term=None)
    if resign and s.st.lease is not None:
        s.resign(s.st.lease)


def _shutdown(s: _Step, handoff: bool) -> None:
    s.cancel(Timer.PREEMPT)
    s.cancel(Timer.CAMPAIGN)
    if s.st.state is State.ACTIVE:
        _leave_active(s, resign=handoff, keep_vips=not handoff)
    if s.st.following is not None:
        s.actions.append(StopSyncClient())
        s.set(following=None)
    if handoff and s.st.lease is not None:
        s.resign(s.st.lease)
    s.set(state=State.STOPPING)


def _lease_granted(cfg: MachineConfig, s: _Step, lease_id: int) -> None:
    old = s.st.lease
    if old == lease_id:
        return
    if s.st.state is State.ACTIVE:
        # A new lease while holding a term on the old one cannot keep the term.
        _leave_active(s, resign=True)
    elif old is not None:
        s.resign(old)
    s.set(lease=lease_id)
    if s.st.state in (State.INIT, State.FENCED, State.CAMPAIGNING):
        s.set(state=State.DRAINED if s.st.drained else State.STANDBY)
    if s.st.leader_known:
        # The key may already carry this lease (resumed after a restart).
        _leader_observed(cfg, s, s.st.leader)


def _fence(s: _Step, *, lost: bool) -> None:
    if s.st.state is State.ACTIVE:
        _leave_active(s, resign=False)
    lease = s.st.lease
    assert lease is not None
    if not lost:
        # Best effort: if etcd answers again before the TTL runs out, the old term
        # must not linger; the coordinator grants a fresh lease after this.
        s.resign(lease)
    # Our view of the key may be stale from here on; wait for a fresh read.
    s.set(state=State.FENCED, lease=None, leader_known=False)


def _leader_observed(cfg: MachineConfig, s: _Step, leader: Leader | None) -> None:
    s.set(leader=leader, leader_known=True)
    if leader is not None:
        s.set(last_term=leader.term)
        if s.st.forced is not None and leader.term != s.st.forced:
            s.set(forced=None)  # a new term: the forced one is history
    st = s.st
    if st.state is State.ACTIVE:
        if leader is not None and leader.term == st.term:
            return
        # The key was deleted or now names another term: the term is over.
        _leave_active(s, resign=False)
        st = s.st
    if leader is None:
        return
    mine = st.lease is not None and leader.term.lease_id == st.lease
    if mine and st.state in (State.STANDBY, State.CAMPAIGNING):
        # Our own lease holds the key (campaign result seen first on the watch, or a
        # resumed lease after restart): that is the term.
        _enter_active(s, leader.term)
    elif mine and st.state is State.DRAINED:
        s.resign(leader.term.lease_id)
    elif leader.holder == cfg.node and not mine and st.lease is not None:
        # A key left by an earlier run of this node (we hold a different lease): its
        # VIPs were reconciled away at start-up, so release it instead of waiting out
        # its TTL. Not before our own lease is known: it may be that very lease resumed.
        s.resign(leader.term.lease_id)


def _leader_unresponsive(cfg: MachineConfig, s: _Step, term: Term) -> None:
    st = s.st
    leader = st.leader
    if (
        cfg.fence_wait <= 0
        or st.state is not State.STANDBY
        or st.lease is None
        or st.drained
        or leader is None
        or leader.term != term
        or leader.holder == cfg.node
    ):
        return
    if st.promised:
        s.set(unresponsive=term)  # bound by a promise: act once it runs out
        return
    # Not yet ``forced``: that is set by the reason the coordinator writes before it
    # revokes (everyone sees it, and it is not set if the revoke never happens).
    s.actions.append(ForceTakeover(term))


def _campaign_won(cfg: MachineConfig, s: _Step, term: Term) -> None:
    st = s.st
    if st.state is State.ACTIVE and st.term == term:
        return
    current = st.lease is not None and term.lease_id == st.lease
    if current and st.state in (State.CAMPAIGNING, State.STANDBY) and not st.drained:
        s.set(leader=Leader(cfg.node, cfg.priority, term), leader_known=True)
        _enter_active(s, term)
        return
    # Won with a lease we no longer stand behind (drained, fenced, replaced): give it up.
    s.resign(term.lease_id)
    if st.state is State.CAMPAIGNING:
        s.set(state=State.DRAINED if st.drained else State.STANDBY)


UNRESPONSIVE = "unresponsive"


def _handover_live(h: Handover | None, term: Term | None) -> bool:
    return h is not None and (h.term is None or h.term == term)


def _handover_observed(cfg: MachineConfig, s: _Step, h: Handover | None) -> None:
    s.set(handover=h)
    if h is not None and h.reason == UNRESPONSIVE and h.term is not None:
        leader = s.st.leader
        if h.term == s.st.last_term or (leader is not None and leader.term == h.term):
            s.set(forced=h.term)
    st = s.st
    if st.state is not State.ACTIVE or h is None:
        return
    if h.target != cfg.node and _handover_live(h, st.term):
        _leave_active(s, resign=True)
    else:
        # Addressed to us or to an older term: nothing to hand over, drop it.
        s.actions.append(ClearHandover())


def _preempt_fired(cfg: MachineConfig, s: _Step) -> None:
    if _should_preempt(cfg, s.st):
        leader = s.st.leader
        assert leader is not None
        s.actions.append(RequestHandover(cfg.node, leader.term))


def _should_preempt(cfg: MachineConfig, st: GroupState) -> bool:
    leader = st.leader
    return (
        cfg.preempt
        and not st.promised
        and st.state is State.STANDBY
        and st.lease is not None
        and not st.drained
        and leader is not None
        and leader.holder != cfg.node
        and leader.priority < cfg.priority
        # Our own request is already on its way to this leader.
        and not (
            st.handover is not None
            and st.handover.target == cfg.node
            and _handover_live(st.handover, leader.term)
        )
    )


def _settle(cfg: MachineConfig, s: _Step, *, campaign_now: bool = False) -> None:
    """Bring sync-client, preempt timer and campaign in line with the facts."""
    st = s.st
    # Sync client follows the leader whenever we are not the leader ourselves.
    want = st.leader
    if want is not None and (want.holder == cfg.node or st.state is State.ACTIVE):
        want = None
    if st.state is State.STOPPING:
        want = None
    if want != st.following:
        s.actions.append(StartSyncClient(want) if want is not None else StopSyncClient())
        s.set(following=want)

    if _should_preempt(cfg, st):
        if st.timer(Timer.PREEMPT) is None:
            s.arm(Timer.PREEMPT, cfg.preempt_delay)
    else:
        s.cancel(Timer.PREEMPT)

    st = s.st
    eligible = (
        st.state is State.STANDBY
        and st.lease is not None
        and st.leader_known
        and st.leader is None
        and not st.drained
        and not st.promised
    )
    if not eligible:
        s.cancel(Timer.CAMPAIGN)
        return
    h = st.handover
    if h is not None and _handover_live(h, st.last_term):
        delay = 0.0 if h.target == cfg.node else cfg.handover_timeout
    else:
        delay = cfg.campaign_delay
    if st.forced is not None and st.forced == st.last_term:
        # The old leader may be frozen, not gone: outwait its dead-man deadline.
        delay = max(delay, cfg.fence_wait)
    if campaign_now or delay <= 0:
        s.cancel(Timer.CAMPAIGN)
        assert st.lease is not None
        s.actions.append(Campaign(st.lease))
        s.set(state=State.CAMPAIGNING)
        return
    armed = st.timer(Timer.CAMPAIGN)
    if armed is None or armed[1] != delay:
        s.arm(Timer.CAMPAIGN, delay)


class Machine:
    """Holds one group's state; ``feed`` applies an event and returns the actions."""

    def __init__(self, cfg: MachineConfig, state: GroupState | None = None) -> None:
        self.cfg = cfg
        self.st = state if state is not None else GroupState()

    @property
    def state(self) -> State:
        return self.st.state

    @property
    def term(self) -> Term | None:
        """The term held now, or None: what every VIP add and announcement checks."""
        return self.st.term if self.st.state is State.ACTIVE else None

    def holds(self, term: Term) -> bool:
        return self.term == term

    @property
    def contending(self) -> bool:
        """Holding the group or campaigning for it: such a node cannot promise a
        holder not to win it (halb.ha.hold)."""
        return self.st.state in (State.ACTIVE, State.CAMPAIGNING)

    def feed(self, ev: Event) -> Sequence[Action]:
        self.st, actions = step(self.cfg, self.st, ev)
        return actions
