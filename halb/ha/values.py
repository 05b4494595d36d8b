"""The values of the election keys (halb.keys): JSON in, machine types out (pure).

A value that cannot be read is logged and treated as unknown, never raised: a stray
write must not stop an election.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from halb.ha.machine import Handover, Leader
from halb.model import Term

__all__ = [
    "handover_value",
    "heartbeat_term",
    "heartbeat_value",
    "leader_value",
    "parse_handover",
    "parse_leader",
    "parse_term",
    "term_str",
]

log = logging.getLogger("halb.ha.coord")


def term_str(term: Term) -> str:
    return f"{term.lease_id:x}@{term.revision}"


def parse_term(text: Any) -> Term | None:
    if not isinstance(text, str) or "@" not in text:
        return None
    lease, _, rev = text.partition("@")
    try:
        return Term(int(lease, 16), int(rev))
    except ValueError:
        return None


def heartbeat_term(value: bytes) -> Term | None:
    try:
        return parse_term(json.loads(value).get("term"))
    except (ValueError, AttributeError):
        return None


def parse_leader(value: bytes, lease: int, create_revision: int) -> Leader:
    """The leader key's value; the term comes from the key's metadata, not the value."""
    try:
        data = json.loads(value)
        holder, priority = str(data["node"]), int(data["priority"])
    except (ValueError, KeyError, TypeError):
        log.warning("leader key holds unreadable value %r; treating holder as unknown", value)
        holder, priority = "?", 0
    return Leader(holder, priority, Term(lease, create_revision))


def parse_handover(value: bytes) -> Handover | None:
    try:
        data = json.loads(value)
        return Handover(
            str(data["target"]), parse_term(data.get("term")), str(data.get("reason", ""))
        )
    except (ValueError, KeyError, TypeError):
        log.warning("handover key holds unreadable value %r; ignoring it", value)
        return None


def handover_value(target: str, term: Term | None, reason: str, by: str) -> bytes:
    return json.dumps(
        {
            "target": target,
            "term": term_str(term) if term else None,
            "reason": reason,
            "by": by,
        }
    ).encode()


def leader_value(node: str, priority: int, lease: int) -> bytes:
    return json.dumps({"node": node, "priority": priority, "lease": f"{lease:x}"}).encode()


def heartbeat_value(term: Term, seq: int) -> bytes:
    return json.dumps({"term": term_str(term), "seq": seq}).encode()
