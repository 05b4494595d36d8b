"""One persistent LeaseKeepAlive stream shared by every lease of a client.

``keepalive(lease)`` sends one request and waits for the answer naming that lease, so
the caller keeps its own cadence (the coordinator renews every TTL/4 and fences on the
send time of the last success). An answer slower than ``slow_ack`` or none within the
attempt timeout means the member is hung or cut off: the client rotates to the next
member and the stream is re-opened there, inside the same call's overall deadline.
etcd answers TTL 0 for a lease that no longer exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from halb.etcd.channel import closed_under_us
from halb.etcd.errors import Action, EtcdUnavailable

if TYPE_CHECKING:
    from halb.etcd.client import EtcdClient

__all__ = ["LeaseKeeper"]

log = logging.getLogger(__name__)


class _Stream:
    def __init__(self, generation: int, call: Any) -> None:
        self.generation = generation
        self.call = call
        self.waiters: dict[int, deque[asyncio.Future[int]]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.write_lock = asyncio.Lock()
        self.dead: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        self.dead = self.dead or exc
        for queue in self.waiters.values():
            for fut in queue:
                if not fut.done():
                    fut.set_exception(exc)
        self.waiters.clear()


class LeaseKeeper:
    def __init__(self, client: EtcdClient) -> None:
        self.client = client
        self._stream: _Stream | None = None

    def _open(self) -> _Stream:
        bound = self.client.stubs()
        call = bound.lease.LeaseKeepAlive(metadata=self.client.metadata(), wait_for_ready=True)
        stream = _Stream(bound.generation, call)
        stream.reader = asyncio.get_running_loop().create_task(
            self._read(stream), name="etcd-lease-keepalive"
        )
        return stream

    async def _read(self, stream: _Stream) -> None:
        try:
            while True:
                resp = await stream.call.read()
                if resp is grpc.aio.EOF:
                    raise EtcdUnavailable("keepalive stream ended")
                queue = stream.waiters.get(int(resp.ID))
                if queue:
                    fut = queue.popleft()
                    if not fut.done():
                        fut.set_result(int(resp.TTL))
        except asyncio.CancelledError:
            stream.fail(EtcdUnavailable("keepalive stream closed"))
            raise
        except BaseException as exc:
            stream.fail(exc)

    def _current(self) -> _Stream:
        s = self._stream
        if s is None or s.dead is not None or s.generation != self.client.channels.generation:
            if s is not None:
                self._discard(s)
            s = self._stream = self._open()
        return s

    def _discard(self, stream: _Stream) -> None:
        stream.fail(EtcdUnavailable("keepalive stream replaced"))
        stream.call.cancel()
        if stream.reader is not None:
            stream.reader.cancel()
        if self._stream is stream:
            self._stream = None

    async def keepalive(self, lease: int, *, timeout: float | None = None) -> int:
        loop = asyncio.get_running_loop()
        settings = self.client.settings
        total = timeout if timeout is not None else settings.call_timeout
        deadline = loop.time() + total
        last = "no attempt made"
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise EtcdUnavailable(
                    f"no keepalive answer for lease {lease:x} within {total:g}s (last: {last})"
                )
            per = min(settings.attempt_per(total), remaining)
            stream = self._current()
            fut: asyncio.Future[int] = loop.create_future()
            stream.waiters.setdefault(lease, deque()).append(fut)
            sent = loop.time()
            try:
                async with asyncio.timeout(per):
                    async with stream.write_lock:
                        await stream.call.write(self.client.pb.rpc.LeaseKeepAliveRequest(ID=lease))
                    ttl = await fut
            except asyncio.CancelledError:
                if not closed_under_us():
                    self._forget(stream, lease, fut)
                    raise
                last = "channel replaced"
                self.client.attempt_failed()
                self._forget(stream, lease, fut)
                self._discard(stream)
                continue
            except TimeoutError:
                last = f"no answer within {per:.2f}s"
                self.client.attempt_failed()
                self._forget(stream, lease, fut)
                await self.client.handle(stream.generation, TimeoutError())
                self._discard(stream)
                continue
            except grpc.aio.AioRpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
                self.client.attempt_failed()
                self._forget(stream, lease, fut)
                self._discard(stream)
                if await self.client.handle(stream.generation, exc) is Action.FINAL:
                    raise self.client.error_of(exc) from None
                await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
                continue
            except (EtcdUnavailable, asyncio.InvalidStateError) as exc:
                # The stream ended under us (channel swapped, member gone): write to a
                # finished grpc.aio stream raises InvalidStateError.
                last = str(exc) or type(exc).__name__
                self.client.attempt_failed()
                self._forget(stream, lease, fut)
                self._discard(stream)
                await asyncio.sleep(min(0.02, max(0.0, deadline - loop.time())))
                continue
            self.client.attempt_ok()
            took = loop.time() - sent
            if took > min(settings.slow_ack, settings.attempt_per(total)):
                self.client.rotate(stream.generation, f"keepalive answered in {took * 1000:.0f} ms")
            return ttl

    @staticmethod
    def _forget(stream: _Stream, lease: int, fut: asyncio.Future[int]) -> None:
        queue = stream.waiters.get(lease)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(fut)
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled():
            # Failed by a replaced stream before its caller awaited it: mark the
            # exception retrieved (the caller reports its own), or asyncio logs it.
            fut.exception()

    async def close(self) -> None:
        if self._stream is not None:
            reader = self._stream.reader
            self._discard(self._stream)
            if reader is not None:
                with contextlib.suppress(BaseException):
                    await reader
