"""The clock the HA code reads: monotonic seconds and sleeping.

Injected everywhere timing matters (keepalive cadence, fence deadline, announce
interval, preempt hold-down) so the logic is tested with halb.testing.clock.FakeClock
and run for real with MonotonicClock.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "MonotonicClock"]


@runtime_checkable
class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale (only differences mean anything)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep for ``seconds`` (<= 0 just yields to the event loop)."""
        ...


class MonotonicClock:
    """CLOCK_MONOTONIC and asyncio.sleep."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
