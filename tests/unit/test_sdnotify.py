"""sd_notify against a real AF_UNIX datagram socket, as systemd binds it."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from halb.agent import sdnotify


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2.0)
    yield s, path
    s.close()


def _drain(s: socket.socket) -> list[str]:
    s.setblocking(False)
    out: list[str] = []
    while True:
        try:
            out.append(s.recv(4096).decode())
        except BlockingIOError:
            return out


def test_send_reaches_socket(sock: tuple[socket.socket, str]) -> None:
    s, path = sock
    n = sdnotify.Notifier({"NOTIFY_SOCKET": path})
    assert n.send("READY=1", "STATUS=x")
    assert s.recv(4096) == b"READY=1\nSTATUS=x"


def test_abstract_socket() -> None:
    name = f"halbt-notify-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    try:
        s.settimeout(2.0)
        assert sdnotify.Notifier({"NOTIFY_SOCKET": "@" + name}).send("WATCHDOG=1")
        assert s.recv(64) == b"WATCHDOG=1"
    finally:
        s.close()


def test_unset_is_noop_and_missing_socket_is_reported(tmp_path: Path) -> None:
    assert not sdnotify.Notifier({}).enabled
    assert not sdnotify.Notifier({}).send("READY=1")
    assert not sdnotify.Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).send("READY=1")


def test_watchdog_interval() -> None:
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
    mine = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert sdnotify.watchdog_interval(mine) == 0.5
    assert sdnotify.watchdog_interval({**mine, "WATCHDOG_PID": "1"}) is None


def test_serve_ready_after_join_then_watchdog(sock: tuple[socket.socket, str]) -> None:
    s, path = sock
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"}  # ping every 50 ms
    joined = False

    async def main() -> list[str]:
        nonlocal joined
        task = asyncio.create_task(sdnotify.serve(lambda: joined, env=env, poll=0.01))
        await asyncio.sleep(0.2)
        before = _drain(s)
        assert not any("READY=1" in m for m in before)
        assert "WATCHDOG=1" in before  # pinged while still joining
        joined = True
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return _drain(s)

    after = asyncio.run(main())
    assert after[0].startswith("READY=1")
    assert 3 <= after.count("WATCHDOG=1") <= 8
    assert after[-1] == "STOPPING=1"


def test_serve_without_socket_returns() -> None:
    asyncio.run(asyncio.wait_for(sdnotify.serve(lambda: False, env={}), 1.0))
