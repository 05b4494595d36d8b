"""The gRPC channel to an etcd cluster: endpoints, options, member rotation.

One channel dials every member (target ``ipv4:A:2379,B:2379,C:2379``, pick_first):
gRPC itself moves on from a refused (dead) member. A *hung* member keeps its TCP
connection open and never answers, which gRPC does not notice for seconds; the client
then calls :meth:`Channels.rotate`, which opens a new channel with that member tried
last. The options are PLATFORM.md's measured ones ("etcd client"); names are resolved
once, at start, because the ``ipv4:`` target takes addresses only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import grpc
import grpc.aio

__all__ = [
    "Channels",
    "Member",
    "TlsFiles",
    "channel_options",
    "closed_under_us",
    "parse_endpoints",
    "resolve",
    "target",
]

log = logging.getLogger(__name__)

_GRACE = 0.1  # seconds an abandoned channel's calls may finish; its streams then re-open


@dataclass(frozen=True, slots=True)
class Member:
    """One endpoint: ``host`` as written, ``address`` once resolved (an IP)."""

    host: str
    port: int
    address: str = ""

    @property
    def dial(self) -> str:
        addr = self.address or self.host
        return f"[{addr}]:{self.port}" if ":" in addr else f"{addr}:{self.port}"

    def __str__(self) -> str:
        return self.dial


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None


def parse_endpoints(
    urls: Sequence[str], *, field: str = "etcd.endpoints"
) -> tuple[bool, list[Member]]:
    """(uses TLS, members) from ``http(s)://host:port`` URLs; one scheme for all."""
    if not urls:
        raise ValueError(f"{field}: no etcd endpoint given")
    schemes: set[str] = set()
    members: list[Member] = []
    for i, url in enumerate(urls):
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"{field}[{i}]: {url!r} is not http://host:port or https://host:port")
        try:
            port = parsed.port or 2379
        except ValueError as exc:
            raise ValueError(f"{field}[{i}]: {url!r}: {exc}") from None
        schemes.add(parsed.scheme)
        members.append(Member(parsed.hostname, port))
    if len(schemes) > 1:
        raise ValueError(f"{field}: mixes http:// and https:// endpoints; use one scheme for all")
    return schemes == {"https"}, members


def resolve(members: Sequence[Member], *, field: str = "etcd.endpoints") -> list[Member]:
    """Each member with its address (names looked up now, IPv4 preferred)."""
    out: list[Member] = []
    for i, m in enumerate(members):
        try:
            ipaddress.ip_address(m.host)
            out.append(Member(m.host, m.port, m.host))
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(m.host, m.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ValueError(f"{field}[{i}]: cannot resolve {m.host!r}: {exc}") from None
        addrs = [str(info[4][0]) for info in infos]
        v4 = [a for a in addrs if ":" not in a]
        out.append(Member(m.host, m.port, (v4 or addrs)[0]))
    return out


def target(order: Sequence[Member]) -> str:
    """The gRPC target naming every member in this order (one address family)."""
    families = {":" in (m.address or m.host) for m in order}
    if len(families) > 1:
        raise ValueError("etcd.endpoints: mixes IPv4 and IPv6 members; gRPC needs one family")
    scheme = "ipv6" if families == {True} else "ipv4"
    return f"{scheme}:" + ",".join(m.dial for m in order)


def channel_options(server_name: str | None = None) -> list[tuple[str, str | int]]:
    opts: list[tuple[str, str | int]] = [
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"pick_first": {}}]})),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.keepalive_time_ms", 5000),  # not below etcd's --grpc-keepalive-min-time
        ("grpc.keepalive_timeout_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.ping_timeout_ms", 1000),
        # A new channel must not share the old one's connection to a hung member.
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.enable_retries", 0),  # the client's own policy decides
    ]
    if server_name:
        opts += [
            ("grpc.ssl_target_name_override", server_name),
            ("grpc.default_authority", server_name),
        ]
    return opts


def _credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    def read(path: Path | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ValueError(
                f"etcd.tls.{what}: cannot read {str(path)!r}: {exc.strerror}"
            ) from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(tls.ca, "ca"),
        private_key=read(tls.key, "key"),
        certificate_chain=read(tls.cert, "cert"),
    )


def closed_under_us() -> bool:
    """Inside ``except asyncio.CancelledError`` around a gRPC call: True when the
    cancellation came from the channel being closed (grpc.aio raises CancelledError in
    the caller then), not from someone cancelling this task."""
    task = asyncio.current_task()
    return task is None or task.cancelling() == 0


class Channels:
    """The current channel and the member order behind it.

    ``generation`` counts channels; a caller that saw a member fail passes the
    generation it used to :meth:`rotate`, so several callers noticing the same fault
    rotate once.
    """

    def __init__(self, members: Sequence[Member], tls: TlsFiles | None = None) -> None:
        if not members:
            raise ValueError("etcd.endpoints: no etcd endpoint given")
        self.order = list(members)
        self.tls = tls
        self._creds = _credentials(tls) if tls is not None else None
        self.generation = 0
        self.channel = self._open()
        self._closing: set[asyncio.Task[None]] = set()
        self._old: list[grpc.aio.Channel] = []
        self.closed = False

    def _open(self) -> grpc.aio.Channel:
        tgt = target(self.order)
        opts = channel_options(self.tls.server_name if self.tls else None)
        if self._creds is not None:
            return grpc.aio.secure_channel(tgt, self._creds, options=opts)
        return grpc.aio.insecure_channel(tgt, options=opts)

    @property
    def preferred(self) -> Member:
        return self.order[0]

    def rotate(self, generation: int, reason: str, bad: Member | None = None) -> bool:
        """Demote ``bad`` (the member seen serving, else the preferred one) and open a
        new channel; False if another caller already rotated past ``generation`` (or
        the client is closed)."""
        if generation != self.generation or self.closed or len(self.order) < 2:
            return False
        if bad is None or bad not in self.order:
            bad = self.order[0]
        self.order.remove(bad)
        self.order.append(bad)
        old = self.channel
        self.channel = self._open()
        self.generation += 1
        log.warning("etcd member %s: %s; now trying %s first", bad, reason, self.order[0])
        self._old.append(old)
        task = asyncio.get_running_loop().create_task(self._close_later(old))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return True

    async def _close_later(self, channel: grpc.aio.Channel) -> None:
        # Calls still running on it end (CancelledError in the caller, see
        # closed_under_us) and are retried on the new one.
        await channel.close(grace=_GRACE)
        with contextlib.suppress(ValueError):
            self._old.remove(channel)

    async def close(self) -> None:
        self.closed = True
        for task in list(self._closing):
            task.cancel()
        for channel in [*self._old, self.channel]:
            with contextlib.suppress(Exception):
                await channel.close(grace=None)
        self._old.clear()
