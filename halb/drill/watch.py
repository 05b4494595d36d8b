"""Observing a drilled cluster's leader over time: polls of etcd (halb's own clusters)
or of any blocking probe (peers that keep no leader in etcd)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from halb.agent import etcdio
from halb.config import ClusterConfig

__all__ = [
    "LeaderWatch",
    "PollWatch",
    "read_leader",
]


class LeaderWatch:
    """Polls the group's leader in etcd from a thread; records every change with its
    wall-clock time."""

    def __init__(self, cfg: ClusterConfig, group: str, every: float = 0.05) -> None:
        self.cfg, self.group = cfg, group
        self._setup(every)

    def _setup(self, every: float) -> None:
        self.every = every
        self.changes: list[tuple[float, str | None]] = []
        self.statuses: dict[str, Any] = {}
        # When the last successful read was sent: what etcd showed then is known, what
        # came after it is not (claims later than this cannot be judged).
        self.last_read_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="leader-watch", daemon=True)
        self._first = threading.Event()

    def __enter__(self) -> LeaderWatch:
        self._thread.start()
        self._first.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def current(self) -> str | None:
        return self.changes[-1][1] if self.changes else None

    def _record(self, holder: str | None, sent: float) -> None:
        """One read, sent at ``sent``, showed ``holder``."""
        if not self.changes or self.changes[-1][1] != holder:
            self.changes.append((time.time(), holder))
        self.last_read_at = sent

    def _main(self) -> None:
        asyncio.run(self._poll())

    async def _poll(self) -> None:
        client = etcdio.connect(self.cfg)
        try:
            while not self._stop.is_set():
                sent = time.time()
                try:
                    snap = await asyncio.wait_for(etcdio.read_cluster(client, self.cfg), 2.0)
                except Exception:  # etcd hiccups must not end the drill; try again
                    await asyncio.sleep(self.every)
                    continue
                li = snap.leaders.get(self.group)
                self._record(li.node if li else None, sent)
                self.statuses = {n: s for n, s in snap.statuses.items()}
                self._first.set()
                await asyncio.sleep(self.every)
        finally:
            with contextlib.suppress(Exception):
                await client.close()


class PollWatch(LeaderWatch):
    """A LeaderWatch over any blocking probe (e.g. which node holds the VIP address),
    for clusters that keep no leader in etcd."""

    def __init__(self, probe: Callable[[], str | None], every: float = 0.05) -> None:
        self.probe = probe
        self._setup(every)

    def _main(self) -> None:
        while not self._stop.is_set():
            sent = time.time()
            self._record(self.probe(), sent)
            self._first.set()
            self._stop.wait(self.every)


def read_leader(cfg: ClusterConfig, group: str) -> tuple[str | None, dict[str, Any]]:
    async def main() -> tuple[str | None, dict[str, Any]]:
        client = etcdio.connect(cfg)
        try:
            snap = await etcdio.read_cluster(client, cfg)
        finally:
            await client.close()
        li = snap.leaders.get(group)
        return (li.node if li else None), dict(snap.statuses)

    return asyncio.run(main())
