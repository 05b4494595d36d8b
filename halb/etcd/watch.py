"""Watches that survive member failures without losing or repeating an event, and the
read-then-watch helper every halb watcher uses.

:class:`Resume` is the bookkeeping (pure): the next revision to ask for, and which
events are new. A watch stream that breaks for any reason (member killed or hung and
the channel rotated, leader lost, token expired) is re-created from ``next`` on the
client's current channel. A watch that etcd cancels because its start revision was
compacted raises :class:`~halb.etcd.errors.Compacted`; ``read_then_watch`` answers that
with a fresh read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from halb.etcd.channel import closed_under_us
from halb.etcd.errors import (
    Action,
    AuthFailed,
    Compacted,
    EtcdError,
    EtcdUnavailable,
    PermissionDenied,
)
from halb.etcd.kv import EventKind, KeyValue, RangeResult, WatchEvent, prefix_end

if TYPE_CHECKING:
    from halb.etcd.client import EtcdClient

__all__ = ["Resume", "Snapshot", "read_then_watch", "watch"]

log = logging.getLogger(__name__)

_RETRY_PAUSE = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class Resume:
    """Where a watch is: ``next`` is the first revision not yet delivered."""

    def __init__(self, start_revision: int) -> None:
        if start_revision < 1:
            raise ValueError(f"watch start revision must be >= 1, not {start_revision}")
        self.next = start_revision

    def accept(self, events: list[WatchEvent]) -> list[WatchEvent]:
        """The events of one response that were not delivered before; afterwards
        ``next`` is past all of them. (etcd sends all events of one revision in one
        response, so a resumed stream repeats whole revisions or none.)"""
        fresh = [e for e in events if e.revision >= self.next]
        if events:
            self.next = max(self.next, max(e.revision for e in events) + 1)
        return fresh


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The result of the read that (re)starts a read_then_watch."""

    revision: int
    kvs: tuple[KeyValue, ...]

    def first(self) -> KeyValue | None:
        return self.kvs[0] if self.kvs else None

    @classmethod
    def of(cls, result: RangeResult) -> Snapshot:
        return cls(result.revision, result.kvs)


def _event(ev: Any) -> WatchEvent:
    kind = EventKind.DELETE if int(ev.type) == 1 else EventKind.PUT
    return WatchEvent(kind, KeyValue.of(ev.kv))


async def watch(
    client: EtcdClient, key: bytes, *, prefix: bool = False, start_revision: int
) -> AsyncIterator[WatchEvent]:
    """Every event on ``key`` (or the prefix) from ``start_revision`` on, until the
    consumer stops iterating. Retries breaks forever; raises Compacted, PermissionDenied
    and other final errors."""
    resume = Resume(start_revision)
    failures = 0
    renewed_for: str | None = None  # the token a denial was last answered with a renewal
    rpc = client.pb.rpc
    range_end = prefix_end(key) if prefix else b""
    while True:
        bound = client.stubs()
        token = client.token
        call = bound.watch.Watch(metadata=client.metadata(), wait_for_ready=True)
        log.debug("watch of %r from %d on channel %d", key, resume.next, bound.generation)
        try:
            create = rpc.WatchCreateRequest(
                key=key, range_end=range_end, start_revision=resume.next
            )
            await call.write(rpc.WatchRequest(create_request=create))
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    log.debug("watch of %r: stream ended; resuming at %d", key, resume.next)
                    break
                if resp.canceled:
                    if resp.compact_revision:
                        raise Compacted(int(resp.compact_revision))
                    reason = str(resp.cancel_reason)
                    if "permission denied" in reason:
                        # A member that never saw our token (restarted: simple tokens
                        # live in memory) denies too: renew once before believing it.
                        if client.settings.user is None or renewed_for == client.token:
                            raise PermissionDenied(f"watch of {key!r}: {reason}")
                        log.info("watch of %r denied; renewing the token once", key)
                        await client.renew_token(token)
                        renewed_for = client.token
                        break
                    if "user name is empty" in reason:
                        raise AuthFailed(f"watch of {key!r}: {reason} (no token, no client CN)")
                    # An expired token: etcd answers created+canceled, then goes quiet.
                    log.info("etcd canceled the watch of %r (%s); re-creating", key, reason)
                    if "auth token" in reason or "auth store" in reason:
                        await client.renew_token(token)
                    break
                failures = 0
                if resp.created and not resp.canceled:
                    renewed_for = None
                client.saw(bound.generation, resp.header)
                for ev in resume.accept([_event(e) for e in resp.events]):
                    yield ev
        except asyncio.CancelledError:
            if not closed_under_us():
                raise
            log.debug("watch of %r: channel replaced; resuming at %d", key, resume.next)
        except grpc.aio.AioRpcError as exc:
            try:
                action = await client.handle(bound.generation, exc)
            except EtcdUnavailable:  # renewing the token found no member: try again
                action = Action.RETRY
            if action is Action.FINAL:
                raise client.error_of(exc) from None
            log.debug("watch of %r broke (%s); resuming at %d", key, exc.code().name, resume.next)
        except (asyncio.InvalidStateError, EtcdError) as exc:
            if isinstance(exc, Compacted | PermissionDenied | AuthFailed):
                raise
            log.debug("watch of %r broke (%s); resuming at %d", key, exc, resume.next)
        finally:
            call.cancel()
        await asyncio.sleep(_RETRY_PAUSE[min(failures, len(_RETRY_PAUSE) - 1)])
        failures += 1


async def read_then_watch(
    client: EtcdClient, key: bytes, *, prefix: bool = False
) -> AsyncIterator[Snapshot | WatchEvent]:
    """A Snapshot (one Range), then every event after it; a new Snapshot whenever the
    watch had to be restarted from a fresh read (compaction). Read failures are
    retried with backoff; final errors (permission denied, auth) propagate."""

    failures = 0
    while True:
        try:
            got = await client.range(key, prefix=prefix)
        except EtcdUnavailable as exc:
            delay = _RETRY_PAUSE[min(failures, len(_RETRY_PAUSE) - 1)]
            failures += 1
            log.warning("read of %r failed (%s); retrying in %.2fs", key, exc, delay)
            await asyncio.sleep(delay)
            continue
        failures = 0
        yield Snapshot.of(got)
        events = watch(client, key, prefix=prefix, start_revision=got.revision + 1)
        try:
            async for ev in events:
                yield ev
        except Compacted as exc:
            log.warning("watch of %r: %s; re-reading", key, exc)
        finally:
            with contextlib.suppress(Exception):
                await events.aclose()  # type: ignore[attr-defined]
