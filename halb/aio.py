"""asyncio helpers shared by the agent's loops.

``within`` replaces ``asyncio.wait_for`` in every loop that must stop when cancelled:
on Python 3.11, ``wait_for`` swallows a cancellation that arrives just as the awaited
call completes (it returns the call's result instead; fixed in 3.12, gh-86296), and a
loop that carries on after that never ends. Found as an agent that hung handing over:
its 50 ms heartbeat loop, cancelled with the term, kept beating.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable
from typing import Any, TypeVar

__all__ = ["Backoff", "cancel_and_wait", "within"]

T = TypeVar("T")


async def within(aw: Awaitable[T], seconds: float | None) -> T:
    """``await aw``, raising TimeoutError after ``seconds`` (None: no limit); a
    cancellation of the caller always propagates."""
    async with asyncio.timeout(seconds):
        return await aw


async def cancel_and_wait(
    task: asyncio.Task[Any] | None,
    log: logging.Logger,
    failure: str,
    *args: object,
    again: float | None = None,
) -> None:
    """Cancel ``task`` and wait until it has ended. A failure of its own (anything but
    the cancellation) is logged with ``failure % args`` and its traceback, not raised.

    ``again``: cancel it again every ``again`` seconds while it runs on. Only for a
    task whose every step may be interrupted (no cleanup that a second cancellation
    would cut short): a loop around grpc.aio calls can swallow a cancellation that
    lands as its call fails, and would otherwise retry for ever while we wait."""
    if task is None:
        return
    task.cancel()
    if again is not None:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=again)
            if not done:
                log.warning("%s survived a cancellation; cancelling it again", task.get_name())
                task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:
        log.exception(failure, *args)


class Backoff:
    """Exponential backoff with jitter: 0.1 s doubling to ``cap``."""

    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        self.first = first
        self.cap = cap
        self._next = first

    def reset(self) -> None:
        self._next = self.first

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay * random.uniform(0.8, 1.0)
