"""The standby's heartbeat watchdog bookkeeping (halb.ha.watchdog), on clock readings."""

from __future__ import annotations

import pytest

from halb.ha.watchdog import LeaderWatchdog
from halb.model import Term

pytestmark = pytest.mark.unit

T1, T2 = Term(0x10, 5), Term(0x20, 9)


def test_a_silent_term_is_suspected_once_and_heartbeats_reset_the_clock() -> None:
    w = LeaderWatchdog(limit=0.3)
    w.observe_leader(T1, now=10.0)
    assert w.suspect(10.2, own_lease=None) is None
    w.heartbeat(T1, revision=40, now=10.2)
    assert w.suspect(10.45, own_lease=None) is None
    assert w.suspect(10.6, own_lease=None) == (T1, pytest.approx(0.4))
    w.report(T1)
    assert w.suspect(11.0, own_lease=None) is None  # reported once
    w.reread()
    assert w.suspect(11.0, own_lease=None) is not None  # a fresh read judges anew


def test_beats_of_another_term_and_our_own_term_are_not_counted() -> None:
    w = LeaderWatchdog(limit=0.3)
    w.observe_leader(T1, now=0.0)
    w.heartbeat(T2, revision=50, now=0.25)
    assert w.suspect(0.4, own_lease=None) is not None
    assert w.suspect(0.4, own_lease=T1.lease_id) is None  # we are its leader
    w.observe_leader(T2, now=0.4)  # a new term starts its own clock
    assert w.suspect(0.6, own_lease=None) is None


def test_a_read_newer_than_the_watch_shows_the_leader_alive() -> None:
    w = LeaderWatchdog(limit=0.3)
    w.observe_leader(T1, now=0.0)
    w.heartbeat(T1, revision=40, now=0.1)
    assert not w.moved(T1, T1, revision=40, now=0.5)  # nothing the watch had not shown
    assert not w.moved(T1, T2, revision=41, now=0.5)  # another term's beat
    assert w.moved(T1, T1, revision=41, now=0.5)
    assert w.suspect(0.7, own_lease=None) is None  # the clock restarted at 0.5


def test_time_in_which_etcd_fails_this_node_does_not_count_as_silence() -> None:
    w = LeaderWatchdog(0.3)
    t = Term(7, 10)
    w.observe_leader(t, 0.0)
    w.etcd_unavailable(0.25)  # etcd electing a leader: no heartbeat can arrive
    w.etcd_unavailable(0.9)
    assert w.suspect(1.1, None) is None  # 0.2 s since etcd answered again
    assert w.suspect(1.25, None) == (t, pytest.approx(0.35))
