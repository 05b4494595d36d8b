"""What every checker shares: the result type, the checker protocol, error wording.

A checker answers one question — is this backend serving? — with ``up`` and a short
reason. It decides nothing else: rise/fall counting, damping and what the dataplane
does about it live in :mod:`halb.checks.state` and :mod:`halb.checks.view`.

Reasons are stable strings (``"connected"``, ``"HTTP 200"``, ``"connection refused"``),
never containing latencies or times, so that a published view only changes when
something meaningful changed. The latency travels separately in the result.
"""

from __future__ import annotations

import errno
import ssl
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from halb.model import IPAddress

__all__ = ["CheckResult", "Checker", "error_reason", "host_port"]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One probe's outcome. ``latency`` is seconds from start to verdict."""

    up: bool
    reason: str
    latency: float = 0.0


@runtime_checkable
class Checker(Protocol):
    """One probe of one backend.

    ``check`` must return within roughly ``timeout`` seconds and should not raise: a
    failure is a ``CheckResult(up=False, ...)``. The scheduler still guards every call
    (its own deadline, and any exception becomes a down result), so a buggy checker
    cannot stop the others or the agent.
    """

    @property
    def target(self) -> str:
        """What is probed, for logs: ``"tcp 10.0.0.21:80"``."""
        ...

    async def check(self, timeout: float) -> CheckResult: ...


_ERRNO_WORDS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "timed out",
    errno.EPIPE: "connection closed by peer",
}


def error_reason(exc: BaseException, timeout: float | None = None) -> str:
    """A short, stable description of why a probe failed."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s" if timeout is not None else "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate rejected: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.errno in _ERRNO_WORDS:
        return _ERRNO_WORDS[exc.errno]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def host_port(address: IPAddress | str, port: int) -> str:
    """``10.0.0.1:80`` or ``[fd00::1]:80``."""
    text = str(address)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"
