from __future__ import annotations

import pytest

from halb.checks.base import CheckResult
from halb.checks.state import (
    NO_DAMPING,
    BackendHealth,
    Damping,
    Health,
    Thresholds,
    initial,
    observe,
    tick,
)

pytestmark = pytest.mark.unit

OK = CheckResult(True, "connected", 0.001)
BAD = CheckResult(False, "connection refused", 0.001)


class Clock:
    """Seconds that tests move by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def step(self, dt: float = 1.0) -> float:
        self.t += dt
        return self.t


def feed(
    state: BackendHealth,
    results: list[CheckResult],
    clock: Clock,
    th: Thresholds,
    damping: Damping = NO_DAMPING,
) -> tuple[BackendHealth, list[Health]]:
    seen = []
    for r in results:
        state = observe(state, r, clock.step(), th, damping)
        seen.append(state.health)
    return state, seen


def test_starts_up_and_falls_after_exactly_fall_failures() -> None:
    clock = Clock()
    s = initial(clock.t)
    assert s.health is Health.UP and s.reason == "not checked yet"
    last, seen = feed(s, [BAD, BAD, BAD, BAD], clock, Thresholds(rise=2, fall=3))
    assert seen == [Health.UP, Health.UP, Health.DOWN, Health.DOWN]
    assert last.since == 1003.0  # the third failure
    assert "connection refused" in last.reason and "3 in a row" in last.reason
    assert last.last == BAD and last.last_at == 1004.0


def test_rises_after_exactly_rise_successes() -> None:
    clock = Clock()
    s = initial(clock.t, up=False, reason="seeded")
    _, seen = feed(s, [OK, OK, OK], clock, Thresholds(rise=2, fall=3))
    assert seen == [Health.DOWN, Health.UP, Health.UP]


def test_a_good_result_resets_the_failure_streak() -> None:
    clock = Clock()
    s = initial(clock.t)
    th = Thresholds(rise=2, fall=3)
    _, seen = feed(s, [BAD, BAD, OK, BAD, BAD, OK, BAD, BAD, BAD], clock, th)
    assert seen[:8] == [Health.UP] * 8
    assert seen[8] is Health.DOWN


def test_rise_and_fall_of_one_follow_every_result() -> None:
    clock = Clock()
    _, seen = feed(initial(clock.t), [BAD, OK, BAD], clock, Thresholds(rise=1, fall=1))
    assert seen == [Health.DOWN, Health.UP, Health.DOWN]


def test_since_does_not_move_while_the_state_holds() -> None:
    clock = Clock()
    s = initial(clock.t)
    s = observe(s, OK, clock.step(), Thresholds(), NO_DAMPING)
    s2 = observe(s, CheckResult(True, "connected", 0.5), clock.step(), Thresholds(), NO_DAMPING)
    assert s2.since == s.since == 1000.0
    assert s2.last_at == 1002.0


def test_thresholds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Thresholds(rise=0)


def _flap(
    s: BackendHealth, clock: Clock, damping: Damping, cycles: int, dt: float = 1.0
) -> tuple[BackendHealth, list[Health]]:
    """rise=fall=1, so each result is a verdict change; one result every dt seconds."""
    seen = []
    th = Thresholds(rise=1, fall=1)
    for _ in range(cycles):
        for r in (BAD, OK):
            s = observe(s, r, clock.step(dt), th, damping)
            seen.append(s.health)
    return s, seen


def test_damping_holds_a_flapping_backend_down_for_the_hold() -> None:
    clock = Clock()
    damping = Damping(max_changes=4, window=60.0, hold=30.0)
    s, seen = _flap(initial(clock.t), clock, damping, cycles=3)
    # changes 1..4 are tolerated, the 5th (a down at t+5) starts the hold.
    assert seen[:4] == [Health.DOWN, Health.UP, Health.DOWN, Health.UP]
    assert seen[4] is Health.DAMPED and seen[5] is Health.DAMPED
    assert s.damped_until == 1005.0 + 30.0
    assert "flapping" in s.reason and "5 state changes" in s.reason

    # Good results during the hold do not release it.
    th = Thresholds(rise=1, fall=1)
    for _ in range(20):
        s = observe(s, OK, clock.step(1.0), th, damping)
    assert s.health is Health.DAMPED and clock.t == 1026.0

    # At the end of the hold it takes its current verdict (up).
    s = tick(s, 1035.0)
    assert s.health is Health.UP and s.since == 1035.0
    assert "hold ended" in s.reason and s.damped_until is None


def test_damping_releases_to_down_when_the_checks_say_down() -> None:
    clock = Clock()
    damping = Damping(max_changes=2, window=60.0, hold=10.0)
    s, _ = _flap(initial(clock.t), clock, damping, cycles=2)
    assert s.health is Health.DAMPED
    s = observe(s, BAD, clock.step(), Thresholds(rise=1, fall=1), damping)
    assert s.health is Health.DAMPED
    s = observe(s, BAD, clock.step(20.0), Thresholds(rise=1, fall=1), damping)
    assert s.health is Health.DOWN


def test_slow_changes_outside_the_window_are_not_flapping() -> None:
    clock = Clock()
    damping = Damping(max_changes=4, window=60.0, hold=120.0)
    # One change every 20 s: never more than 3 changes within 60 s.
    s, seen = _flap(initial(clock.t), clock, damping, cycles=10, dt=20.0)
    assert Health.DAMPED not in seen
    assert len(s.changes) <= 3


def test_a_backend_still_flapping_after_the_hold_is_held_again() -> None:
    clock = Clock()
    damping = Damping(max_changes=2, window=100.0, hold=10.0)
    s, _ = _flap(initial(clock.t), clock, damping, cycles=2)
    assert s.health is Health.DAMPED
    until = s.damped_until
    assert until is not None
    # Keep flapping through the hold: the changes are counted again, so the first
    # change after the hold ends starts a new hold at once.
    s, seen = _flap(s, clock, damping, cycles=6)
    assert clock.t > until
    assert set(seen) == {Health.DAMPED}
    assert s.damped_until is not None and s.damped_until > until
    assert s.since >= until  # a new hold, not the old one


def test_damping_disabled() -> None:
    clock = Clock()
    _s, seen = _flap(initial(clock.t), clock, NO_DAMPING, cycles=20)
    assert Health.DAMPED not in seen
