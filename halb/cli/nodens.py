"""Where this host can read a node's conntrack or IPVS table from.

Those tables live in the node's network namespace, so `halb flows` and `halb dataplane
show` read them where the node runs: in the lab (one host, a namespace per node,
named in the lab's state) that is the node's namespace; on a real balancer it is the
current namespace, for the node the command names (``--node``, or ``HALB_NODE``).
Other nodes run elsewhere: the command reports them unavailable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from halb.config import ClusterConfig

__all__ = ["NodeNs", "locate"]


@dataclass(frozen=True, slots=True)
class NodeNs:
    available: bool
    netns: str | None = None  # None: the current namespace
    why: str = ""


def _lab_namespaces(cfg: ClusterConfig) -> dict[str, str]:
    from halb.lab.builder import load_state
    from halb.lab.topology import site_from_env

    site = site_from_env()
    if site.cluster != cfg.cluster:
        return {}
    state = load_state(site) or {}
    return {n["name"]: n["namespace"] for n in state.get("nodes", [])}


def locate(cfg: ClusterConfig, node: str, *, netns: str | None, only: bool) -> NodeNs:
    """``netns``: given on the command line; ``only``: the command names just this
    node."""
    if netns is not None:
        return NodeNs(True, netns)
    lab = _lab_namespaces(cfg)
    if node in lab:
        return NodeNs(True, lab[node])
    if only or os.environ.get("HALB_NODE") == node:
        return NodeNs(True, None)
    return NodeNs(False, why=f"runs elsewhere: run `halb flows --node {node}` on it")
