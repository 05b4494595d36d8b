"""UDP check: send a payload, expect a reply datagram.

A connected UDP socket lets the kernel report an ICMP port unreachable as
ECONNREFUSED, so a stopped service is reported at once as "port unreachable" rather
than as a timeout. (The kernel rate-limits ICMP errors per destination, except on
loopback, so a burst of checks may see a timeout instead; both are down.) A server
that drops the datagram silently is down only after ``timeout``.
"""

from __future__ import annotations

import asyncio
import time

from halb.checks.base import CheckResult, error_reason, host_port
from halb.model import IPAddress

__all__ = ["DEFAULT_PAYLOAD", "UdpChecker"]

DEFAULT_PAYLOAD = b"halb-check\n"


class _Reply(asyncio.DatagramProtocol):
    def __init__(self, future: asyncio.Future[bytes]) -> None:
        self.future = future

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if not self.future.done():
            self.future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class UdpChecker:
    """``expect``: bytes the reply must contain (None: any reply is up)."""

    def __init__(
        self,
        address: IPAddress | str,
        port: int,
        *,
        payload: bytes = DEFAULT_PAYLOAD,
        expect: bytes | None = None,
    ) -> None:
        self.address = str(address)
        self.port = port
        self.payload = payload
        self.expect = expect

    @property
    def target(self) -> str:
        return f"udp {host_port(self.address, self.port)}"

    async def check(self, timeout: float) -> CheckResult:
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[bytes] = loop.create_future()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Reply(reply), remote_addr=(self.address, self.port)
            )
        except OSError as exc:
            return CheckResult(False, error_reason(exc), time.monotonic() - start)
        try:
            transport.sendto(self.payload)
            async with asyncio.timeout(timeout):
                data = await reply
        except ConnectionRefusedError:
            return CheckResult(False, "port unreachable (ICMP)", time.monotonic() - start)
        except TimeoutError:
            return CheckResult(False, f"no reply within {timeout:g}s", time.monotonic() - start)
        except OSError as exc:
            return CheckResult(False, error_reason(exc), time.monotonic() - start)
        finally:
            transport.close()
        latency = time.monotonic() - start
        if self.expect is not None and self.expect not in data:
            return CheckResult(
                False, f"reply lacks {self.expect.decode(errors='replace')!r}", latency
            )
        return CheckResult(True, "reply received", latency)
