"""The node's status document in etcd, kept on a lease of its own so it vanishes with
the agent. Errors are logged and retried: status is for people and never takes VIP
ownership down with it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from halb.aio import within
from halb.etcd import EtcdClient, EtcdError

__all__ = ["STATUS_INTERVAL", "publish_status"]

log = logging.getLogger("halb.agent")

# Published at least this often, and at once when ``dirty`` is set.
STATUS_INTERVAL = 1.0


async def publish_status(
    client: EtcdClient,
    key: bytes,
    ttl: int,
    render: Callable[[], bytes],
    dirty: asyncio.Event,
) -> None:
    """Until cancelled: put ``render()`` at ``key`` on a lease of ``ttl`` seconds."""
    lease: int | None = None
    while True:
        try:
            if lease is None or await client.keepalive(lease) <= 0:  # 0: expired meanwhile
                lease = (await client.grant(ttl)).id
            await client.put(key, render(), lease=lease)
        except (TimeoutError, EtcdError, OSError) as exc:
            log.debug("status publish failed: %s", exc)
            lease = None
        except Exception:
            log.exception("status publish failed unexpectedly")
            lease = None
        dirty.clear()
        with contextlib.suppress(TimeoutError):
            await within(dirty.wait(), STATUS_INTERVAL)
