"""Run a function inside a named network namespace (/run/netns/NAME) on a throwaway
thread: setns(2) only moves the calling thread, and Python 3.11 has no os.setns."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from halb.dataplane.xdp.libbpf import libc

__all__ = ["CLONE_NEWNET", "in_netns"]

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """``fn()`` in ``netns`` (or here when None); its exception is re-raised here."""
    if netns is None:
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    # The thread dies after fn, so no pooled thread is ever left in another namespace.
    t = threading.Thread(target=run, name=f"netns-{netns}")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]
