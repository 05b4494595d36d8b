"""Exec check: run a command; exit code 0 is up, anything else is down.

No shell: ``command`` is an argv list. ``{address}`` and ``{port}`` inside any argument
are replaced by the backend's address and port (plain text replacement, so other
braces pass through untouched); the environment also carries ``HALB_ADDRESS`` and
``HALB_PORT``. The command runs in its own session; on timeout (or when the check is
cancelled) the whole process group is killed with SIGKILL and reaped, so a hung script
and the children it started do not pile up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Sequence

from halb.checks.base import CheckResult, host_port
from halb.model import IPAddress

__all__ = ["ExecChecker", "expand"]

OUTPUT_LIMIT = 200


def expand(command: Sequence[str], address: str, port: int) -> list[str]:
    return [a.replace("{address}", address).replace("{port}", str(port)) for a in command]


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _first_line(output: bytes) -> str:
    for line in output.decode(errors="replace").splitlines():
        if line.strip():
            return line.strip()[:OUTPUT_LIMIT]
    return ""


class ExecChecker:
    def __init__(self, command: Sequence[str], address: IPAddress | str, port: int) -> None:
        if not command:
            raise ValueError("an exec check needs a command")
        self.address = str(address)
        self.port = port
        self.argv = expand(command, self.address, port)

    @property
    def target(self) -> str:
        return f"exec {self.argv[0]} for {host_port(self.address, self.port)}"

    async def check(self, timeout: float) -> CheckResult:
        start = time.monotonic()
        env = {**os.environ, "HALB_ADDRESS": self.address, "HALB_PORT": str(self.port)}
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        except OSError as exc:
            why = exc.strerror.lower() if exc.strerror else str(exc)
            return CheckResult(False, f"cannot run {self.argv[0]}: {why}", 0.0)
        try:
            async with asyncio.timeout(timeout):
                output, _ = await proc.communicate()
        except TimeoutError:
            _kill_group(proc)
            await _reap(proc)
            return CheckResult(
                False, f"no exit within {timeout:g}s; killed", time.monotonic() - start
            )
        except BaseException:
            # Cancelled with the agent: do not leave the command running.
            _kill_group(proc)
            raise
        latency = time.monotonic() - start
        code = proc.returncode
        assert code is not None
        if code == 0:
            return CheckResult(True, "exit 0", latency)
        reason = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        detail = _first_line(output)
        return CheckResult(False, f"{reason}: {detail}" if detail else reason, latency)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Wait for the killed process and drain its pipe (bounded: a process that escaped
    the group could hold the pipe open)."""
    try:
        async with asyncio.timeout(2.0):
            await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
