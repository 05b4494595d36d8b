"""etcd adapter for the backend view and operator drains (halb.etcd).

Keys (``P`` = ``<etcd.prefix>/<cluster>``)::

    P/health/view                                   HealthView.to_json(): revision, node,
                                                    term, backends. Written by the active
                                                    node, read/watched by every node.
    P/drain-backend/<vip:port/proto>/<backend>      present = operator drain; value
                                                    Drain.to_json() ({reason, since, by}).
                                                    Written by `halb backend drain`.

Active node (inside its term's task group; returns when the term is lost)::

    pub = HealthPublisher(client, HealthKeys.from_config(cfg), node="lb1", term=str(term),
                          guard=LeaderGuard(leader_key, term.revision))
    tg.create_task(run_publisher(pub, cfg.services, sched))

or by hand: ``view = await pub.publish(services, sched.states(), drains)``.

``publish`` builds the next view (:func:`halb.checks.view.next_view`), writes it only when
it changed, and — with a guard — only while the leader key still has the term's create
revision, so a deposed leader cannot overwrite its successor's view.

Every node (standbys, and the active for its own dataplane)::

    async for view in watch_views(client, keys):
        services = effective_services(cfg.services(), view)   # -> dataplane

    async for drains in watch_drains(client, keys):          # active only: input of
        ...                                                  # the next publish

Both watches read the current value first (yielded at once), then follow changes
(halb.etcd.read_then_watch: resumed across etcd member failures, re-read after a
compaction; other etcd errors re-read with backoff), so a consumer only ever sees a
stream of values (duplicates suppressed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass

from halb.aio import Backoff
from halb.checks.scheduler import CheckScheduler
from halb.checks.state import BackendHealth
from halb.checks.view import (
    Drain,
    HealthView,
    ViewError,
    build_backends,
    next_view,
    split_backend_key,
)
from halb.config import ClusterConfig
from halb.etcd import (
    Compare,
    EtcdClient,
    EtcdError,
    EventKind,
    Put,
    Snapshot,
    read_then_watch,
)
from halb.keys import ClusterKeys
from halb.model import Service

__all__ = [
    "HealthKeys",
    "HealthPublisher",
    "LeaderGuard",
    "clear_drain",
    "publish_view",
    "read_drains",
    "read_view",
    "run_publisher",
    "set_drain",
    "watch_drains",
    "watch_views",
]

log = logging.getLogger(__name__)

# Errors that mean "etcd did not answer as hoped, try again later".
_RETRY = (EtcdError, asyncio.TimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class HealthKeys:
    prefix: str
    cluster: str

    @classmethod
    def from_config(cls, cfg: ClusterConfig) -> HealthKeys:
        return cls(cfg.etcd.prefix, cfg.cluster)

    @property
    def view(self) -> bytes:
        return ClusterKeys(self.prefix, self.cluster).health_view

    @property
    def drain_prefix(self) -> bytes:
        return ClusterKeys(self.prefix, self.cluster).backend_drain_prefix

    def drain(self, backend_key: str) -> bytes:
        """The drain key of a view key (``10.0.0.100:80/tcp/10.0.0.21:80``)."""
        split_backend_key(backend_key)  # validates
        return self.drain_prefix + backend_key.encode()

    def backend_of(self, etcd_key: bytes) -> str | None:
        """The view key a drain key names, or None for a key that is not one."""
        if not etcd_key.startswith(self.drain_prefix):
            return None
        tail = etcd_key[len(self.drain_prefix) :].decode(errors="replace")
        try:
            split_backend_key(tail)
        except ViewError:
            return None
        return tail


@dataclass(frozen=True, slots=True)
class LeaderGuard:
    """Publish only while ``key`` exists with this create revision (the term)."""

    key: bytes
    create_revision: int


# --- one-shot operations ----------------------------------------------------------------


async def publish_view(
    client: EtcdClient, keys: HealthKeys, view: HealthView, *, guard: LeaderGuard | None = None
) -> bool:
    """Write ``view``; False when the guard failed (we no longer hold the term)."""
    value = view.to_json()
    if guard is None:
        await client.put(keys.view, value)
        return True
    result = await client.txn(
        [Compare.create(guard.key, "==", guard.create_revision)], [Put(keys.view, value)]
    )
    return result.succeeded


async def read_view(client: EtcdClient, keys: HealthKeys) -> HealthView | None:
    """The published view, None when none was published. Raises ViewError if unreadable."""
    got = await client.get(keys.view)
    return None if got is None else HealthView.from_json(bytes(got.value))


def _drain_value(key: str, value: bytes) -> Drain | None:
    try:
        return Drain.from_json(value)
    except ViewError as exc:
        log.warning("ignoring drain key for %s: %s", key, exc)
        return None


async def read_drains(client: EtcdClient, keys: HealthKeys) -> dict[str, Drain]:
    drains, _ = await _read_drains(client, keys)
    return drains


async def _read_drains(client: EtcdClient, keys: HealthKeys) -> tuple[dict[str, Drain], int]:
    got = await client.range(keys.drain_prefix, prefix=True)
    drains: dict[str, Drain] = {}
    for kv in got:
        key = keys.backend_of(bytes(kv.key))
        if key is None:
            continue
        drain = _drain_value(key, bytes(kv.value))
        if drain is not None:
            drains[key] = drain
    return drains, got.revision


async def set_drain(client: EtcdClient, keys: HealthKeys, backend_key: str, drain: Drain) -> None:
    await client.put(keys.drain(backend_key), drain.to_json())


async def clear_drain(client: EtcdClient, keys: HealthKeys, backend_key: str) -> bool:
    """Remove a drain; False when there was none."""
    result = await client.delete(keys.drain(backend_key))
    return result.deleted > 0


# --- the active node's publisher ----------------------------------------------------------


class HealthPublisher:
    """Turns checker states into published views for one term.

    The first ``publish`` reads the view already in etcd, so revisions keep increasing
    across terms and an unchanged view is not rewritten by a new active node except to
    stamp its own node and term.
    """

    def __init__(
        self,
        client: EtcdClient,
        keys: HealthKeys,
        *,
        node: str,
        term: str,
        guard: LeaderGuard | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.node = node
        self.term = term
        self.guard = guard
        self.current: HealthView | None = None
        self._loaded = False
        # Two concurrent publishes would both derive revision n+1 from the same view.
        self._lock = asyncio.Lock()

    async def publish(
        self,
        services: list[Service],
        states: Mapping[str, BackendHealth],
        drains: Mapping[str, Drain],
    ) -> HealthView | None:
        """Publish the view for these inputs if it changed; return the view in force,
        or None when the guard refused (this node lost its term: stop publishing).
        etcd errors propagate (halb.etcd.EtcdError, TimeoutError): retry on the next change.
        """
        async with self._lock:
            return await self._publish(services, states, drains)

    async def _publish(
        self,
        services: list[Service],
        states: Mapping[str, BackendHealth],
        drains: Mapping[str, Drain],
    ) -> HealthView | None:
        if not self._loaded:
            try:
                self.current = await read_view(self.client, self.keys)
            except ViewError as exc:
                log.warning("published health view is unreadable (%s); replacing it", exc)
                self.current = None
            self._loaded = True
        backends = build_backends(services, states, drains)
        view = next_view(self.current, backends, node=self.node, term=self.term)
        if view is self.current:
            return view
        if not await publish_view(self.client, self.keys, view, guard=self.guard):
            log.warning(
                "not publishing health view r%d: term %s no longer holds %s",
                view.revision,
                self.term,
                self.guard.key.decode() if self.guard else "?",
            )
            return None
        changed = _changes(self.current, view)
        log.info("published health view r%d%s", view.revision, f": {changed}" if changed else "")
        self.current = view
        return view


async def run_publisher(
    pub: HealthPublisher,
    services: Callable[[], list[Service]],
    scheduler: CheckScheduler,
    *,
    backoff: Backoff | None = None,
) -> None:
    """The active node's loop: publish whenever a check state or a drain changes.

    Follows the drain keys itself (the first view waits for the first read of them, so
    a new active node does not briefly publish its drains away). ``services()`` is
    called at every publish, so a config reload is picked up at the next change.
    Consumes ``scheduler.wait_changed()`` (one consumer only). Returns when the
    publisher's guard fails (the term is over); cancel it when the term ends.
    etcd errors are logged and retried with backoff.
    """
    backoff = backoff or Backoff()
    drains: dict[str, Drain] = {}
    have_drains = asyncio.Event()
    wake = asyncio.Event()

    async def follow_drains() -> None:
        nonlocal drains
        async for current in watch_drains(pub.client, pub.keys):
            drains = current
            have_drains.set()
            wake.set()

    async def follow_states() -> None:
        while True:
            await scheduler.wait_changed()
            wake.set()

    helpers = [
        asyncio.create_task(follow_drains(), name="health-drains"),
        asyncio.create_task(follow_states(), name="health-states"),
    ]
    try:
        await have_drains.wait()
        wake.set()
        while True:
            await wake.wait()
            wake.clear()
            try:
                view = await pub.publish(services(), scheduler.states(), drains)
            except _RETRY as exc:
                delay = backoff.next()
                log.warning("publishing the health view failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                wake.set()
                continue
            backoff.reset()
            if view is None:
                return
    finally:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)


def _changes(old: HealthView | None, new: HealthView) -> str:
    """A short summary of state changes for the log."""
    before = old.backends if old is not None else {}
    parts = []
    for key in sorted(new.backends):
        b = new.backends[key]
        a = before.get(key)
        if a is None or a.state is not b.state:
            was = a.state.value if a is not None else "new"
            parts.append(f"{key} {was}->{b.state.value} ({b.reason})")
    return "; ".join(parts)


# --- watches ----------------------------------------------------------------------------------


async def watch_views(
    client: EtcdClient, keys: HealthKeys, *, backoff: Backoff | None = None
) -> AsyncGenerator[HealthView, None]:
    """The current view, then every new one; survives etcd member failures and
    restarts. Unreadable values are logged and skipped (the previous view stays in
    force)."""
    backoff = backoff or Backoff()
    last: HealthView | None = None
    while True:
        try:
            async for item in read_then_watch(client, keys.view):
                backoff.reset()
                if isinstance(item, Snapshot):
                    kv = item.first()
                    value = kv.value if kv is not None else None
                else:
                    value = item.kv.value if item.kind is EventKind.PUT else None
                if value is None:
                    continue
                view = _parse_view(value)
                if view is not None and view != last:
                    last = view
                    yield view
        except _RETRY as exc:
            delay = backoff.next()
            log.warning("health view watch interrupted (%s); re-reading in %.2fs", exc, delay)
            await asyncio.sleep(delay)


def _parse_view(value: bytes) -> HealthView | None:
    try:
        return HealthView.from_json(value)
    except ViewError as exc:
        log.warning("ignoring unreadable health view: %s", exc)
        return None


async def watch_drains(
    client: EtcdClient, keys: HealthKeys, *, backoff: Backoff | None = None
) -> AsyncGenerator[dict[str, Drain], None]:
    """All drains now, then the full set again after every change; survives etcd
    member failures and restarts."""
    backoff = backoff or Backoff()
    last: dict[str, Drain] | None = None
    while True:
        try:
            drains: dict[str, Drain] = {}
            async for item in read_then_watch(client, keys.drain_prefix, prefix=True):
                backoff.reset()
                if isinstance(item, Snapshot):
                    drains = {}
                    for kv in item.kvs:
                        key = keys.backend_of(kv.key)
                        drain = _drain_value(key, kv.value) if key is not None else None
                        if key is not None and drain is not None:
                            drains[key] = drain
                else:
                    key = keys.backend_of(item.kv.key)
                    if key is None:
                        continue
                    if item.kind is EventKind.PUT:
                        drain = _drain_value(key, item.kv.value)
                        if drain is not None:
                            drains[key] = drain
                    else:
                        drains.pop(key, None)
                if drains != last:
                    last = dict(drains)
                    yield dict(drains)
        except _RETRY as exc:
            delay = backoff.next()
            log.warning("drain watch interrupted (%s); re-reading in %.2fs", exc, delay)
            await asyncio.sleep(delay)
