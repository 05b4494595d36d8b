"""halb's etcd v3 client: unary KV / Lease / Auth calls under one retry policy.

Every call carries ``hasleader=true`` (a member without a leader refuses at once
instead of hanging) and the auth token, waits for a ready connection, and gets
``attempt_timeout`` per attempt inside an overall deadline (``call_timeout`` unless
the caller gives one). :func:`halb.etcd.errors.classify` decides per failure: retry,
rotate to the next member, renew the token, or give up. Callers see a result or an
:class:`~halb.etcd.errors.EtcdError`; ``EtcdUnavailable`` after the deadline.

A retried write may apply twice (the reply of the first attempt can be lost):
transactions that must not, such as elections, are written create-if-absent and
check the result (halb.ha.coord).

    client = EtcdClient(ClientSettings.of(cfg.etcd))
    await client.check()                 # fail fast: TLS / auth errors in plain words
    await client.put(b"k", b"v")
    ttl = await client.keepalive(lease)  # one persistent LeaseKeepAlive stream
    async for item in read_then_watch(client, b"prefix/", prefix=True): ...
    await client.close()
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlparse

import grpc
import grpc.aio

from halb.etcd import kv as kvmod
from halb.etcd.channel import (
    Channels,
    Member,
    TlsFiles,
    closed_under_us,
    parse_endpoints,
    resolve,
)
from halb.etcd.errors import (
    Action,
    AuthFailed,
    EtcdError,
    EtcdUnavailable,
    TlsError,
    classify,
    diagnose_connect,
)
from halb.etcd.kv import (
    Compare,
    DeleteResult,
    KeyValue,
    LeaseInfo,
    Op,
    PutResult,
    RangeResult,
    TxnResult,
    WatchEvent,
    op_result,
    op_to_pb,
    prefix_end,
)
from halb.etcd.proto import Stubs, load

__all__ = ["ClientSettings", "EtcdClient"]

log = logging.getLogger(__name__)

T = TypeVar("T")

ENV_USER = "HALB_ETCD_USER"
ENV_PASSWORD = "HALB_ETCD_PASSWORD"


@dataclass(slots=True)
class Outages:
    """How the client fared: for status documents and drills (monotonic times)."""

    last_ok: float | None = None  # the latest successful call
    failing_since: float | None = None  # the last success before the current outage
    count: int = 0  # outages that ended in a success
    last_s: float = 0.0  # how long the last one lasted
    last_ended: float = 0.0  # wall-clock time it ended
    # (wall-clock end, seconds) of the latest outages, for drills.
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=16))

    def failed(self, now: float) -> None:
        if self.failing_since is None:
            # From the last answer on: the failed attempt itself may have waited.
            self.failing_since = self.last_ok if self.last_ok is not None else now

    def succeeded(self, now: float, wall: float) -> None:
        self.last_ok = now
        if self.failing_since is not None:
            self.last_s = now - self.failing_since
            self.last_ended = wall
            self.count += 1
            self.recent.append((round(wall, 3), round(self.last_s, 4)))
            self.failing_since = None


@dataclass(frozen=True, slots=True)
class Bound:
    """The stubs of one channel generation."""

    generation: int
    kv: Any
    lease: Any
    watch: Any
    auth: Any
    maintenance: Any
    cluster: Any


@dataclass(frozen=True, slots=True)
class ClientSettings:
    endpoints: tuple[str, ...]
    tls: TlsFiles | None = None
    user: str | None = None
    password: str | None = None
    attempt_timeout: float = 0.3
    call_timeout: float = 2.0
    slow_ack: float = 0.25  # a keepalive answered slower than this: leave the member

    def attempt_per(self, total: float) -> float:
        """One attempt's limit inside a call of ``total`` seconds: ``attempt_timeout``,
        but at most half the call, so one hung member never takes a whole short call
        (the coordinator's heartbeats get a fraction of a second)."""
        return min(self.attempt_timeout, total / 2)

    @classmethod
    def of(
        cls, etcd: Any, *, node: str | None = None, environ: Mapping[str, str] | None = None
    ) -> ClientSettings:
        """From halb.config.EtcdConfig (``{node}`` in TLS paths filled in with ``node``);
        credentials from etcd.auth or the environment (HALB_ETCD_USER /
        HALB_ETCD_PASSWORD, which win)."""
        env = os.environ if environ is None else environ
        tls = None
        if etcd.tls is not None:
            t = etcd.tls.for_node(node) if node is not None else etcd.tls
            for field in ("ca", "cert", "key"):
                if "{node}" in (getattr(t, field) or ""):
                    raise ValueError(
                        f"etcd.tls.{field}: {getattr(t, field)!r} names {{node}}, but no node "
                        "is known here (set HALB_NODE or give --node)"
                    )
            tls = TlsFiles(
                Path(t.ca),
                Path(t.cert) if t.cert else None,
                Path(t.key) if t.key else None,
                t.server_name,
            )
        user = password = None
        auth = getattr(etcd, "auth", None)
        if auth is not None:
            user = auth.user
            if auth.password_file:
                try:
                    password = Path(auth.password_file).read_text().strip()
                except OSError as exc:
                    raise ValueError(
                        f"etcd.auth.password_file: cannot read {auth.password_file!r}: "
                        f"{exc.strerror}"
                    ) from None
        user = env.get(ENV_USER) or user
        password = env.get(ENV_PASSWORD) or password
        if user and password is None:
            raise ValueError(
                f"etcd.auth: user {user!r} has no password (set etcd.auth.password_file or "
                f"{ENV_PASSWORD}; a certificate-named user needs no etcd.auth)"
            )
        return cls(
            tuple(etcd.endpoints),
            tls,
            user,
            password,
            call_timeout=float(getattr(etcd, "dial_timeout", 2.0)),
        )


class EtcdClient:
    """One cluster connection; safe to share between tasks of one event loop."""

    def __init__(self, settings: ClientSettings) -> None:
        uses_tls, members = parse_endpoints(settings.endpoints)
        if uses_tls and settings.tls is None:
            raise ValueError("etcd.tls: https:// endpoints need etcd.tls (at least ca)")
        if settings.tls is not None and not uses_tls:
            raise ValueError("etcd.endpoints: etcd.tls is set but the endpoints are http://")
        self.settings = settings
        self.pb: Stubs = load()
        self.channels = Channels(resolve(members), settings.tls)
        self._stubs: Bound | None = None
        self._token: str | None = None
        self._token_lock = asyncio.Lock()
        self._lease_keeper: Any = None
        self.outages = Outages()
        # Which member answers: etcd member id -> endpoint (from MemberList), and the
        # member seen serving on which channel generation. gRPC may move to another
        # member within one channel (a refused one), so the order alone does not say.
        self._member_ids: dict[int, Member] = {}
        self._serving: tuple[int, Member] | None = None
        self._listing: asyncio.Task[None] | None = None
        self._listed_at = -1e9  # monotonic time of the last MemberList

    @property
    def serving(self) -> Member:
        """The member answering on the current channel (as last seen), else the one
        the channel tries first."""
        s = self._serving
        if s is not None and s[0] == self.channels.generation:
            return s[1]
        return self.channels.preferred

    def saw(self, generation: int, header: Any) -> None:
        """Note which member answered (a reply header's member id; not for keepalives,
        whose replies carry the raft leader's id)."""
        member = self._member_ids.get(int(header.member_id))
        if member is not None:
            self._serving = (generation, member)
        elif (self._listing is None or self._listing.done()) and (
            time.monotonic() - self._listed_at > 5.0  # ids not in the list: do not spin
        ):
            self._listed_at = time.monotonic()
            self._listing = asyncio.get_running_loop().create_task(self._list_members())

    async def _list_members(self) -> None:
        try:
            resp = await self.member_list()
        except EtcdError:
            return
        by_dial = {(m.address, m.port): m for m in self.channels.order}
        for mem in resp.members:
            for url in mem.clientURLs:
                parsed = urlparse(url)
                try:
                    key = (parsed.hostname or "", parsed.port or 2379)
                except ValueError:
                    continue
                if key in by_dial:
                    self._member_ids[int(mem.ID)] = by_dial[key]

    def rotate(self, generation: int, reason: str) -> None:
        """Leave the member serving on channel ``generation``: a new channel, it last."""
        s = self._serving
        bad = s[1] if s is not None and s[0] == generation else None
        self.channels.rotate(generation, reason, bad)

    def report(self) -> dict[str, Any]:
        """The client's state for a status document."""
        o = self.outages
        return {
            "member": str(self.serving),
            "rotations": self.channels.generation,
            "outages": o.count,
            "last_outage_s": round(o.last_s, 4),
            "last_outage_end": o.last_ended,
            "recent_outages": list(o.recent),
        }

    def attempt_failed(self) -> None:
        self.outages.failed(time.monotonic())

    def attempt_ok(self) -> None:
        self.outages.succeeded(time.monotonic(), time.time())

    # -- plumbing shared with the lease and watch streams ----------------------------------

    def stubs(self) -> Bound:
        """The service stubs of the current channel."""
        gen = self.channels.generation
        if self._stubs is None or self._stubs.generation != gen:
            ch = self.channels.channel
            g = self.pb.rpc_grpc
            self._stubs = Bound(
                gen,
                g.KVStub(ch),
                g.LeaseStub(ch),
                g.WatchStub(ch),
                g.AuthStub(ch),
                g.MaintenanceStub(ch),
                g.ClusterStub(ch),
            )
        return self._stubs

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self._token:
            return (("hasleader", "true"), ("token", self._token))
        return (("hasleader", "true"),)

    @property
    def token(self) -> str | None:
        return self._token

    async def renew_token(self, stale: str | None) -> None:
        """Authenticate again unless another task already replaced ``stale``."""
        if self.settings.user is None:
            raise AuthFailed(
                "etcd asks for an auth token, but no user is configured "
                f"(etcd.auth or {ENV_USER} / {ENV_PASSWORD})"
            )
        async with self._token_lock:
            if self._token != stale:
                return
            req = self.pb.rpc.AuthenticateRequest(
                name=self.settings.user, password=self.settings.password or ""
            )
            self._token = None
            try:
                resp = await self._call(lambda s: s.auth.Authenticate, req, None, auth=False)
            except AuthFailed as exc:
                raise AuthFailed(f"etcd refused user {self.settings.user!r}: {exc}") from None
            self._token = str(resp.token)
            log.info("etcd: authenticated as %s", self.settings.user)

    def invalidate_token(self) -> None:
        """The token is no good (e.g. a watch came back canceled): renew at next use."""
        self._token = None

    async def handle(self, gen: int, exc: grpc.aio.AioRpcError | TimeoutError) -> Action:
        """Act on one failed attempt on channel ``gen``: rotate or renew; returns what
        the caller should do next (FINAL: raise)."""
        if isinstance(exc, TimeoutError):
            self.rotate(gen, "no answer within the attempt timeout")
            return Action.ROTATE
        verdict = classify(exc.code(), exc.details() or "")
        if verdict.action is Action.ROTATE:
            self.rotate(gen, exc.details() or exc.code().name)
        elif verdict.action is Action.RENEW_TOKEN:
            await self.renew_token(self._token)
        return verdict.action

    def error_of(self, exc: grpc.aio.AioRpcError) -> EtcdError:
        verdict = classify(exc.code(), exc.details() or "")
        return verdict.error(exc.details() or exc.code().name)

    # -- the retry loop --------------------------------------------------------------------

    async def _call(
        self,
        method: Callable[[Bound], Any],
        request: Any,
        timeout: float | None,
        *,
        auth: bool = True,
    ) -> Any:
        loop = asyncio.get_running_loop()
        total = timeout if timeout is not None else self.settings.call_timeout
        deadline = loop.time() + total
        if auth and self.settings.user is not None and self._token is None:
            await self.renew_token(None)
        last = "no attempt made"
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise EtcdUnavailable(
                    f"no etcd member answered within {total:g}s (last error: {last}; "
                    f"members: {', '.join(str(m) for m in self.channels.order)})"
                )
            stubs = self.stubs()
            per = min(self.settings.attempt_per(total), remaining)
            md = self.metadata() if auth else (("hasleader", "true"),)
            try:
                resp = await method(stubs)(request, timeout=per, metadata=md, wait_for_ready=True)
                self.attempt_ok()
                self.saw(stubs.generation, resp.header)
                return resp
            except asyncio.CancelledError:
                if not closed_under_us():
                    raise
                last = "channel replaced"
                self.attempt_failed()
            except grpc.aio.AioRpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
                action = await self.handle(stubs.generation, exc)
                if action is Action.FINAL:
                    self.attempt_ok()  # etcd answered, with an error
                    raise self.error_of(exc) from None
                self.attempt_failed()
                # A refusal comes back at once (no leader yet, member gone): pause so a
                # client does not spin while etcd elects a leader.
                await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))

    async def check(self, timeout: float | None = None) -> None:
        """Fail fast with a clear cause when no member can be reached: TLS problems
        (wrong CA, missing client certificate, wrong server name, plaintext vs TLS) and
        auth problems. Without this, wait_for_ready turns them into timeouts."""
        total = timeout if timeout is not None else self.settings.call_timeout
        tls = self.settings.tls
        maint = self.stubs().maintenance
        try:
            await maint.Status(
                self.pb.rpc.StatusRequest(),
                timeout=total,
                metadata=(("hasleader", "true"),),
                wait_for_ready=False,
            )
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or exc.code().name
            cause = diagnose_connect(
                details, tls=tls is not None, server_name=tls.server_name if tls else None
            )
            members = ", ".join(str(m) for m in self.channels.order)
            if cause is not None:
                raise TlsError(f"etcd ({members}): {cause}") from None
            if (
                tls is None
                and exc.code() == grpc.StatusCode.UNAVAILABLE
                and ("Socket closed" in details or "Connection reset" in details)
            ):
                raise TlsError(
                    f"etcd ({members}): the members closed a plaintext connection; do they "
                    "expect TLS (https:// endpoints and etcd.tls)?"
                ) from None
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise self.error_of(exc) from None
            raise EtcdUnavailable(f"etcd ({members}) unreachable: {details}") from None
        if self.settings.user is not None:
            await self.renew_token(self._token)

    # -- KV --------------------------------------------------------------------------------

    async def range(
        self, key: bytes, *, prefix: bool = False, timeout: float | None = None
    ) -> RangeResult:
        req = kvmod.Get(key, prefix).request(self.pb.rpc)
        return RangeResult.of(await self._call(lambda s: s.kv.Range, req, timeout))

    async def get(self, key: bytes, *, timeout: float | None = None) -> KeyValue | None:
        return (await self.range(key, timeout=timeout)).first()

    async def put(
        self, key: bytes, value: bytes, *, lease: int = 0, timeout: float | None = None
    ) -> PutResult:
        req = self.pb.rpc.PutRequest(key=key, value=value, lease=lease)
        resp = await self._call(lambda s: s.kv.Put, req, timeout)
        return PutResult(int(resp.header.revision))

    async def delete(
        self, key: bytes, *, prefix: bool = False, timeout: float | None = None
    ) -> DeleteResult:
        req = self.pb.rpc.DeleteRangeRequest(key=key, range_end=prefix_end(key) if prefix else b"")
        resp = await self._call(lambda s: s.kv.DeleteRange, req, timeout)
        return DeleteResult(int(resp.header.revision), int(resp.deleted))

    async def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
        *,
        timeout: float | None = None,
    ) -> TxnResult:
        rpc = self.pb.rpc
        req = rpc.TxnRequest(
            compare=[c.to_pb(rpc) for c in compare],
            success=[op_to_pb(o, rpc) for o in success],
            failure=[op_to_pb(o, rpc) for o in failure],
        )
        resp = await self._call(lambda s: s.kv.Txn, req, timeout)
        return TxnResult(
            bool(resp.succeeded),
            int(resp.header.revision),
            tuple(op_result(r) for r in resp.responses),
        )

    # -- Lease -----------------------------------------------------------------------------

    async def grant(self, ttl: int, *, timeout: float | None = None) -> LeaseInfo:
        req = self.pb.rpc.LeaseGrantRequest(TTL=ttl)
        resp = await self._call(lambda s: s.lease.LeaseGrant, req, timeout)
        if resp.error:
            raise EtcdError(f"lease grant refused: {resp.error}")
        return LeaseInfo(int(resp.ID), int(resp.TTL), int(resp.TTL))

    async def revoke(self, lease: int, *, timeout: float | None = None) -> None:
        await self._call(
            lambda s: s.lease.LeaseRevoke, self.pb.rpc.LeaseRevokeRequest(ID=lease), timeout
        )

    async def time_to_live(self, lease: int, *, timeout: float | None = None) -> LeaseInfo:
        """TTL -1 when the lease does not exist (etcd answers, it does not fail)."""
        req = self.pb.rpc.LeaseTimeToLiveRequest(ID=lease, keys=False)
        resp = await self._call(lambda s: s.lease.LeaseTimeToLive, req, timeout)
        return LeaseInfo(int(resp.ID), int(resp.TTL), int(resp.grantedTTL))

    async def keepalive(self, lease: int, *, timeout: float | None = None) -> int:
        """Renew ``lease`` once over the shared LeaseKeepAlive stream; its new TTL, 0 when
        the lease is gone."""
        if self._lease_keeper is None:
            from halb.etcd.lease import LeaseKeeper

            self._lease_keeper = LeaseKeeper(self)
        return int(await self._lease_keeper.keepalive(lease, timeout=timeout))

    # -- Watch -----------------------------------------------------------------------------

    def watch(
        self, key: bytes, *, prefix: bool = False, start_revision: int
    ) -> AsyncIterator[WatchEvent]:
        """Events from ``start_revision`` on, resumed after any break; raises
        Compacted when that revision is gone (re-read, then watch again)."""
        from halb.etcd.watch import watch

        return watch(self, key, prefix=prefix, start_revision=start_revision)

    # -- Cluster ---------------------------------------------------------------------------

    async def status(self, *, timeout: float | None = None) -> Any:
        """Maintenance.Status of the member the channel uses (leader id, raft term)."""
        return await self._call(
            lambda s: s.maintenance.Status, self.pb.rpc.StatusRequest(), timeout
        )

    async def member_list(self, *, timeout: float | None = None) -> Any:
        return await self._call(
            lambda s: s.cluster.MemberList, self.pb.rpc.MemberListRequest(), timeout
        )

    # -- lifetime --------------------------------------------------------------------------

    async def close(self) -> None:
        if self._listing is not None:
            self._listing.cancel()
        if self._lease_keeper is not None:
            await self._lease_keeper.close()
        await self.channels.close()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
