"""Coordinator.hold: the one extension of the fence deadline (no I/O: the deadline is
arithmetic on the last successes; the lease is set as a keepalive would)."""

from __future__ import annotations

from typing import Any

import pytest

from halb.ha.coord import Coordinator
from halb.keys import GroupKeys
from halb.testing.clock import FakeClock

pytestmark = pytest.mark.unit


def coord() -> tuple[Coordinator, FakeClock]:
    clock = FakeClock()
    client: Any = object()  # never called here
    c = Coordinator(client, GroupKeys("/halb", "c", "web"), "lb1", 100, ttl=2,
                    emit=lambda ev: None, clock=clock)  # fmt: skip
    return c, clock


def test_a_hold_extends_the_deadline_and_only_while_the_lease_lasts() -> None:
    c, clock = coord()
    c.hold(clock.now() + 5)
    assert c.holding_until is None  # no lease: nothing to hold
    c._lease, c.last_keepalive_ok = 0x1, clock.now()
    c._answered(clock.now())
    usual = c.fence_deadline
    assert usual == pytest.approx(clock.now() + 2 - c.fence_margin)
    c.hold(clock.now() + 5)
    assert c.fence_deadline == pytest.approx(clock.now() + 5)
    assert c.usual_fence_deadline == usual
    c.hold(clock.now() + 0.1)  # a hold never brings the usual deadline forward
    assert c.fence_deadline == usual
    c.hold(clock.now() + 5)
    c._drop_lease()  # fenced or lost: the hold goes with the lease
    assert c.holding_until is None and c.fence_deadline is None


def test_quiet_and_reach_count_from_the_last_answer() -> None:
    c, clock = coord()
    assert c.etcd_quiet_for() == float("inf") and not c.reaches_etcd(1.0)
    c._answered(clock.now())
    clock._now += 0.2
    assert c.etcd_quiet_for() == pytest.approx(0.2)
    assert c.reaches_etcd(0.3) and not c.reaches_etcd(0.1)
