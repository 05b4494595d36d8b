"""The backend view and drains through a real etcd: publish, watch (also across an etcd
restart), the leader guard, and the CLI's drain / `halb backends` round trip."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from click.testing import CliRunner

from halb.checks.base import CheckResult
from halb.checks.factory import CheckTarget
from halb.checks.publish import (
    HealthKeys,
    HealthPublisher,
    LeaderGuard,
    clear_drain,
    read_drains,
    read_view,
    run_publisher,
    set_drain,
    watch_drains,
    watch_views,
)
from halb.checks.scheduler import CheckScheduler
from halb.checks.state import NO_DAMPING, BackendHealth, Health, Thresholds, initial, observe
from halb.checks.view import Drain, HealthView, backend_key, effective_services
from halb.cli.main import cli
from halb.config import ClusterConfig, parse_config
from halb.etcd import ClientSettings, EtcdClient, EtcdError
from halb.lb.maglev import build_table
from halb.testing.etcd import EtcdServer

pytestmark = pytest.mark.kernel

T = TypeVar("T")


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


def config_doc(endpoint: str) -> dict[str, Any]:
    return {
        "cluster": "chk",
        "etcd": {"endpoints": [endpoint], "prefix": "/halbt", "dial_timeout": 2},
        "dataplane": {"kind": "xdp"},
        "nodes": [
            {
                "name": "lb1",
                "address": "10.0.0.11/24",
                "interface": "eth0",
                "priority": 200,
                "sync_address": "10.0.2.11:7700",
            }
        ],
        "vip_groups": [
            {
                "name": "web",
                "vips": [
                    {
                        "address": "10.0.0.100",
                        "services": [
                            {
                                "port": 80,
                                "forwarding": "dsr",
                                "backends": [
                                    {"address": "10.0.0.21"},
                                    {"address": "10.0.0.22"},
                                    {"address": "10.0.0.23", "weight": 2},
                                ],
                                "sorry_backend": {"address": "10.0.0.99"},
                            },
                            {
                                "port": 80,
                                "protocol": "udp",
                                "forwarding": "dsr",
                                "backends": [{"address": "10.0.0.21"}],
                            },
                        ],
                    }
                ],
            }
        ],
        "sync": {"insecure": True},
        "admin": {"insecure": True},
    }


def config_for(etcd: EtcdServer) -> ClusterConfig:
    return parse_config(config_doc(etcd.endpoint))


def down() -> BackendHealth:
    s = initial(1000.0)
    for i in range(3):
        s = observe(s, CheckResult(False, "connection refused"), 1001.0 + i, Thresholds())
    return s


@contextlib.asynccontextmanager
async def client_of(etcd: EtcdServer) -> AsyncIterator[EtcdClient]:
    client = EtcdClient(ClientSettings((etcd.endpoint,)))
    await client.check()
    try:
        yield client
    finally:
        await client.close()


async def next_of(it: AsyncIterator[T], timeout: float = 10.0) -> T:
    return await asyncio.wait_for(anext(it), timeout)


def rings(cfg: ClusterConfig, view: HealthView | None) -> list[bytes]:
    return [
        build_table({str(b): b.weight for b in s.backends}, s.ring_size).slots.tobytes()
        for s in effective_services(cfg.services(), view)
    ]


def test_publish_and_watch_give_identical_rings(etcd: EtcdServer) -> None:
    cfg = config_for(etcd)
    keys = HealthKeys.from_config(cfg)
    web = cfg.services()[0]
    k2 = backend_key(web.key, web.backends[1])

    async def body() -> None:
        async with client_of(etcd) as active, client_of(etcd) as standby:
            pub = HealthPublisher(active, keys, node="lb1", term="1@5")
            watcher = watch_views(standby, keys)
            async with contextlib.aclosing(watcher):
                first = await pub.publish(cfg.services(), {}, {})
                assert first is not None and first.revision == 1
                seen = await next_of(watcher)
                assert seen == first

                # Unchanged inputs: nothing new is written.
                again = await pub.publish(cfg.services(), {}, {})
                assert again is first
                got = await active.get(keys.view)
                assert got is not None and got.version == 1

                second = await pub.publish(cfg.services(), {k2: down()}, {})
                assert second is not None and second.revision == 2
                seen = await next_of(watcher)
                assert seen.backends[k2].state is Health.DOWN
                assert seen.to_json() == second.to_json()
                assert rings(cfg, seen) == rings(cfg, second)
                assert rings(cfg, seen) != rings(cfg, first)
                assert (await read_view(standby, keys)) == second

            # A new active node continues the revisions under its own name and term.
            pub2 = HealthPublisher(standby, keys, node="lb2", term="2@9")
            third = await pub2.publish(cfg.services(), {k2: down()}, {})
            assert third is not None and third.revision == 3 and third.node == "lb2"
            assert dict(third.backends) == dict(second.backends)

    asyncio.run(body())


def test_a_deposed_leader_cannot_overwrite_the_view(etcd: EtcdServer) -> None:
    cfg = config_for(etcd)
    keys = HealthKeys.from_config(cfg)
    web = cfg.services()[0]
    k1 = backend_key(web.key, web.backends[0])
    leader = b"/halbt/chk/groups/web/leader"

    async def body() -> None:
        async with client_of(etcd) as c:
            put = await c.put(leader, b'{"node": "lb1", "priority": 200}')
            rev = put.revision
            pub = HealthPublisher(
                c, keys, node="lb1", term=f"1@{rev}", guard=LeaderGuard(leader, rev)
            )
            assert await pub.publish(cfg.services(), {}, {}) is not None
            # The term ends: lb2 takes the leader key (a new create revision).
            await c.delete(leader)
            await c.put(leader, b'{"node": "lb2", "priority": 100}')
            refused = await pub.publish(cfg.services(), {k1: down()}, {})
            assert refused is None
            current = await read_view(c, keys)
            assert current is not None and current.revision == 1
            assert current.backends[k1].state is Health.UP

    asyncio.run(body())


def test_watches_survive_an_etcd_restart(etcd: EtcdServer) -> None:
    cfg = config_for(etcd)
    keys = HealthKeys.from_config(cfg)
    web = cfg.services()[0]
    k1 = backend_key(web.key, web.backends[0])

    async def body() -> None:
        async with client_of(etcd) as active, client_of(etcd) as standby:
            pub = HealthPublisher(active, keys, node="lb1", term="t")
            await pub.publish(cfg.services(), {}, {})
            views = watch_views(standby, keys)
            drains = watch_drains(standby, keys)
            async with contextlib.aclosing(views), contextlib.aclosing(drains):
                assert (await next_of(views)).revision == 1
                assert await next_of(drains) == {}

                await asyncio.to_thread(etcd.restart)

                # Writes after the restart reach both watchers (re-read + re-watch).
                async def publish_when_etcd_answers() -> None:
                    for _ in range(100):
                        try:
                            await pub.publish(cfg.services(), {k1: down()}, {})
                            await set_drain(active, keys, k1, Drain(reason="after restart"))
                            return
                        except (EtcdError, TimeoutError):
                            await asyncio.sleep(0.1)
                    raise AssertionError("etcd did not come back")

                await publish_when_etcd_answers()
                view = await next_of(views, 20.0)
                assert view.revision == 2 and view.backends[k1].state is Health.DOWN
                assert await next_of(drains, 20.0) == {k1: Drain(reason="after restart")}

                assert await clear_drain(active, keys, k1)
                assert await next_of(drains) == {}
                assert not await clear_drain(active, keys, k1)

    asyncio.run(body())


def write_config(tmp_path: Path, etcd: EtcdServer) -> str:
    path = tmp_path / "halb.yaml"
    path.write_text(yaml.safe_dump(config_doc(etcd.endpoint)))
    return str(path)


def test_cli_drain_backends_and_undrain(etcd: EtcdServer, tmp_path: Path) -> None:
    conf = write_config(tmp_path, etcd)
    cfg = config_for(etcd)
    keys = HealthKeys.from_config(cfg)
    web = cfg.services()[0]
    k1 = backend_key(web.key, web.backends[0])
    runner = CliRunner()

    def backends_json() -> dict[str, Any]:
        res = runner.invoke(cli, ["backends", "--config", conf, "--output", "json"])
        assert res.exit_code == 0, res.output
        doc: dict[str, Any] = json.loads(res.output)
        return doc

    # Nothing published yet: every configured backend is listed as unknown.
    doc = backends_json()
    assert doc["view"] is None
    assert [r["key"] for r in doc["backends"]] == [
        "10.0.0.100:80/tcp/10.0.0.21:80",
        "10.0.0.100:80/tcp/10.0.0.22:80",
        "10.0.0.100:80/tcp/10.0.0.23:80",
        "10.0.0.100:80/udp/10.0.0.21:80",
    ]
    assert {r["state"] for r in doc["backends"]} == {"unknown"}

    # 10.0.0.100:80 is both tcp and udp: the protocol is required.
    res = runner.invoke(cli, ["backend", "drain", "--config", conf, "10.0.0.100:80", "10.0.0.21"])
    assert res.exit_code == 2 and "ambiguous" in res.output
    res = runner.invoke(
        cli, ["backend", "drain", "--config", conf, "10.0.0.100:80/tcp", "10.0.0.77"]
    )
    assert res.exit_code == 2 and "no backend 10.0.0.77" in res.output

    res = runner.invoke(
        cli,
        [
            "backend",
            "drain",
            "--config",
            conf,
            "--reason",
            "kernel upgrade",
            "10.0.0.100:80/tcp",
            "10.0.0.21",
        ],
    )
    assert res.exit_code == 0, res.output
    assert k1 in res.output

    async def stored() -> dict[str, Drain]:
        async with client_of(etcd) as c:
            got = await c.get(keys.drain(k1))
            assert got is not None
            assert bytes(got.key) == b"/halbt/chk/drain-backend/10.0.0.100:80/tcp/10.0.0.21:80"
            return await read_drains(c, keys)

    drains = asyncio.run(stored())
    assert drains[k1].reason == "kernel upgrade" and drains[k1].since > 0 and "@" in drains[k1].by

    row = backends_json()["backends"][0]
    assert (
        row["key"] == k1 and row["drained"] is True and row["drain"]["reason"] == "kernel upgrade"
    )

    # The active node publishes a view that includes the drain: state draining.
    async def publish() -> None:
        async with client_of(etcd) as c:
            pub = HealthPublisher(c, keys, node="lb1", term="t")
            await pub.publish(cfg.services(), {}, await read_drains(c, keys))

    asyncio.run(publish())
    doc = backends_json()
    assert doc["view"] == {"revision": 1, "node": "lb1", "term": "t"}
    row = doc["backends"][0]
    assert row["state"] == "draining" and row["drain_pending"] is False
    assert "kernel upgrade" in row["reason"]
    assert doc["backends"][1]["state"] == "up"

    table = runner.invoke(cli, ["backends", "--config", conf])
    assert table.exit_code == 0 and "draining" in table.output and "r1" in table.output

    res = runner.invoke(
        cli, ["backend", "undrain", "--config", conf, "10.0.0.100:80/tcp", "10.0.0.21:80"]
    )
    assert res.exit_code == 0 and "undrained" in res.output, res.output
    row = backends_json()["backends"][0]
    assert row["drained"] is False and row["drain_pending"] is True  # view not republished
    res = runner.invoke(
        cli, ["backend", "undrain", "--config", conf, "10.0.0.100:80/tcp", "10.0.0.21"]
    )
    assert res.exit_code == 0 and "was not drained" in res.output


def test_cli_reports_an_unreachable_etcd(tmp_path: Path) -> None:
    from halb.testing.etcd import free_port

    doc = config_doc(f"http://127.0.0.1:{free_port()}")
    doc["etcd"]["dial_timeout"] = 0.5
    path = tmp_path / "halb.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = CliRunner().invoke(cli, ["backends", "--config", str(path)])
    assert res.exit_code == 1 and "no etcd endpoint answered" in res.output


class Switch:
    """A checker the test flips."""

    def __init__(self) -> None:
        self.up = True

    @property
    def target(self) -> str:
        return "switch"

    async def check(self, timeout: float) -> CheckResult:
        return CheckResult(self.up, "fine" if self.up else "switched off")


def test_run_publisher_follows_checks_and_drains_until_the_term_ends(etcd: EtcdServer) -> None:
    cfg = config_for(etcd)
    keys = HealthKeys.from_config(cfg)
    web = cfg.services()[0]
    k1, k2 = (backend_key(web.key, b) for b in web.backends[:2])
    switch = Switch()
    targets = [CheckTarget(k1, switch, interval=0.05, timeout=0.05, thresholds=Thresholds(1, 1))]
    leader = b"/halbt/chk/groups/web/leader"

    async def until(
        views: AsyncIterator[HealthView], pred: Callable[[HealthView], bool]
    ) -> HealthView:
        while True:
            v = await next_of(views)
            if pred(v):
                return v

    async def body() -> None:
        async with client_of(etcd) as active, client_of(etcd) as standby:
            rev = (await active.put(leader, b"lb1")).revision
            sched = CheckScheduler(targets, damping=NO_DAMPING)
            pub = HealthPublisher(
                active, keys, node="lb1", term="t", guard=LeaderGuard(leader, rev)
            )
            checks = asyncio.create_task(sched.run())
            publisher = asyncio.create_task(run_publisher(pub, cfg.services, sched))
            views = watch_views(standby, keys)
            try:
                async with contextlib.aclosing(views):
                    v = await until(views, lambda v: v.backends[k1].last_up is True)
                    assert v.node == "lb1" and v.backends[k1].state is Health.UP

                    switch.up = False
                    v = await until(views, lambda v: v.backends[k1].state is Health.DOWN)
                    assert v.backends[k1].reason == "switched off (1 in a row)"
                    [svc, _] = effective_services(cfg.services(), v)
                    assert [str(b) for b in svc.backends] == ["10.0.0.22:80", "10.0.0.23:80"]

                    await set_drain(active, keys, k2, Drain(reason="rack move"))
                    v = await until(views, lambda v: v.backends[k2].state is Health.DRAINING)
                    assert v.backends[k2].drain_reason == "rack move"

                    # The term ends: the next change finds the guard failed and stops.
                    await active.delete(leader)
                    await active.put(leader, b"lb2")
                    switch.up = True
                    await asyncio.wait_for(publisher, 10.0)
                    current = await read_view(standby, keys)
                    assert current is not None and current.backends[k1].state is Health.DOWN
            finally:
                for task in (checks, publisher):
                    task.cancel()
                await asyncio.gather(checks, publisher, return_exceptions=True)

    asyncio.run(body())
