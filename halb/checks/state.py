"""Pure per-backend health state: rise/fall counting and flap damping.

No I/O, no clock: every function takes ``now`` (seconds, one scale per caller). The
scheduler passes wall-clock seconds because the ``since`` stamps are published to other
nodes and shown to operators; the damping windows are long enough (tens of seconds)
that an NTP slew does not matter.

States (:class:`Health`):

- ``up``: the rise/fall-filtered verdict is up.
- ``down``: the verdict is down (``fall`` consecutive failures).
- ``damped``: the backend flapped; it is held down for ``Damping.hold`` seconds
  whatever its checks say (checks keep running and counting meanwhile).
- ``draining``: never produced here. It is the view's overlay for a backend that is up
  but has weight 0 in the config or an operator drain (see :mod:`halb.checks.view`).

Rise/fall (keepalived's ``delay_loop``/``retry`` and HAProxy's ``rise``/``fall``): an up
backend goes down after ``fall`` consecutive failed results; a down backend goes up
after ``rise`` consecutive good results. A result that agrees with the verdict resets
the streak.

Flap damping (a counting simplification of BGP route-flap damping, RFC 2439): every
verdict change (up->down or down->up) is stamped; when more than
``Damping.max_changes`` stamps fall within the last ``Damping.window`` seconds, the
backend is ``damped`` for ``Damping.hold`` seconds. The stamps are cleared when the hold
starts; changes during the hold are counted again, so a backend still flapping when the
hold ends is held again at its next change. When the hold ends, the backend takes its
current verdict. Defaults: more than 4 changes in 60 s -> held down 120 s, i.e. two full
down/up cycles per minute are tolerated, the third is not. ``max_changes=0`` disables.

A backend starts ``up`` (keepalived's default; the agent may seed states from the last
published view instead, see :func:`from_view_entry` in the view module), so a cold
start does not send every flow to the sorry backend while the first checks run.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from halb.checks.base import CheckResult

__all__ = [
    "DEFAULT_DAMPING",
    "DEFAULT_THRESHOLDS",
    "NO_DAMPING",
    "BackendHealth",
    "Damping",
    "Health",
    "Thresholds",
    "initial",
    "observe",
    "tick",
]


class Health(enum.StrEnum):
    UP = "up"
    DOWN = "down"
    DRAINING = "draining"
    DAMPED = "damped"


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Consecutive results needed to change the verdict."""

    rise: int = 2
    fall: int = 3

    def __post_init__(self) -> None:
        if self.rise < 1 or self.fall < 1:
            raise ValueError("rise and fall must be at least 1")


@dataclass(frozen=True, slots=True)
class Damping:
    """Hold a flapping backend down: more than ``max_changes`` verdict changes within
    ``window`` seconds -> ``damped`` for ``hold`` seconds. ``max_changes=0`` disables."""

    max_changes: int = 4
    window: float = 60.0
    hold: float = 120.0

    @property
    def enabled(self) -> bool:
        return self.max_changes > 0


DEFAULT_THRESHOLDS = Thresholds()
DEFAULT_DAMPING = Damping()
NO_DAMPING = Damping(max_changes=0)


@dataclass(frozen=True, slots=True)
class BackendHealth:
    """One backend's health as the checks see it (drains are not applied here).

    ``health`` is UP, DOWN or DAMPED; ``since`` is when it last changed and ``reason``
    why (the result that caused the change). ``verdict`` is the rise/fall outcome
    without damping; ``streak`` counts consecutive results against the verdict;
    ``changes`` holds the times of recent verdict changes (for damping).
    """

    health: Health
    since: float
    reason: str
    verdict: bool
    streak: int = 0
    changes: tuple[float, ...] = ()
    damped_until: float | None = None
    last: CheckResult | None = None
    last_at: float | None = None

    @property
    def up(self) -> bool:
        return self.health is Health.UP


def initial(now: float, *, up: bool = True, reason: str = "not checked yet") -> BackendHealth:
    """The state before any result: up by default (see the module docstring)."""
    return BackendHealth(
        health=Health.UP if up else Health.DOWN, since=now, reason=reason, verdict=up
    )


def _health(verdict: bool, damped_until: float | None) -> Health:
    if damped_until is not None:
        return Health.DAMPED
    return Health.UP if verdict else Health.DOWN


def _with_health(state: BackendHealth, health: Health, now: float, reason: str) -> BackendHealth:
    if health is state.health:
        return state
    return replace(state, health=health, since=now, reason=reason)


def tick(state: BackendHealth, now: float) -> BackendHealth:
    """Apply the passage of time alone: end a damping hold that has run out."""
    if state.damped_until is None or now < state.damped_until:
        return state
    released = replace(state, damped_until=None)
    return _with_health(
        released,
        _health(released.verdict, None),
        now,
        f"damping hold ended; checks say {'up' if released.verdict else 'down'}",
    )


def observe(
    state: BackendHealth,
    result: CheckResult,
    now: float,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    damping: Damping = DEFAULT_DAMPING,
) -> BackendHealth:
    """The state after one more check result at ``now``."""
    state = tick(state, now)
    verdict, streak, changes = state.verdict, state.streak, state.changes
    if result.up == verdict:
        streak = 0
    else:
        streak += 1
        needed = thresholds.rise if result.up else thresholds.fall
        if streak >= needed:
            verdict, streak = result.up, 0
            changes = (*changes, now)
    flipped = verdict != state.verdict
    changes = tuple(t for t in changes if t > now - damping.window) if damping.enabled else ()

    damped_until = state.damped_until
    reason = result.reason
    if flipped and damped_until is None and len(changes) > damping.max_changes > 0:
        damped_until = now + damping.hold
        reason = (
            f"flapping: {len(changes)} state changes within {damping.window:g}s; "
            f"held down for {damping.hold:g}s"
        )
        changes = ()
    elif flipped:
        count = thresholds.rise if verdict else thresholds.fall
        reason = f"{result.reason} ({count} in a row)"

    new = replace(
        state,
        verdict=verdict,
        streak=streak,
        changes=changes,
        damped_until=damped_until,
        last=result,
        last_at=now,
    )
    return _with_health(new, _health(verdict, damped_until), now, reason)
