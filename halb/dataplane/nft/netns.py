"""Namespace plumbing for the nft adapter: run a call, a command or a sysctl write in a
named network namespace (/run/netns/NAME), or in the current one when the name is None.

setns(2) only moves the calling thread and Python 3.11 has no os.setns, so a call runs
on a throwaway thread; a socket created there stays in that namespace for its life.
"""

from __future__ import annotations

from halb.net.netns import in_netns

__all__ = ["in_netns", "nft_argv", "read_sysctl", "write_sysctl"]


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
