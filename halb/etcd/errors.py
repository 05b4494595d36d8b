"""etcd errors: what a gRPC status means for the caller (pure).

etcd 3.4 reports its own conditions as gRPC statuses with fixed texts
(``etcdserver/api/v3rpc/rpctypes/error.go``); ``classify`` maps a (code, details) pair
to what the client does next. Only the client retries; callers see either a result
or one of the exceptions below.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc

__all__ = [
    "AuthFailed",
    "Compacted",
    "EtcdError",
    "EtcdUnavailable",
    "LeaseNotFound",
    "PermissionDenied",
    "TlsError",
    "Verdict",
    "classify",
    "diagnose_connect",
]


class EtcdError(Exception):
    """Base of everything halb.etcd raises."""


class EtcdUnavailable(EtcdError):
    """No member answered within the call's overall deadline (the last cause is in the
    message); retrying later may work."""


class LeaseNotFound(EtcdError):
    """The lease named in the request has expired or was revoked."""


class PermissionDenied(EtcdError):
    """The authenticated user's role does not allow this key (or this operation)."""


class AuthFailed(EtcdError):
    """The user name or password was refused, or auth is misconfigured."""


class TlsError(EtcdError):
    """The TLS handshake with the members failed; the message says why."""


class Compacted(EtcdError):
    """A watch asked for a revision etcd has compacted away: re-read, then watch anew."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (etcd keeps revisions from {compact_revision})")
        self.compact_revision = compact_revision


class Action(enum.Enum):
    RETRY = "retry"  # same channel: gRPC itself moves on from a refused member
    ROTATE = "rotate"  # this member is no use now: a new channel, it tried last
    RENEW_TOKEN = "renew-token"  # authenticate again, then retry
    FINAL = "final"  # give the caller the error


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    error: type[EtcdError] = EtcdError


_ROTATE_TEXTS = ("no leader", "leader changed", "not capable", "request timed out", "unhealthy")


def classify(code: grpc.StatusCode, details: str) -> Verdict:
    """What to do about one failed attempt."""
    text = details or ""
    if code == grpc.StatusCode.UNAUTHENTICATED and "invalid auth token" in text:
        return Verdict(Action.RENEW_TOKEN)
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in text:
        return Verdict(Action.FINAL, LeaseNotFound)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return Verdict(Action.FINAL, PermissionDenied)
    if "authentication failed" in text or "user name is empty" in text:
        return Verdict(Action.FINAL, AuthFailed)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Verdict(Action.FINAL, AuthFailed)
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in text:
        return Verdict(Action.FINAL, EtcdError)  # watches handle compaction themselves
    if "context deadline exceeded" in text:
        # etcd's own deadline (a forwarded request, Authenticate through raft) ran
        # out on that member: not an answer about the request.
        return Verdict(Action.ROTATE, EtcdUnavailable)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Verdict(Action.ROTATE, EtcdUnavailable)  # a hung or partitioned member
    if code == grpc.StatusCode.UNAVAILABLE:
        rotate = any(t in text for t in _ROTATE_TEXTS)
        return Verdict(Action.ROTATE if rotate else Action.RETRY, EtcdUnavailable)
    if code == grpc.StatusCode.CANCELLED:
        return Verdict(Action.RETRY, EtcdUnavailable)  # our own channel swap
    if code == grpc.StatusCode.INTERNAL and "from Core" in text:
        # gRPC's own transport ("Internal error from Core": a call started on a
        # channel being closed), not an answer from etcd.
        return Verdict(Action.RETRY, EtcdUnavailable)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "too many requests" in text:
        return Verdict(Action.RETRY, EtcdUnavailable)
    return Verdict(Action.FINAL, EtcdError)


def diagnose_connect(details: str, *, tls: bool, server_name: str | None) -> str | None:
    """A plain-words cause for a failed first connection (gRPC's text buried in
    ``details``), or None when nothing TLS-specific is recognised."""
    text = details or ""
    low = text.lower()
    if "certificate_verify_failed" in low or "unable to get local issuer" in low:
        return "the members' certificates are not signed by etcd.tls.ca (wrong CA?)"
    if "hostname verification" in low or "peer name" in low or "not in peer certificate" in low:
        name = f" {server_name!r}" if server_name else ""
        return (
            f"the members' certificates do not carry the server name{name} (etcd.tls.server_name)"
        )
    # TLS 1.3: the server's "bad certificate" alert arrives after the client's handshake
    # finished, so the client sees it as a record it cannot decrypt.
    if (
        "certificate required" in low
        or "bad_certificate" in low
        or "tsi_data_corrupted" in low
        or "unwrap failed" in low
    ):
        return (
            "the members refused this client's certificate (etcd.tls.cert / key missing, "
            "or not signed by the CA the members trust)"
        )
    if tls and (
        "wrong_version_number" in low
        or "packet_length_too_long" in low
        or "handshake read failed" in low
    ):
        return (
            "the members do not answer TLS: do they speak plaintext (http:// endpoints "
            "without etcd.tls)?"
        )
    if tls and ("ssl" in low or "handshake" in low):
        return f"TLS handshake failed: {text}"
    return None
