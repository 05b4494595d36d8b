"""Interface tracking: a node whose VIP interface is down must not hold the VIP.

Like keepalived's track_interface: when the interface goes down the agent drains
itself (hands over every group it holds, campaigns for none) and undrains when it comes
back, unless an operator drained it. Polls operstate: cheap, and it sees the namespace
the agent runs in (`ip netns exec` mounts that namespace's /sys).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

__all__ = ["link_is_up", "watch_link"]

log = logging.getLogger(__name__)


def link_is_up(interface: str, sysfs: Path = Path("/sys/class/net")) -> bool:
    try:
        state = (sysfs / interface / "operstate").read_text().strip()
    except OSError:
        return False
    # "unknown" is what drivers without carrier reporting (lo, some tunnels) say.
    return state in ("up", "unknown")


async def watch_link(
    interface: str,
    on_change: Callable[[bool], None],
    interval: float = 0.05,
    sysfs: Path = Path("/sys/class/net"),
) -> None:
    """Call ``on_change(up)`` on every change; the first call only if it starts down."""
    last = True
    first = True
    while True:
        up = link_is_up(interface, sysfs)
        if up != last or (first and not up):
            log.warning("interface %s is %s", interface, "up" if up else "DOWN")
            on_change(up)
            last = up
        first = False
        await asyncio.sleep(interval)
