"""halb.etcd against real 3-member etcd clusters on loopback (TLS + auth where noted).

Under a running keepalive + txn + watch workload a member is SIGKILLed or SIGSTOPped
(the one the client uses, follower or leader): no lease is lost, every acknowledged
write arrives on the watch exactly once, and the client moves within a bound. TLS and
auth mistakes each give their own error; an expired token is renewed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from halb.etcd import (
    AuthFailed,
    ClientSettings,
    EtcdClient,
    EventKind,
    PermissionDenied,
    Snapshot,
    TlsError,
    TlsFiles,
    read_then_watch,
)
from halb.testing.etcd import USER_PASSWORD, EtcdCluster, EtcdServer
from halb.testing.etcd_workload import order_for, run_fault

pytestmark = pytest.mark.kernel


def settings(
    cluster: EtcdCluster, endpoints: list[str] | None = None, **tls: object
) -> ClientSettings:
    t = cluster.tls
    files = None
    if t is not None:
        base: dict[str, object] = {
            "ca": t.ca,
            "cert": t.client_cert,
            "key": t.client_key,
            "server_name": t.server_name,
        }
        base.update(tls)
        files = TlsFiles(**base)  # type: ignore[arg-type]
    return ClientSettings(
        tuple(endpoints or cluster.endpoints),
        files,
        "halb" if cluster.auth else None,
        USER_PASSWORD if cluster.auth else None,
    )


@pytest.fixture
def secure() -> Iterator[EtcdCluster]:
    with EtcdCluster(3, tls=True, auth=True) as c:
        yield c


# Bounds well above PLATFORM.md's measured figures (follower kill < 0.1 s, hang ~0.3 s,
# leader kill 0.5-1.7 s): the machine is shared by several test runs.
BOUNDS = {("kill", "follower"): 1.0, ("stop", "follower"): 1.5, ("kill", "leader"): 3.0}
BOUNDS[("stop", "leader")] = 3.0


@pytest.mark.parametrize(
    ("fault", "role"),
    [("kill", "follower"), ("stop", "follower"), ("kill", "leader"), ("stop", "leader")],
)
def test_member_fault_under_load_loses_nothing(secure: EtcdCluster, fault: str, role: str) -> None:
    member, endpoints = order_for(secure, role)  # type: ignore[arg-type]

    async def body() -> None:
        async with EtcdClient(settings(secure, endpoints)) as client:
            await client.check()
            report = await run_fault(secure, client, fault, member, role)  # type: ignore[arg-type]
        print(
            f"\n{fault} {role}: move {report.move_s}s, keepalive max {report.keepalive_max_s:.3f}s "
            f"gap {report.keepalive_gap_s:.3f}s (ttl {report.lease_ttl}s), "
            f"watch lag max {report.watch_lag_max_s:.3f}s, {report.written} writes"
        )
        assert not report.lease_lost, report
        assert report.written > 20
        assert report.missing == []
        assert report.duplicates == []
        assert report.move_s is not None
        assert report.move_s < BOUNDS[(fault, role)]
        # A leader fault leaves etcd without a leader for its election: no keepalive can
        # succeed anywhere meanwhile, and the new leader extends every lease by that
        # time (etcd's lease promotion), so the lease survives a longer gap (lease_lost
        # above is the proof). Seen: 2.28 s between keepalives with a 2 s TTL.
        election = BOUNDS[(fault, role)] if role == "leader" else 0.0
        assert report.keepalive_gap_s < report.lease_ttl + election
        assert report.errors == []

    asyncio.run(body())


# --- TLS and auth mistakes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[EtcdCluster]:
    with EtcdCluster(1, tls=True) as c:
        yield c


async def _check(st: ClientSettings) -> None:
    async with EtcdClient(st) as client:
        await client.check(timeout=2)


def test_wrong_ca_is_named(tls_cluster: EtcdCluster) -> None:
    assert tls_cluster.tls is not None
    with pytest.raises(TlsError, match=r"not signed by etcd\.tls\.ca"):
        asyncio.run(_check(settings(tls_cluster, ca=tls_cluster.tls.other_ca)))


def test_missing_client_certificate_is_named(tls_cluster: EtcdCluster) -> None:
    with pytest.raises(TlsError, match="refused this client's certificate"):
        asyncio.run(_check(settings(tls_cluster, cert=None, key=None)))


def test_wrong_server_name_is_named(tls_cluster: EtcdCluster) -> None:
    with pytest.raises(TlsError, match=r"server name 'wrong\.example'"):
        asyncio.run(_check(settings(tls_cluster, server_name="wrong.example")))


def test_plaintext_to_tls_members_is_named(tls_cluster: EtcdCluster) -> None:
    plain = [e.replace("https://", "http://") for e in tls_cluster.endpoints]
    with pytest.raises(TlsError, match="expect TLS"):
        asyncio.run(_check(ClientSettings(tuple(plain))))


def test_tls_to_plaintext_member_is_named(tls_cluster: EtcdCluster) -> None:
    with EtcdServer() as plain:
        eps = [plain.endpoint.replace("http://", "https://")]
        with pytest.raises(TlsError, match="speak plaintext"):
            asyncio.run(_check(settings(tls_cluster, eps)))


def test_good_tls_passes_the_check(tls_cluster: EtcdCluster) -> None:
    async def body() -> None:
        async with EtcdClient(settings(tls_cluster)) as client:
            await client.check()
            await client.put(b"/x", b"1")
            got = await client.get(b"/x")
            assert got is not None and got.value == b"1"

    asyncio.run(body())


def test_auth_prefix_role_and_wrong_password(secure: EtcdCluster) -> None:
    async def body() -> None:
        async with EtcdClient(settings(secure)) as client:
            await client.check()
            await client.put(b"/halb/ok", b"1")
            with pytest.raises(PermissionDenied):
                await client.put(b"/elsewhere", b"1")
            with pytest.raises(PermissionDenied):
                async for _ in read_then_watch(client, b"/elsewhere/", prefix=True):
                    pass
        bad = ClientSettings(tuple(secure.endpoints), settings(secure).tls, "halb", "wrong")
        async with EtcdClient(bad) as client:
            with pytest.raises(AuthFailed, match="refused user 'halb'"):
                await client.check()

    asyncio.run(body())


def test_expired_token_is_renewed_for_calls_and_watches() -> None:
    with EtcdCluster(3, tls=True, auth=True, token_ttl=1) as cluster:

        async def body() -> None:
            async with EtcdClient(settings(cluster)) as client:
                await client.check()
                first = client.token
                events: list[bytes] = []
                got_snapshot = asyncio.Event()

                async def follow() -> None:
                    async for item in read_then_watch(client, b"/halb/w/", prefix=True):
                        if isinstance(item, Snapshot):
                            got_snapshot.set()
                        elif item.kind is EventKind.PUT:
                            events.append(item.kv.key)

                task = asyncio.create_task(follow())
                await asyncio.wait_for(got_snapshot.wait(), 5)
                await asyncio.sleep(2.5)  # the token expires unused
                await client.put(b"/halb/w/1", b"1")
                assert client.token != first
                # The watch's member is killed: it is re-created (new member, new token).
                cluster.members[0].stop(kill=True)
                await client.put(b"/halb/w/2", b"2")
                deadline = time.monotonic() + 5
                while len(events) < 2 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                assert events == [b"/halb/w/1", b"/halb/w/2"]

        asyncio.run(body())


def test_the_member_actually_serving_is_the_one_left_when_it_hangs() -> None:
    """gRPC moves off a killed member inside one channel, so the endpoint order alone
    does not say who serves; reply headers do. After m0 is killed (the client now on
    m1) and restarted, a hung m1 is the member demoted, not the healthy m0."""
    with EtcdCluster(3) as cluster:

        async def body() -> None:
            async with EtcdClient(settings(cluster)) as client:
                await client.put(b"/a", b"1")
                await asyncio.sleep(0.2)  # the member list behind the reply headers
                await client.put(b"/a", b"2")
                first = client.serving
                assert first.port == cluster.members[0].port
                cluster.members[0].stop(kill=True)
                await client.put(b"/a", b"3")
                await client.put(b"/a", b"4")
                moved = client.serving
                assert moved.port != first.port
                cluster.members[0].start()
                index = next(i for i, m in enumerate(cluster.members) if m.port == moved.port)
                cluster.make_follower(index)  # a hung leader is another case (an election)
                await client.put(b"/a", b"4b")  # (after the leader move)
                hung = cluster.members[index]
                hung.freeze()
                t0 = time.monotonic()
                await client.put(b"/a", b"5")
                took = time.monotonic() - t0
                print(f"\nhung serving member left in {took:.3f}s")
                assert client.channels.order[-1].port == moved.port
                assert client.serving.port != moved.port
                assert took < 1.0
                hung.thaw()

        asyncio.run(body())


def test_a_watch_moved_to_a_member_that_forgot_the_token_renews_it() -> None:
    """Simple tokens are kept alive per member by use: the members the client does not
    talk to let it expire. A watch moved to one of them is refused under the old token
    (etcd answers "invalid auth token", or "permission denied" like a real denial); the
    watch renews the token once and carries on; nothing is lost."""
    with EtcdCluster(3, tls=True, auth=True, token_ttl=1) as cluster:

        async def body() -> None:
            async with EtcdClient(settings(cluster)) as client:
                await client.check()
                events: list[bytes] = []
                got_snapshot = asyncio.Event()

                async def follow() -> None:
                    async for item in read_then_watch(client, b"/halb/r/", prefix=True):
                        if isinstance(item, Snapshot):
                            got_snapshot.set()
                        elif item.kind is EventKind.PUT:
                            events.append(item.kv.key)

                task = asyncio.create_task(follow())
                await asyncio.wait_for(got_snapshot.wait(), 5)
                for i in range(6):  # in use on m0 only: m1 and m2 let the token expire
                    await client.put(b"/halb/r/0", str(i).encode())
                    await asyncio.sleep(0.5)
                await client.put(b"/halb/r/1", b"1")
                cluster.make_follower(0)  # a follower's death: no election in the way
                cluster.members[0].stop(kill=True)  # the client moves to m1
                await client.put(b"/halb/r/2", b"2")
                deadline = time.monotonic() + 5
                while b"/halb/r/2" not in events and time.monotonic() < deadline:
                    if task.done():
                        break
                    await asyncio.sleep(0.05)
                assert not task.done(), task.exception()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                assert events[-2:] == [b"/halb/r/1", b"/halb/r/2"]
                assert events.count(b"/halb/r/1") == 1

        asyncio.run(body())
