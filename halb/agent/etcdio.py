"""etcd I/O for cluster-wide documents: the stored config, node status, the CLI's reads.

Election keys are halb.ha.coord's business; this module only reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aetcd

from halb.agent.keys import ClusterKeys
from halb.agent.status import LeaderInfo, NodeStatus, parse_status
from halb.config import ClusterConfig, ConfigError, ConfigIssue, parse_config_text
from halb.ha.coord import GroupKeys, open_client, parse_leader

__all__ = [
    "ClusterSnapshot",
    "StoredConfig",
    "connect",
    "publish_config",
    "read_cluster",
    "read_config",
]


def connect(cfg: ClusterConfig) -> aetcd.Client:
    endpoint = cfg.etcd.endpoints[0]
    if not endpoint.startswith("http://") or cfg.etcd.tls is not None:
        # aetcd 1.0 has no TLS: refuse rather than silently talk plaintext.
        raise ConfigError(
            [
                ConfigIssue(
                    "etcd.endpoints[0]" if not endpoint.startswith("http://") else "etcd.tls",
                    "TLS to etcd is not supported by this build's etcd client (aetcd 1.0); "
                    "use http:// endpoints on a trusted management network",
                )
            ]
        )
    return open_client(endpoint, timeout=cfg.etcd.dial_timeout)


def keys_of(cfg: ClusterConfig) -> ClusterKeys:
    return ClusterKeys(cfg.etcd.prefix, cfg.cluster)


@dataclass(frozen=True, slots=True)
class StoredConfig:
    text: str
    revision: int  # etcd mod revision of the config key: the cluster's config revision


async def read_config(client: aetcd.Client, keys: ClusterKeys) -> StoredConfig | None:
    got = await client.get(keys.config)
    if got is None:
        return None
    return StoredConfig(got.value.decode(), got.mod_revision)


async def publish_config(client: aetcd.Client, cfg: ClusterConfig, text: str) -> int:
    """Store a validated config; returns its revision (unchanged text: no new revision)."""
    parse_config_text(text)  # never store what agents would reject
    keys = keys_of(cfg)
    current = await read_config(client, keys)
    if current is not None and current.text == text:
        return current.revision
    put = await client.put(keys.config, text.encode())
    return int(put.header.revision)


async def watch_config(client: aetcd.Client, keys: ClusterKeys) -> AsyncIterator[StoredConfig]:
    """Yield the stored config whenever it changes (re-created after etcd restarts)."""
    last = 0
    while True:
        try:
            current = await read_config(client, keys)
            if current is not None and current.revision > last:
                last = current.revision
                yield current
            watch = await client.watch(keys.config, start_revision=last + 1 if last else None)
            async for event in watch:
                kv = event.kv
                if kv.mod_revision > last and kv.value:
                    last = kv.mod_revision
                    yield StoredConfig(kv.value.decode(), kv.mod_revision)
        except (TimeoutError, aetcd.ClientError, OSError):
            await asyncio.sleep(0.5)


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    leaders: dict[str, LeaderInfo]
    statuses: dict[str, NodeStatus]
    drained: set[str]


async def read_cluster(client: aetcd.Client, cfg: ClusterConfig) -> ClusterSnapshot:
    keys = keys_of(cfg)
    leaders: dict[str, LeaderInfo] = {}
    for g in cfg.vip_groups:
        gk = GroupKeys(cfg.etcd.prefix, cfg.cluster, g.name)
        got = await client.get(gk.leader)
        if got is None:
            continue
        leader = parse_leader(got.value, got.lease, got.create_revision)
        ttl: float | None = None
        with contextlib.suppress(aetcd.ClientError):
            info = await client.get_lease_info(got.lease, keys=False)
            ttl = float(info.TTL) if info.TTL >= 0 else None
        leaders[g.name] = LeaderInfo(leader.holder, str(leader.term), ttl)
    statuses: dict[str, NodeStatus] = {}
    for kv in await client.get_prefix(keys.status_prefix):
        st = parse_status(kv.value)
        if st is not None:
            statuses[st.node] = st
    drained: set[str] = set()
    drain_prefix = f"{keys.base}/drain/".encode()
    for kv in await client.get_prefix(drain_prefix):
        drained.add(kv.key[len(drain_prefix) :].decode())
    return ClusterSnapshot(leaders, statuses, drained)
