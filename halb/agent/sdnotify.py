"""systemd's notify protocol (sd_notify) without a library: readiness and the watchdog.

systemd passes ``NOTIFY_SOCKET`` (an AF_UNIX datagram socket path; a leading ``@`` means
the abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` /
``WATCHDOG_PID``. Outside systemd neither is set and every call here does nothing, so
the agent runs the same from a shell, a test or a unit.

The watchdog ping comes from the agent's own event loop (``serve``), never from a
thread: a stalled loop stops the pings and systemd restarts the agent. That is safe
because a frozen leader's VIP lifetime and dead-man switch have already withdrawn it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

__all__ = ["Notifier", "serve", "watchdog_interval"]

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify datagrams to ``NOTIFY_SOCKET``; a no-op when it is unset."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket: its address starts with a NUL byte.
        self.address: str | None = ("\0" + path[1:]) if path.startswith("@") else (path or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False when it could not be sent."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            # systemd gone or the socket not writable: the agent keeps working.
            log.warning("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of WatchdogSec, as sd_watchdog_enabled
    advises), or None when the watchdog is off or meant for another process."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6


async def serve(
    joined: Callable[[], bool],
    notifier: Notifier | None = None,
    env: Mapping[str, str] | None = None,
    poll: float = 0.05,
) -> None:
    """READY=1 once ``joined()`` is true, then WATCHDOG=1 from this loop until cancelled;
    STOPPING=1 when cancelled (the agent is handing over)."""
    n = notifier or Notifier(env)
    if not n.enabled:
        return
    interval = watchdog_interval(env)
    loop = asyncio.get_running_loop()
    pinged = loop.time()
    try:
        while not joined():
            # Joining can outlast WatchdogSec on a slow etcd: keep pinging meanwhile.
            if interval is not None and loop.time() - pinged >= interval:
                n.send("WATCHDOG=1")
                pinged = loop.time()
            await asyncio.sleep(poll)
        n.send("READY=1", "STATUS=joined every VIP group")
        log.info("systemd notified: ready")
        if interval is None:
            return
        while True:
            n.send("WATCHDOG=1")
            await asyncio.sleep(interval)
    except asyncio.CancelledError:
        n.send("STOPPING=1")
        raise
