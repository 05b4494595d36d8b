from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from halb.checks.base import CheckResult
from halb.checks.factory import CheckTarget
from halb.checks.scheduler import CheckScheduler
from halb.checks.state import NO_DAMPING, Health, Thresholds
from halb.testing.clock import FakeClock

pytestmark = pytest.mark.unit

T = TypeVar("T")


def aio(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test body on a fresh event loop (no pytest-asyncio here)."""

    @functools.wraps(fn)
    def run() -> None:
        asyncio.run(fn())

    return run


class Scripted:
    """A checker whose answer the test sets; records when it was called."""

    def __init__(self, clock: FakeClock, up: bool = True) -> None:
        self.clock = clock
        self.up = up
        self.calls: list[float] = []

    @property
    def target(self) -> str:
        return "scripted"

    async def check(self, timeout: float) -> CheckResult:
        self.calls.append(self.clock.now())
        return CheckResult(self.up, "fine" if self.up else "refused", 0.0)


class Crashing:
    target = "crashing"

    async def check(self, timeout: float) -> CheckResult:
        raise RuntimeError("boom in checker")


class Hanging:
    target = "hanging"

    async def check(self, timeout: float) -> CheckResult:
        await asyncio.sleep(3600)  # real time: the scheduler's own deadline must cut it
        raise AssertionError("not reached")


class Garbage:
    target = "garbage"

    async def check(self, timeout: float) -> CheckResult:
        return "yes"  # type: ignore[return-value]


async def running(sched: CheckScheduler) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(sched.run())
    try:
        yield task
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def make(clock: FakeClock, targets: list[CheckTarget], **kw: object) -> CheckScheduler:
    return CheckScheduler(
        targets,
        clock=clock,
        wall=clock.now,
        damping=NO_DAMPING,
        rng=random.Random(7),
        **kw,  # type: ignore[arg-type]
    )


async def until(pred: Callable[[], bool], clock: FakeClock, step: float, limit: int) -> int:
    """Advance the fake clock by step until pred holds; return how many steps it took."""
    for i in range(limit):
        if pred():
            return i
        await clock.advance(step)
    raise AssertionError("condition not reached")


@aio
async def test_fall_and_rise_follow_the_interval() -> None:
    clock = FakeClock()
    chk = Scripted(clock)
    target = CheckTarget("svc/b1", chk, interval=1.0, timeout=0.5, thresholds=Thresholds(2, 3))
    sched = make(clock, [target])
    async for _ in running(sched):
        await clock.advance(3.0)
        assert sched.state("svc/b1").health is Health.UP
        assert len(chk.calls) == 3
        # A fixed cadence: one probe per interval after the jittered first one.
        assert [round(b - a, 6) for a, b in zip(chk.calls, chk.calls[1:], strict=False)] == [
            1.0,
            1.0,
        ]

        chk.up = False
        t0 = clock.now()
        await until(lambda: sched.state("svc/b1").health is Health.DOWN, clock, 0.1, 100)
        took = clock.now() - t0
        assert 2.0 <= took <= 3.0 + 0.1  # the 3rd failing probe, within interval x fall
        s = sched.state("svc/b1")
        assert "refused" in s.reason and s.since == pytest.approx(chk.calls[-1])

        chk.up = True
        t0 = clock.now()
        await until(lambda: sched.state("svc/b1").health is Health.UP, clock, 0.1, 100)
        assert 1.0 <= clock.now() - t0 <= 2.0 + 0.1


@aio
async def test_first_probes_are_jittered_within_one_interval() -> None:
    clock = FakeClock()
    checkers = [Scripted(clock) for _ in range(20)]
    targets = [CheckTarget(f"s/b{i}", c, interval=2.0) for i, c in enumerate(checkers)]
    sched = make(clock, targets)
    async for _ in running(sched):
        await clock.advance(2.0)
        firsts = [c.calls[0] - 1000.0 for c in checkers]
        assert all(0.0 <= f <= 2.0 for f in firsts)
        assert len({round(f, 3) for f in firsts}) > 10  # spread, not in lockstep


@aio
async def test_a_crashing_checker_is_down_with_the_error_and_nothing_else_breaks() -> None:
    clock = FakeClock()
    good = Scripted(clock)
    targets = [
        CheckTarget("s/crash", Crashing(), interval=1.0, thresholds=Thresholds(1, 1)),
        CheckTarget("s/garbage", Garbage(), interval=1.0, thresholds=Thresholds(1, 1)),
        CheckTarget("s/good", good, interval=1.0, thresholds=Thresholds(1, 1)),
    ]
    sched = make(clock, targets)
    async for task in running(sched):
        await clock.advance(5.0)
        assert not task.done()
        crash = sched.state("s/crash")
        assert crash.health is Health.DOWN
        assert crash.last is not None and "RuntimeError: boom in checker" in crash.last.reason
        assert "checker crashed" in crash.reason
        garbage = sched.state("s/garbage")
        assert garbage.health is Health.DOWN and "not CheckResult" in garbage.reason
        assert sched.state("s/good").health is Health.UP and len(good.calls) >= 4


@aio
async def test_a_hanging_checker_is_cut_at_timeout_plus_grace() -> None:
    clock = FakeClock()
    target = CheckTarget(
        "s/hang", Hanging(), interval=1.0, timeout=0.05, thresholds=Thresholds(1, 1)
    )
    sched = make(clock, [target], grace=0.05)
    result = await asyncio.wait_for(sched.probe(target), 5.0)
    assert not result.up and "overran its 0.05s timeout" in result.reason
    assert 0.09 <= result.latency < 2.0


@aio
async def test_unchecked_backends_stay_up_and_seeds_are_used() -> None:
    clock = FakeClock()
    from halb.checks.state import initial

    seed = {"s/b": initial(10.0, up=False, reason="from the published view")}
    sched = make(
        clock,
        [
            CheckTarget("s/none", None),
            CheckTarget("s/b", Scripted(clock), thresholds=Thresholds(2, 1)),
        ],
        initial_states=seed,
    )
    assert sched.state("s/none").health is Health.UP
    assert sched.state("s/none").reason == "no health check configured"
    assert sched.state("s/b").reason == "from the published view"
    async for _ in running(sched):
        await clock.advance(3.0)
        assert sched.state("s/b").health is Health.UP


@aio
async def test_wait_changed_and_on_change_fire_on_visible_changes_only() -> None:
    clock = FakeClock()
    chk = Scripted(clock)
    seen: list[tuple[str, Health]] = []
    sched = make(
        clock,
        [CheckTarget("s/b", chk, interval=1.0, thresholds=Thresholds(1, 1))],
        on_change=lambda k, s: seen.append((k, s.health)),
    )
    async for _ in running(sched):
        await clock.advance(1.0)  # first result: last result appears -> visible change
        await asyncio.wait_for(sched.wait_changed(), 1.0)
        await clock.advance(3.0)  # same result again: nothing visible changes
        waiter = asyncio.create_task(sched.wait_changed())
        await clock.settle()
        assert not waiter.done()
        chk.up = False
        await clock.advance(1.0)
        await asyncio.wait_for(waiter, 1.0)
        assert seen == [("s/b", Health.UP), ("s/b", Health.DOWN)]


def test_duplicate_keys_are_refused() -> None:
    with pytest.raises(ValueError):
        CheckScheduler([CheckTarget("k", None), CheckTarget("k", None)])
