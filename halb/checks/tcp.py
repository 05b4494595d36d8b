"""TCP connect check: up when a connection to the backend's port is accepted."""

from __future__ import annotations

import asyncio
import contextlib
import time

from halb.checks.base import CheckResult, error_reason, host_port
from halb.model import IPAddress

__all__ = ["TcpChecker"]


class TcpChecker:
    """Connect, then close at once (no payload; the server sees an empty connection)."""

    def __init__(self, address: IPAddress | str, port: int) -> None:
        self.address = str(address)
        self.port = port

    @property
    def target(self) -> str:
        return f"tcp {host_port(self.address, self.port)}"

    async def check(self, timeout: float) -> CheckResult:
        start = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                _reader, writer = await asyncio.open_connection(self.address, self.port)
        except (OSError, TimeoutError) as exc:
            return CheckResult(False, error_reason(exc, timeout), time.monotonic() - start)
        latency = time.monotonic() - start
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return CheckResult(True, "connected", latency)
