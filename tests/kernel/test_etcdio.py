"""The agent's etcd documents against a real etcd: the config follow misses nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from halb.agent.etcdio import StoredConfig, watch_config
from halb.etcd import ClientSettings, EtcdClient, RangeResult
from halb.keys import ClusterKeys
from halb.testing.etcd import EtcdServer

pytestmark = pytest.mark.kernel

KEYS = ClusterKeys("/halbt", "c1")


class RacingClient(EtcdClient):
    """Runs ``racer`` once, right after the first read returns: a config stored
    between the read and the watch (what aetcd's watch_config missed when nothing
    was stored yet)."""

    racer: Callable[[], Awaitable[Any]] | None = None

    async def range(self, key: bytes, **kw: Any) -> RangeResult:
        got = await super().range(key, **kw)
        racer, self.racer = self.racer, None
        if racer is not None:
            await racer()
        return got


async def _next(it: Any, timeout: float = 5.0) -> StoredConfig:
    return await asyncio.wait_for(it.__anext__(), timeout)


def test_a_config_stored_between_the_read_and_the_watch_is_delivered() -> None:
    with EtcdServer() as etcd:

        async def body() -> None:
            async with (
                RacingClient(ClientSettings((etcd.endpoint,))) as client,
                EtcdClient(ClientSettings((etcd.endpoint,))) as writer,
            ):
                client.racer = lambda: writer.put(KEYS.config, b"first")
                configs = watch_config(client, KEYS)
                got = await _next(configs)
                assert got.text == "first"
                await writer.put(KEYS.config, b"second")
                assert (await _next(configs)).text == "second"
                await configs.aclose()  # type: ignore[attr-defined]

        asyncio.run(body())


def test_the_stored_config_is_yielded_first_then_changes_once_each() -> None:
    with EtcdServer() as etcd:

        async def body() -> None:
            async with EtcdClient(ClientSettings((etcd.endpoint,))) as client:
                rev = (await client.put(KEYS.config, b"a")).revision
                configs = watch_config(client, KEYS)
                assert await _next(configs) == StoredConfig("a", rev)
                rev2 = (await client.put(KEYS.config, b"b")).revision
                assert await _next(configs) == StoredConfig("b", rev2)
                await configs.aclose()  # type: ignore[attr-defined]

        asyncio.run(body())
