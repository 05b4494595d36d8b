"""Operator actions on a group's keys (the CLI, drills, benches): a planned failover,
a node drain. The agents act on them through their watches (halb.ha.coord)."""

from __future__ import annotations

from halb.etcd import EtcdClient
from halb.ha.values import handover_value
from halb.keys import GroupKeys
from halb.model import Term

__all__ = ["clear_drain", "request_handover", "set_drain"]


async def request_handover(
    client: EtcdClient, keys: GroupKeys, target: str, *, term: Term | None = None
) -> None:
    """Planned failover (CLI): ask the current leader to hand the group to ``target``."""
    await client.put(keys.handover, handover_value(target, term, "planned", "cli"))


async def set_drain(client: EtcdClient, keys: GroupKeys, node: str, reason: str = "") -> None:
    await client.put(keys.drain(node), reason.encode())


async def clear_drain(client: EtcdClient, keys: GroupKeys, node: str) -> None:
    await client.delete(keys.drain(node))
