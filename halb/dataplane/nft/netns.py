"""Namespace plumbing for the nft adapter: run a call, a command or a sysctl write in a
named network namespace (/run/netns/NAME), or in the current one when the name is None.

setns(2) only moves the calling thread and Python 3.11 has no os.setns, so a call runs
on a throwaway thread; a socket created there stays in that namespace for its life.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["in_netns", "nft_argv", "read_sysctl", "write_sysctl"]

CLONE_NEWNET = 0x40000000
T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """``fn()`` inside ``netns``; its exception is re-raised in the caller."""
    if netns is None:
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    # The thread ends after fn, so no pooled thread is ever left in another namespace.
    t = threading.Thread(target=run, name=f"netns-{netns}")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def nft_argv(netns: str | None) -> list[str]:
    return ["nft"] if netns is None else ["ip", "netns", "exec", netns, "nft"]


def _sysctl_path(key: str) -> str:
    return "/proc/sys/" + key.replace(".", "/")


def write_sysctl(netns: str | None, key: str, value: str) -> None:
    # /proc/sys/net resolves to the namespace of the task that opens it.
    def write() -> None:
        with open(_sysctl_path(key), "w") as f:
            f.write(value)

    in_netns(netns, write)


def read_sysctl(netns: str | None, key: str) -> str:
    def read() -> str:
        with open(_sysctl_path(key)) as f:
            return f.read().strip()

    return in_netns(netns, read)
