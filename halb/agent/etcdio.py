"""etcd I/O for cluster-wide documents: the stored config, node status, the CLI's reads.

Election keys are halb.ha.coord's business; this module only reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from halb.agent.status import LeaderInfo, NodeStatus, parse_status
from halb.config import ClusterConfig, ConfigError, ConfigIssue, parse_config_text
from halb.etcd import ClientSettings, EtcdClient, EtcdError, Snapshot, read_then_watch
from halb.ha.values import parse_leader
from halb.keys import ClusterKeys, GroupKeys

__all__ = [
    "ClusterSnapshot",
    "StoredConfig",
    "connect",
    "publish_config",
    "read_cluster",
    "read_config",
    "watch_config",
]

log = logging.getLogger(__name__)


def connect(cfg: ClusterConfig, node: str | None = None) -> EtcdClient:
    """The one way halb opens etcd: every endpoint, TLS and auth from ``cfg.etcd``
    (``{node}`` in its TLS paths filled in with ``node``; credentials may come from the
    environment). Bad settings raise ConfigError naming the field."""
    try:
        return EtcdClient(ClientSettings.of(cfg.etcd, node=node))
    except ValueError as exc:
        path, _, msg = str(exc).partition(": ")
        raise ConfigError([ConfigIssue(path, msg or str(exc))]) from None


def keys_of(cfg: ClusterConfig) -> ClusterKeys:
    return ClusterKeys(cfg.etcd.prefix, cfg.cluster)


@dataclass(frozen=True, slots=True)
class StoredConfig:
    text: str
    revision: int  # etcd mod revision of the config key: the cluster's config revision


async def read_config(client: EtcdClient, keys: ClusterKeys) -> StoredConfig | None:
    got = await client.get(keys.config)
    if got is None:
        return None
    return StoredConfig(got.value.decode(), got.mod_revision)


async def publish_config(client: EtcdClient, cfg: ClusterConfig, text: str) -> int:
    """Store a validated config; returns its revision (unchanged text: no new revision)."""
    parse_config_text(text)  # never store what agents would reject
    keys = keys_of(cfg)
    current = await read_config(client, keys)
    if current is not None and current.text == text:
        return current.revision
    put = await client.put(keys.config, text.encode())
    return put.revision


async def watch_config(client: EtcdClient, keys: ClusterKeys) -> AsyncIterator[StoredConfig]:
    """The stored config now (if any), then every new one. Read, then watched from the
    read's revision + 1, so a config stored in between is not missed; the watch resumes
    across etcd member failures and re-reads after a compaction."""
    last = 0
    while True:
        try:
            async for item in read_then_watch(client, keys.config):
                kv = item.first() if isinstance(item, Snapshot) else item.kv
                if kv is not None and kv.value and kv.mod_revision > last:
                    last = kv.mod_revision
                    yield StoredConfig(kv.value.decode(), kv.mod_revision)
        except EtcdError as exc:
            log.warning("config watch failed (%s); retrying", exc)
            await asyncio.sleep(0.5)


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    leaders: dict[str, LeaderInfo]
    statuses: dict[str, NodeStatus]
    drained: set[str]


async def read_cluster(client: EtcdClient, cfg: ClusterConfig) -> ClusterSnapshot:
    keys = keys_of(cfg)
    leaders: dict[str, LeaderInfo] = {}
    for g in cfg.vip_groups:
        gk = GroupKeys(cfg.etcd.prefix, cfg.cluster, g.name)
        got = await client.get(gk.leader)
        if got is None:
            continue
        leader = parse_leader(got.value, got.lease, got.create_revision)
        ttl: float | None = None
        with contextlib.suppress(EtcdError):
            info = await client.time_to_live(got.lease)
            ttl = float(info.ttl) if info.ttl >= 0 else None
        leaders[g.name] = LeaderInfo(leader.holder, str(leader.term), ttl)
    statuses: dict[str, NodeStatus] = {}
    for kv in await client.range(keys.status_prefix, prefix=True):
        st = parse_status(kv.value)
        if st is not None:
            statuses[st.node] = st
    drained: set[str] = set()
    drain_prefix = keys.node_drain_prefix
    for kv in await client.range(drain_prefix, prefix=True):
        drained.add(kv.key[len(drain_prefix) :].decode())
    return ClusterSnapshot(leaders, statuses, drained)
