"""Run every backend's check concurrently, forever, without ever failing the caller.

One asyncio task per backend, started at a random point of its first interval (so a
thousand backends do not probe in lockstep), then on a fixed cadence: a probe starts
every ``interval`` seconds (at once if the previous one overran). Each result goes
through :func:`halb.checks.state.observe`.

Isolation: a checker that raises, returns garbage or overruns ``timeout + grace`` is
reported as a *down* result whose reason names the error; nothing propagates out of
the scheduler except cancellation. So a buggy checker costs one backend, never the
agent's task group (and so never VIP ownership).

Usage (the agent)::

    sched = CheckScheduler(targets_from_config(cfg), initial_states=seed)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(sched.run())
        while True:
            await sched.wait_changed()
            states = sched.states()        # dict backend key -> BackendHealth
            ...                            # build + publish the view (publish.py)

``seed`` may come from :func:`halb.checks.view.states_from_view` (a promoted standby
keeps the cluster's opinion) or from an old scheduler's ``states()`` on reload.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence

from halb.checks.base import CheckResult
from halb.checks.factory import CheckTarget
from halb.checks.state import (
    DEFAULT_DAMPING,
    BackendHealth,
    Damping,
    Health,
    initial,
    observe,
    tick,
)
from halb.ha.clock import Clock, MonotonicClock

__all__ = ["CheckScheduler"]

log = logging.getLogger(__name__)


def _visible(s: BackendHealth) -> tuple[object, ...]:
    """What the published view shows of a state: a change here is worth publishing."""
    last = (s.last.up, s.last.reason) if s.last is not None else None
    return (s.health, s.since, s.reason, last)


class CheckScheduler:
    """Runs ``targets``; ``states()`` is the current per-backend health.

    ``clock`` paces the probes (monotonic); ``wall`` stamps the states (their ``since``
    is published and shown to operators). ``grace`` is how long past its own timeout a
    checker may run before the scheduler gives up on it. ``on_change(key, state)`` is
    called (synchronously, must not block) whenever a state's visible part changes.
    """

    def __init__(
        self,
        targets: Sequence[CheckTarget],
        *,
        damping: Damping = DEFAULT_DAMPING,
        clock: Clock | None = None,
        wall: Callable[[], float] = time.time,
        initial_states: Mapping[str, BackendHealth] | None = None,
        on_change: Callable[[str, BackendHealth], None] | None = None,
        grace: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        keys = [t.key for t in targets]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate backend keys in check targets")
        self.targets = list(targets)
        self.damping = damping
        self.clock: Clock = clock or MonotonicClock()
        self.wall = wall
        self.on_change = on_change
        self.grace = grace
        self.rng = rng or random.Random()
        seed = initial_states or {}
        now = wall()
        self._states: dict[str, BackendHealth] = {}
        for t in self.targets:
            if t.checker is None:
                self._states[t.key] = initial(now, reason="no health check configured")
            else:
                self._states[t.key] = seed.get(t.key) or initial(now)
        self._changed = asyncio.Event()
        self._last_error: dict[str, str] = {}

    # -- reading -------------------------------------------------------------------------

    def states(self) -> dict[str, BackendHealth]:
        """A snapshot (a new dict; the values are immutable)."""
        return dict(self._states)

    def state(self, key: str) -> BackendHealth:
        return self._states[key]

    async def wait_changed(self) -> None:
        """Return once something visible changed since the previous return."""
        await self._changed.wait()
        self._changed.clear()

    # -- running -------------------------------------------------------------------------

    async def run(self) -> None:
        """Probe every checked backend until cancelled."""
        checked = [t for t in self.targets if t.checker is not None]
        log.info(
            "health checks: %d backends checked, %d unchecked",
            len(checked),
            len(self.targets) - len(checked),
        )
        async with asyncio.TaskGroup() as tg:
            for t in checked:
                tg.create_task(self._loop(t), name=f"check {t.key}")

    async def _loop(self, target: CheckTarget) -> None:
        await self.clock.sleep(self.rng.uniform(0.0, target.interval))
        while True:
            started = self.clock.now()
            try:
                result = await self.probe(target)
                self._record(target, result)
            except Exception:
                # Only a bug in this module gets here; keep checking regardless.
                log.exception("health check loop of %s failed; continuing", target.key)
            await self.clock.sleep(started + target.interval - self.clock.now())

    async def probe(self, target: CheckTarget) -> CheckResult:
        """One guarded probe: never raises (except cancellation)."""
        checker = target.checker
        if checker is None:
            return CheckResult(True, "no health check configured")
        start = time.monotonic()
        try:
            async with asyncio.timeout(target.timeout + self.grace):
                result = await checker.check(target.timeout)
            if not isinstance(result, CheckResult):
                raise TypeError(f"checker returned {type(result).__name__}, not CheckResult")
        except TimeoutError:
            result = CheckResult(
                False,
                f"checker overran its {target.timeout:g}s timeout",
                time.monotonic() - start,
            )
        except Exception as exc:
            reason = f"checker crashed: {type(exc).__name__}: {exc}"
            if self._last_error.get(target.key) != reason:
                # Log the traceback once per distinct error, not once per interval.
                log.warning("%s: %s", checker.target, reason, exc_info=True)
                self._last_error[target.key] = reason
            result = CheckResult(False, reason, time.monotonic() - start)
        else:
            self._last_error.pop(target.key, None)
        return result

    def _record(self, target: CheckTarget, result: CheckResult) -> None:
        old = self._states[target.key]
        new = observe(old, result, self.wall(), target.thresholds, self.damping)
        self._set(target, old, new)

    def expire(self) -> None:
        """End damping holds that ran out (``run`` does this at every probe; call it
        if you read states between probes and need them exact)."""
        now = self.wall()
        for t in self.targets:
            old = self._states[t.key]
            self._set(t, old, tick(old, now))

    def _set(self, target: CheckTarget, old: BackendHealth, new: BackendHealth) -> None:
        self._states[target.key] = new
        if new.health is not old.health:
            level = logging.INFO if new.health is Health.UP else logging.WARNING
            log.log(
                level,
                "backend %s is %s (was %s): %s",
                target.key,
                new.health.value,
                old.health.value,
                new.reason,
            )
        if _visible(new) != _visible(old):
            self._changed.set()
            if self.on_change is not None:
                try:
                    self.on_change(target.key, new)
                except Exception:
                    log.exception("on_change callback failed for %s; ignored", target.key)
