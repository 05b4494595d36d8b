"""The HA state machine, driven event by event (pure: no etcd, no clock)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest

from halb.ha.machine import (
    UNRESPONSIVE,
    Action,
    AddVips,
    ArmTimer,
    Campaign,
    CampaignLost,
    CampaignWon,
    CancelTimer,
    ClearHandover,
    DetachVips,
    Drain,
    Event,
    FenceDeadlinePassed,
    ForceTakeover,
    GroupState,
    Handover,
    HandoverObserved,
    KeepaliveOk,
    Leader,
    LeaderObserved,
    LeaderUnresponsive,
    LeaseGranted,
    LeaseLost,
    Machine,
    MachineConfig,
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
    Undrain,
    step,
)
from halb.model import Term

pytestmark = pytest.mark.unit

ME = "lb1"
LEASE = 0x100
T_ME = Term(LEASE, 10)
T_B = Term(0x200, 11)
T_C = Term(0x300, 12)
B_LOW = Leader("lb2", 50, T_B)
B_HIGH = Leader("lb2", 250, T_B)
C_LOW = Leader("lb3", 40, T_C)
ME_LEADER = Leader(ME, 100, T_ME)


def machine(**kw: object) -> Machine:
    cfg = MachineConfig(node=ME, priority=100, **kw)  # type: ignore[arg-type]
    return Machine(cfg)


def st(m: Machine) -> State:
    # A call, so mypy does not narrow the state across feeds.
    return m.state


def feed(m: Machine, *events: Event) -> list[Action]:
    out: list[Action] = []
    for e in events:
        out += m.feed(e)
    return out


def active(m: Machine) -> list[Action]:
    """Bring m to ACTIVE(T_ME) via an uncontested campaign."""
    a = feed(m, LeaseGranted(LEASE), LeaderObserved(None))
    assert a == [Campaign(LEASE)]
    assert st(m) is State.CAMPAIGNING
    a = feed(m, CampaignWon(T_ME))
    assert st(m) is State.ACTIVE
    return a


def standby_following(m: Machine, leader: Leader) -> list[Action]:
    a = feed(m, LeaseGranted(LEASE), LeaderObserved(leader))
    assert st(m) is State.STANDBY
    return a


def timers(actions: Sequence[Action]) -> list[ArmTimer]:
    return [a for a in actions if isinstance(a, ArmTimer)]


# --- election ----------------------------------------------------------------------


def test_init_waits_for_lease_and_leader_view() -> None:
    m = machine()
    assert feed(m, LeaderObserved(None)) == []
    assert st(m) is State.INIT
    assert feed(m, LeaseGranted(LEASE)) == [Campaign(LEASE)]
    assert st(m) is State.CAMPAIGNING


def test_lease_alone_does_not_campaign_before_leader_is_read() -> None:
    m = machine()
    assert feed(m, LeaseGranted(LEASE)) == []
    assert st(m) is State.STANDBY


def test_win_adds_vips_then_announces_in_that_order() -> None:
    m = machine()
    a = active(m)
    assert a == [AddVips(T_ME), StartSyncServer(T_ME), StartAnnouncing(T_ME)]
    assert m.term == T_ME
    assert m.holds(T_ME)
    assert not m.holds(Term(LEASE, 99))


def test_leadership_is_the_term_not_a_flag() -> None:
    m = machine()
    active(m)
    # The key re-created by someone else (another term): not ours any more.
    a = feed(m, LeaderObserved(B_LOW))
    assert a[:2] == [RemoveVips(T_ME), StopSyncServer(T_ME)]
    assert StartSyncClient(B_LOW) in a
    assert m.term is None
    assert st(m) is State.STANDBY


def test_lost_campaign_follows_the_winner() -> None:
    m = machine()
    feed(m, LeaseGranted(LEASE), LeaderObserved(None))
    a = feed(m, CampaignLost(B_HIGH))
    assert st(m) is State.STANDBY
    assert a == [StartSyncClient(B_HIGH)]
    assert m.term is None


def test_lost_campaign_to_vanished_key_campaigns_again() -> None:
    m = machine()
    feed(m, LeaseGranted(LEASE), LeaderObserved(None))
    assert feed(m, CampaignLost(None)) == [Campaign(LEASE)]


def test_watch_may_report_own_key_before_campaign_result() -> None:
    m = machine()
    feed(m, LeaseGranted(LEASE), LeaderObserved(None))
    a = feed(m, LeaderObserved(ME_LEADER))
    assert m.term == T_ME
    assert AddVips(T_ME) in a
    # The campaign result arriving afterwards changes nothing.
    assert feed(m, CampaignWon(T_ME)) == []
    assert feed(m, LeaderObserved(ME_LEADER)) == []


def test_standby_follows_leader_changes_and_stops_when_it_goes() -> None:
    m = machine(preempt=False)
    assert standby_following(m, B_HIGH) == [StartSyncClient(B_HIGH)]
    other = Leader("lb3", 240, T_C)
    assert feed(m, LeaderObserved(other)) == [StartSyncClient(other)]
    assert feed(m, LeaderObserved(other)) == []
    assert feed(m, LeaderObserved(None)) == [StopSyncClient(), Campaign(LEASE)]


def test_key_deleted_under_leader_ends_term_and_recampaigns() -> None:
    m = machine()
    active(m)
    a = feed(m, LeaderObserved(None))
    assert a == [RemoveVips(T_ME), StopSyncServer(T_ME), Campaign(LEASE)]


def test_promotion_stops_sync_client_before_adding_vips() -> None:
    m = machine()
    standby_following(m, B_HIGH)
    feed(m, LeaderObserved(None))  # leader gone -> campaign (client stopped)
    m2 = machine(campaign_delay=0.5)
    standby_following(m2, B_HIGH)
    # The watch shows our key directly while the client still follows B.
    m2.st = GroupState(
        state=State.CAMPAIGNING,
        lease=LEASE,
        leader=B_HIGH,
        leader_known=True,
        following=B_HIGH,
    )
    a = feed(m2, CampaignWon(T_ME))
    assert a[0] == StopSyncClient()
    assert a.index(StopSyncClient()) < a.index(AddVips(T_ME))


def test_campaign_delay_arms_a_timer_and_fires_campaign() -> None:
    m = machine(campaign_delay=0.3)
    a = feed(m, LeaseGranted(LEASE), LeaderObserved(None))
    assert a == [ArmTimer(Timer.CAMPAIGN, 0.3, 1)]
    assert st(m) is State.STANDBY
    assert feed(m, TimerFired(Timer.CAMPAIGN, 1)) == [Campaign(LEASE)]
    assert st(m) is State.CAMPAIGNING


def test_campaign_timer_cancelled_when_leader_appears() -> None:
    m = machine(campaign_delay=0.3)
    feed(m, LeaseGranted(LEASE), LeaderObserved(None))
    a = feed(m, LeaderObserved(Leader("lb2", 250, T_B)))
    assert CancelTimer(Timer.CAMPAIGN) in a
    # The cancelled timer's late fire is ignored.
    assert feed(m, TimerFired(Timer.CAMPAIGN, 1)) == []
    assert st(m) is State.STANDBY


def test_stale_timer_token_is_ignored() -> None:
    m = machine(campaign_delay=0.3)
    feed(m, LeaseGranted(LEASE), LeaderObserved(None))
    assert feed(m, TimerFired(Timer.CAMPAIGN, 999)) == []
    assert feed(m, TimerFired(Timer.PREEMPT, 1)) == []
    assert st(m) is State.STANDBY


def test_keepalive_refreshes_vips_only_while_active() -> None:
    m = machine()
    feed(m, LeaseGranted(LEASE), LeaderObserved(B_HIGH))
    assert feed(m, KeepaliveOk(LEASE)) == []
    m = machine()
    active(m)
    assert feed(m, KeepaliveOk(LEASE)) == [RefreshVips(T_ME)]
    assert feed(m, KeepaliveOk(0x999)) == []


# --- fencing and lease loss ----------------------------------------------------------


def test_fence_deadline_drops_vips_and_gives_up_lease() -> None:
    m = machine()
    active(m)
    a = feed(m, FenceDeadlinePassed(LEASE))
    assert a == [RemoveVips(T_ME), StopSyncServer(T_ME), Resign(LEASE)]
    assert st(m) is State.FENCED
    assert m.term is None
    # A keepalive for the abandoned lease does not bring the term back.
    assert feed(m, KeepaliveOk(LEASE)) == []
    assert m.term is None


def test_lease_lost_drops_vips_without_revoking() -> None:
    m = machine()
    active(m)
    a = feed(m, LeaseLost(LEASE))
    assert a == [RemoveVips(T_ME), StopSyncServer(T_ME)]
    assert st(m) is State.FENCED


def test_fenced_node_recovers_with_new_lease_and_does_not_reuse_old_term() -> None:
    m = machine()
    active(m)
    feed(m, FenceDeadlinePassed(LEASE))
    # The old key (old lease) is still seen: not ours -> revoke it, wait.
    a = feed(m, LeaseGranted(0x101), LeaderObserved(ME_LEADER))
    assert st(m) is State.STANDBY
    assert Resign(LEASE) in a
    assert AddVips(T_ME) not in a
    a = feed(m, LeaderObserved(None))
    assert a == [Campaign(0x101)]


def test_fence_events_for_other_leases_are_ignored() -> None:
    m = machine()
    active(m)
    assert feed(m, FenceDeadlinePassed(0x999), LeaseLost(0x999)) == []
    assert st(m) is State.ACTIVE


def test_standby_fence_gives_up_lease_but_keeps_following() -> None:
    m = machine(preempt=False)
    standby_following(m, B_HIGH)
    a = feed(m, FenceDeadlinePassed(LEASE))
    assert a == [Resign(LEASE)]
    assert st(m) is State.FENCED
    assert feed(m, LeaderObserved(None)) == [StopSyncClient()]  # no lease: no campaign


def test_new_lease_while_active_ends_term() -> None:
    m = machine()
    active(m)
    a = feed(m, LeaseGranted(0x555))
    assert a[:3] == [RemoveVips(T_ME), StopSyncServer(T_ME), Resign(LEASE)]
    assert m.term is None


# --- preemption ----------------------------------------------------------------------


def test_higher_priority_preempts_after_hold_down() -> None:
    m = machine(preempt_delay=3.0)
    a = standby_following(m, B_LOW)
    assert timers(a) == [ArmTimer(Timer.PREEMPT, 3.0, 1)]
    a = feed(m, TimerFired(Timer.PREEMPT, 1))
    assert a[0] == RequestHandover(ME, T_B, "preempt")
    # The request seen on the watch: no more re-arming while it is pending.
    a = feed(m, HandoverObserved(Handover(ME, T_B, "preempt")))
    assert CancelTimer(Timer.PREEMPT) in a
    # The leader resigns: we campaign at once (we are the target).
    a = feed(m, LeaderObserved(None))
    assert a == [StopSyncClient(), Campaign(LEASE)]
    a = feed(m, CampaignWon(T_ME))
    assert a[-1] == ClearHandover()
    assert m.term == T_ME


def test_preempt_false_never_preempts() -> None:
    m = machine(preempt=False)
    a = standby_following(m, B_LOW)
    assert timers(a) == []
    assert feed(m, TimerFired(Timer.PREEMPT, 1)) == []


def test_lower_priority_never_preempts() -> None:
    m = machine()
    a = standby_following(m, B_HIGH)
    assert timers(a) == []


def test_preempt_timer_cancelled_when_higher_leader_takes_over() -> None:
    m = machine()
    standby_following(m, B_LOW)
    a = feed(m, LeaderObserved(B_HIGH))
    assert CancelTimer(Timer.PREEMPT) in a
    assert feed(m, TimerFired(Timer.PREEMPT, 1)) == []


def test_preempt_hold_down_survives_change_between_lower_leaders() -> None:
    m = machine()
    standby_following(m, B_LOW)
    a = feed(m, LeaderObserved(C_LOW))
    assert timers(a) == []  # still armed from the first sighting
    a = feed(m, TimerFired(Timer.PREEMPT, 1))
    assert a[0] == RequestHandover(ME, T_C, "preempt")


def test_drained_node_does_not_preempt_and_timer_is_cancelled() -> None:
    m = machine()
    standby_following(m, B_LOW)
    a = feed(m, Drain())
    assert CancelTimer(Timer.PREEMPT) in a
    assert st(m) is State.DRAINED
    assert feed(m, TimerFired(Timer.PREEMPT, 1)) == []


def test_preempt_re_requests_if_first_request_went_unanswered() -> None:
    m = machine(preempt_delay=1.0)
    standby_following(m, B_LOW)
    a = feed(m, TimerFired(Timer.PREEMPT, 1))
    assert a == [RequestHandover(ME, T_B, "preempt"), ArmTimer(Timer.PREEMPT, 1.0, 2)]


def test_leader_hands_over_on_request_for_its_term() -> None:
    m = machine()
    active(m)
    a = feed(m, HandoverObserved(Handover("lb2", T_ME, "preempt")))
    assert a == [RemoveVips(T_ME), StopSyncServer(T_ME), Resign(LEASE)]
    assert m.term is None
    # Back with a fresh lease it defers to the target for handover_timeout.
    a = feed(m, LeaseGranted(0x101), LeaderObserved(None))
    assert a == [ArmTimer(Timer.CAMPAIGN, 3.0, 1)]
    # The target wins: we follow it, the fallback timer goes.
    new = Leader("lb2", 250, Term(0x200, 20))
    a = feed(m, LeaderObserved(new))
    assert a == [StartSyncClient(new), CancelTimer(Timer.CAMPAIGN)]


def test_handover_fallback_campaigns_if_target_never_shows_up() -> None:
    m = machine()
    active(m)
    feed(m, HandoverObserved(Handover("ghost", None)))
    feed(m, LeaseGranted(0x101), LeaderObserved(None))
    assert feed(m, TimerFired(Timer.CAMPAIGN, 1)) == [Campaign(0x101)]
    a = feed(m, CampaignWon(Term(0x101, 30)))
    assert a[-1] == ClearHandover()


def test_stale_or_self_handover_is_cleared_not_obeyed() -> None:
    m = machine()
    active(m)
    assert feed(m, HandoverObserved(Handover("lb2", Term(0x77, 1)))) == [ClearHandover()]
    assert feed(m, HandoverObserved(Handover(ME, None))) == [ClearHandover()]
    assert m.term == T_ME


def test_planned_handover_without_term_is_obeyed() -> None:
    m = machine()
    active(m)
    a = feed(m, HandoverObserved(Handover("lb2", None)))
    assert RemoveVips(T_ME) in a and Resign(LEASE) in a


def test_other_standby_defers_to_handover_target() -> None:
    m = machine()
    standby_following(m, B_HIGH)
    feed(m, HandoverObserved(Handover("lb3", T_B)))
    a = feed(m, LeaderObserved(None))
    assert a == [StopSyncClient(), ArmTimer(Timer.CAMPAIGN, 3.0, 1)]


def test_stale_handover_does_not_delay_campaign() -> None:
    m = machine()
    standby_following(m, B_HIGH)
    feed(m, HandoverObserved(Handover("lb3", Term(0x1, 1))))
    assert feed(m, LeaderObserved(None)) == [StopSyncClient(), Campaign(LEASE)]


def test_handover_target_campaigns_immediately_despite_campaign_delay() -> None:
    m = machine(campaign_delay=5.0, preempt=False)
    standby_following(m, B_HIGH)
    feed(m, HandoverObserved(Handover(ME, None)))
    assert feed(m, LeaderObserved(None)) == [StopSyncClient(), Campaign(LEASE)]


# --- drain ---------------------------------------------------------------------------


# --- fast takeover (heartbeats) ---------------------------------------------------------

FW = 0.4


def test_silent_leader_is_revoked_and_vacancy_waits_out_the_fence() -> None:
    m = machine(fence_wait=FW)
    standby_following(m, B_LOW)
    assert feed(m, LeaderUnresponsive(T_B)) == [ForceTakeover(T_B)]
    assert m.st.forced is None  # not before the reason is written (and seen)
    feed(m, HandoverObserved(Handover(ME, T_B, UNRESPONSIVE)))
    assert m.st.forced == T_B
    a = feed(m, LeaderObserved(None))
    # Not a campaign: a timer of at least the fence wait, even though we are the target.
    assert not any(isinstance(x, Campaign) for x in a)
    (armed,) = timers(a)
    assert armed.timer is Timer.CAMPAIGN and armed.delay >= FW
    assert feed(m, TimerFired(Timer.CAMPAIGN, armed.token)) == [Campaign(LEASE)]
    a = feed(m, CampaignWon(T_ME))
    assert AddVips(T_ME) in a and ClearHandover() in a


def test_fence_wait_holds_when_the_reason_vanishes_with_its_writer() -> None:
    """The revoking standby died: its handover request went with its lease, but the
    old leader may still be frozen, so the others still wait the fence out."""
    m = machine(fence_wait=FW, handover_timeout=1.0)
    standby_following(m, B_LOW)
    feed(m, HandoverObserved(Handover("lb3", T_B, UNRESPONSIVE)))
    a = feed(m, LeaderObserved(None))
    assert timers(a)[0].delay >= FW
    a = feed(m, HandoverObserved(None))
    assert not any(isinstance(x, Campaign) for x in a)
    armed = m.st.timer(Timer.CAMPAIGN)
    assert armed is not None and armed[1] >= FW


def test_unresponsive_reports_are_ignored_when_they_do_not_apply() -> None:
    # Disabled, a different term, drained, or the report is about ourselves.
    m = machine()
    standby_following(m, B_LOW)
    assert feed(m, LeaderUnresponsive(T_B)) == []
    m = machine(fence_wait=FW)
    standby_following(m, B_LOW)
    assert feed(m, LeaderUnresponsive(T_C)) == []
    feed(m, Drain())
    assert feed(m, LeaderUnresponsive(T_B)) == []
    m = machine(fence_wait=FW)
    active(m)
    assert feed(m, LeaderUnresponsive(T_ME)) == []
    assert st(m) is State.ACTIVE


def test_slow_leader_that_sees_its_term_forced_steps_down() -> None:
    m = machine(fence_wait=FW)
    active(m)
    a = feed(m, HandoverObserved(Handover("lb2", T_ME, UNRESPONSIVE)))
    assert RemoveVips(T_ME) in a and Resign(LEASE) in a
    assert st(m) is State.STANDBY


def test_a_new_term_clears_the_forced_one() -> None:
    m = machine(fence_wait=FW)
    standby_following(m, B_LOW)
    feed(m, HandoverObserved(Handover(ME, T_B, UNRESPONSIVE)), LeaderObserved(None))
    assert m.st.forced == T_B
    feed(m, LeaderObserved(C_LOW))
    assert m.st.forced is None
    feed(m, LeaderObserved(None))
    armed = m.st.timer(Timer.CAMPAIGN)
    # An ordinary vacancy again: no fence wait.
    assert armed is None or armed[1] < FW


def test_drain_active_resigns_and_never_campaigns() -> None:
    m = machine()
    active(m)
    a = feed(m, Drain())
    assert a == [RemoveVips(T_ME), StopSyncServer(T_ME), Resign(LEASE)]
    assert st(m) is State.DRAINED
    assert feed(m, LeaseGranted(0x101), LeaderObserved(None)) == []
    assert st(m) is State.DRAINED
    assert feed(m, Undrain()) == [Campaign(0x101)]


def test_drain_during_campaign_resigns_the_won_term() -> None:
    m = machine()
    feed(m, LeaseGranted(LEASE), LeaderObserved(None))
    feed(m, Drain())
    a = feed(m, CampaignWon(T_ME))
    assert a == [Resign(LEASE)]
    assert m.term is None and m.state is State.DRAINED


def test_drained_standby_keeps_following() -> None:
    m = machine(preempt=False)
    standby_following(m, B_HIGH)
    assert feed(m, Drain()) == []
    assert m.st.following == B_HIGH


def test_drained_node_releases_its_own_key_when_seen() -> None:
    m = machine()
    feed(m, Drain(), LeaseGranted(LEASE))
    a = feed(m, LeaderObserved(ME_LEADER))
    assert a == [Resign(LEASE)]
    assert m.term is None


# --- restart / resume ----------------------------------------------------------------


def test_resumed_lease_resumes_the_term() -> None:
    m = machine()
    feed(m, LeaseGranted(LEASE, resumed=True))
    a = feed(m, LeaderObserved(ME_LEADER))
    assert m.term == T_ME
    assert a == [AddVips(T_ME), StartSyncServer(T_ME), StartAnnouncing(T_ME)]


def test_own_key_seen_before_lease_is_not_revoked() -> None:
    # The coordinator might report the key before the resumed lease: do not kill it.
    m = machine()
    assert feed(m, LeaderObserved(ME_LEADER)) == []
    a = feed(m, LeaseGranted(LEASE, resumed=True))
    assert AddVips(T_ME) in a


def test_stale_own_key_from_previous_run_is_revoked() -> None:
    m = machine()
    a = feed(m, LeaseGranted(0x999), LeaderObserved(ME_LEADER))
    assert a == [Resign(LEASE)]
    assert m.term is None


# --- shutdown ------------------------------------------------------------------------


def test_shutdown_active_hands_off() -> None:
    m = machine()
    active(m)
    a = feed(m, Shutdown())
    assert a == [RemoveVips(T_ME), StopSyncServer(T_ME), Resign(LEASE)]
    assert st(m) is State.STOPPING
    assert feed(m, LeaderObserved(None), LeaseGranted(5), Undrain()) == []


def test_shutdown_for_restart_keeps_vips_and_lease() -> None:
    m = machine()
    active(m)
    a = feed(m, Shutdown(handoff=False))
    assert a == [DetachVips(T_ME), StopSyncServer(T_ME)]
    assert not any(isinstance(x, Resign) for x in a)


def test_shutdown_standby_stops_client_timers_and_lease() -> None:
    m = machine()
    standby_following(m, B_LOW)
    a = feed(m, Shutdown())
    assert a == [CancelTimer(Timer.PREEMPT), StopSyncClient(), Resign(LEASE)]


# --- promises to a holder (halb.ha.hold) -------------------------------------------------


def promise_timer(actions: Sequence[Action]) -> ArmTimer:
    (armed,) = [a for a in timers(actions) if a.timer is Timer.PROMISE]
    return armed


def test_a_promised_node_does_not_campaign_until_the_promise_runs_out() -> None:
    m = machine()
    armed = promise_timer(feed(m, PromiseGiven(0.5)))
    assert armed.delay == 0.5
    # Lease and an empty leader key: would campaign at once, but it promised.
    assert feed(m, LeaseGranted(LEASE), LeaderObserved(None)) == []
    assert st(m) is State.STANDBY
    assert feed(m, TimerFired(Timer.PROMISE, armed.token)) == [Campaign(LEASE)]


def test_a_renewed_promise_rearms_and_the_old_timer_is_ignored() -> None:
    m = machine()
    first = promise_timer(feed(m, PromiseGiven(0.5), LeaseGranted(LEASE), LeaderObserved(None)))
    second = promise_timer(feed(m, PromiseGiven(0.5)))
    assert second.token != first.token
    assert feed(m, TimerFired(Timer.PROMISE, first.token)) == []
    assert st(m) is State.STANDBY
    assert feed(m, TimerFired(Timer.PROMISE, second.token)) == [Campaign(LEASE)]


def test_a_silent_leader_reported_while_promised_is_acted_on_when_it_runs_out() -> None:
    m = machine(fence_wait=0.4)
    standby_following(m, B_LOW)
    armed = promise_timer(feed(m, PromiseGiven(0.5)))
    assert not any(isinstance(a, ForceTakeover) for a in feed(m, LeaderUnresponsive(T_B)))
    assert ForceTakeover(T_B) in feed(m, TimerFired(Timer.PROMISE, armed.token))


def test_a_promised_node_does_not_preempt() -> None:
    m = machine(preempt_delay=1.0)
    standby_following(m, B_LOW)  # a lower leader: the preempt timer is armed
    a = feed(m, PromiseGiven(0.5))
    assert CancelTimer(Timer.PREEMPT) in a
    armed = promise_timer(a)
    again = feed(m, TimerFired(Timer.PROMISE, armed.token))
    assert [t.timer for t in timers(again)] == [Timer.PREEMPT]


def test_contending_is_holding_or_campaigning() -> None:
    m = machine()
    assert not m.contending
    feed(m, LeaseGranted(LEASE), LeaderObserved(None))
    assert st(m) is State.CAMPAIGNING and m.contending
    feed(m, CampaignWon(T_ME))
    assert m.contending


# --- invariants over many random event sequences --------------------------------------

EVENTS: list[Event] = [
    LeaseGranted(LEASE),
    LeaseGranted(0x101),
    LeaseLost(LEASE),
    FenceDeadlinePassed(LEASE),
    FenceDeadlinePassed(0x101),
    KeepaliveOk(LEASE),
    LeaderObserved(None),
    LeaderObserved(ME_LEADER),
    LeaderObserved(Leader(ME, 100, Term(0x101, 40))),
    LeaderObserved(B_LOW),
    LeaderObserved(B_HIGH),
    CampaignWon(T_ME),
    CampaignWon(Term(0x101, 40)),
    CampaignLost(B_HIGH),
    CampaignLost(None),
    HandoverObserved(Handover("lb2", T_ME)),
    HandoverObserved(Handover(ME, T_B)),
    HandoverObserved(None),
    HandoverObserved(Handover(ME, T_B, UNRESPONSIVE)),
    HandoverObserved(Handover("lb3", T_B, UNRESPONSIVE)),
    LeaderUnresponsive(T_B),
    LeaderUnresponsive(T_ME),
    Drain(),
    Undrain(),
    TimerFired(Timer.PREEMPT, 1),
    TimerFired(Timer.CAMPAIGN, 1),
    TimerFired(Timer.PREEMPT, 2),
    TimerFired(Timer.CAMPAIGN, 3),
    PromiseGiven(2.0),
    TimerFired(Timer.PROMISE, 1),
    TimerFired(Timer.PROMISE, 2),
    TimerFired(Timer.PROMISE, 4),
]


def _check_invariants(before: GroupState, after: GroupState, actions: list[Action]) -> None:
    # ACTIVE exactly when a term is held, and the term is on our current lease.
    assert (after.state is State.ACTIVE) == (after.term is not None)
    if after.term is not None:
        assert after.term.lease_id == after.lease
        assert not after.drained
    # A term only ever starts with AddVips for it, and ends with Remove/Detach for it.
    if before.term != after.term:
        if before.term is not None:
            assert RemoveVips(before.term) in actions or DetachVips(before.term) in actions
        if after.term is not None:
            assert AddVips(after.term) in actions
    for a in actions:
        if isinstance(a, AddVips | StartAnnouncing | StartSyncServer | RefreshVips):
            assert a.term == after.term
        if isinstance(a, Campaign):
            assert a.lease_id == after.lease and after.state is State.CAMPAIGNING
    # Never follow ourselves, never follow while leading.
    if after.following is not None:
        assert after.following.holder != ME
        assert after.state is not State.ACTIVE
    # Bound by a promise to a holder: no campaign, no forced takeover, no preemption.
    if after.promised:
        assert not any(isinstance(a, Campaign | ForceTakeover | RequestHandover) for a in actions)
        assert after.timer(Timer.PROMISE) is not None
    # At most one timer of each kind.
    kinds = [t[0] for t in after.timers]
    assert len(kinds) == len(set(kinds))


@pytest.mark.parametrize("seed", range(40))
def test_random_sequences_keep_invariants(seed: int) -> None:
    import random

    rng = random.Random(seed)
    for cfg in (
        MachineConfig(ME, 100),
        MachineConfig(ME, 100, preempt=False, campaign_delay=0.2),
        MachineConfig(ME, 100, fence_wait=0.4),
    ):
        st = GroupState()
        for _ in range(300):
            ev = rng.choice(EVENTS)
            new, actions = step(cfg, st, ev)
            _check_invariants(st, new, actions)
            _check_fence_wait(cfg, st, new, ev, actions)
            st = new


def _check_fence_wait(
    cfg: MachineConfig, before: GroupState, after: GroupState, ev: Event, actions: list[Action]
) -> None:
    """After a forced revoke nobody campaigns for the vacancy except from a campaign
    timer armed with at least the fence wait."""
    if not any(isinstance(a, Campaign) for a in actions):
        return
    if after.forced is None or after.forced != after.last_term or cfg.fence_wait <= 0:
        return
    assert isinstance(ev, TimerFired) and ev.timer is Timer.CAMPAIGN, (before, ev)
    armed = before.timer(Timer.CAMPAIGN)
    assert armed is not None and armed[1] >= cfg.fence_wait


@pytest.mark.parametrize("fence_wait", [0.0, 0.4])
def test_every_pair_of_events_from_every_reachable_state(fence_wait: float) -> None:
    cfg = MachineConfig(ME, 100, fence_wait=fence_wait)
    seen: set[GroupState] = set()
    frontier = [GroupState()]
    for _depth in range(3):
        nxt = []
        for st, ev in itertools.product(frontier, EVENTS):
            new, actions = step(cfg, st, ev)
            _check_invariants(st, new, actions)
            _check_fence_wait(cfg, st, new, ev, actions)
            if new not in seen:
                seen.add(new)
                nxt.append(new)
        frontier = nxt
    states = {s.state for s in seen}
    if fence_wait:
        assert any(s.forced is not None for s in seen)
    assert states >= {
        State.STANDBY,
        State.CAMPAIGNING,
        State.ACTIVE,
        State.FENCED,
        State.DRAINED,
    }
