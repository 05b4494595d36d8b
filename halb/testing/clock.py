"""A fake clock for testing timing logic without sleeping.

``FakeClock.sleep`` parks the caller until a test calls ``advance``; ``advance`` moves
time forward in order of deadlines and lets every woken task run before moving on, so
a loop that sleeps, acts and sleeps again sees each of its deadlines in turn.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

from halb.ha.clock import Clock, MonotonicClock

__all__ = ["Clock", "FakeClock", "MonotonicClock"]


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._seq = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        await fut

    @property
    def sleepers(self) -> int:
        """How many sleeps are pending (cancelled ones excluded)."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    async def settle(self, rounds: int = 20) -> None:
        """Let runnable tasks run until the loop is quiet (bounded number of yields)."""
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking sleepers deadline by deadline."""
        target = self._now + seconds
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, when)
            if not fut.done():
                fut.set_result(None)
                await self.settle()
        self._now = target
        await self.settle()
