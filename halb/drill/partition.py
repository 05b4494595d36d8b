"""Cut the balancer-to-balancer path in the lab while every node keeps etcd.

An nftables table of our own in each balancer's namespace drops traffic between the
isolated node's addresses and every other balancer's (front, back and management
segments), in both directions. VRRP adverts, flow sync and anything else between the
balancers stop; etcd (on the host address) and client traffic are untouched.
"""

from __future__ import annotations

from typing import Any

from halb.lab.netns import run

__all__ = ["TABLE", "cut", "heal", "ruleset"]

TABLE = "halb_drill_partition"


def _addresses(node: dict[str, Any]) -> list[str]:
    return [
        a.split("/")[0]
        for itf in node["interfaces"]
        for a in itf["addresses"]
        if ":" not in a.split("/")[0]
    ]


def ruleset(peers: list[str]) -> str:
    """The table that drops IPv4 traffic to and from ``peers`` (pure)."""
    peer_set = ", ".join(sorted(peers))
    return f"""table inet {TABLE} {{
  chain in {{ type filter hook input priority -20; ip saddr {{ {peer_set} }} drop; }}
  chain out {{ type filter hook output priority -20; ip daddr {{ {peer_set} }} drop; }}
}}
"""


def cut(state: dict[str, Any], node: str) -> str:
    nodes = state["nodes"]
    me = next(n for n in nodes if node in (n["name"], n["namespace"]))
    others = [n for n in nodes if n is not me]
    if not others:
        raise ValueError("a partition needs at least two balancer nodes")
    other_addrs = [a for n in others for a in _addresses(n)]
    run(["ip", "netns", "exec", me["namespace"], "nft", "-f", "-"], input_text=ruleset(other_addrs))
    for n in others:
        run(
            ["ip", "netns", "exec", n["namespace"], "nft", "-f", "-"],
            input_text=ruleset(_addresses(me)),
        )
    return f"{me['name']} cut off from {', '.join(n['name'] for n in others)} (etcd reachable)"


def heal(state: dict[str, Any]) -> bool:
    """Remove the partition tables; True when there was one."""
    found = False
    for n in state["nodes"]:
        tables = run(["ip", "netns", "exec", n["namespace"], "nft", "list", "tables"], check=False)
        if TABLE in tables:
            run(["ip", "netns", "exec", n["namespace"], "nft", "delete", "table", "inet", TABLE])
            found = True
    return found
