"""Run code inside a named network namespace from a thread of this process.

The agent itself runs inside its namespace (``ip netns exec``) and never needs this.
Tests and the lab do: a network namespace is a per-thread attribute, so a thread that
calls setns(2) on ``/run/netns/<name>`` creates every socket (netlink, AF_PACKET, TCP)
in that namespace while the rest of the process stays where it was. (Python 3.11 has
no os.setns; pyroute2's ``netns=`` spawns a helper process per socket.)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

__all__ = ["entered", "in_netns", "run_in_netns", "setns"]

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def setns(name: str) -> None:
    """Move the *calling thread* into network namespace ``name``."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """``fn()`` inside ``netns`` (here when None) on a throwaway thread; its exception
    is re-raised in the caller. The thread ends after fn, so no pooled thread is ever
    left in another namespace; a socket fn creates stays in ``netns`` for its life."""
    if netns is None:
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            setns(netns)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=run, name=f"netns-{netns}")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Switch the calling thread into ``name`` and back on exit: sockets created inside
    stay in ``name`` for good. Keep the block short and create no threads in it (a
    thread inherits the namespace it was created in; gRPC's pollers are threads)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(name)
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back: {os.strerror(err)}")
    finally:
        os.close(home)


def run_in_netns(name: str, fn: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    """Run the coroutine ``fn()`` on a fresh event loop in a thread inside ``name``;
    return its result or raise its exception. Blocks the caller."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            setns(name)

            async def main() -> T:
                return await fn()

            result.append(asyncio.run(main()))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"code in netns {name} still running after {timeout}s")
    if error:
        raise error[0]
    return result[0]
