"""Polling until a condition holds, for asyncio tests against real etcd, gRPC and BPF."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["until"]


async def until(
    pred: Callable[[], object], timeout: float = 5.0, what: str = "", every: float = 0.005
) -> float:
    """Wait until ``pred()`` is truthy; return the seconds it took. AssertionError
    naming ``what`` after ``timeout`` seconds."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        await asyncio.sleep(every)
    return time.monotonic() - t0
