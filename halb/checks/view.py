"""The cluster's backend view: one value, published by the active node, applied by all.

Pure. The view maps a backend key (``<vip:port/proto>/<backend>``, e.g.
``10.0.0.100:80/tcp/10.0.0.21:80``; IPv6 hosts in brackets) to that backend's
:class:`BackendView`. It has a ``revision`` (bumped on every change by the publisher),
and carries the publishing node and term. :meth:`HealthView.to_json` is deterministic
(sorted keys, no whitespace, times rounded to milliseconds), so equal views are equal
bytes and every node that applies the same view builds the same Maglev rings.

From view to dataplane (:func:`effective_services`), per configured service:

- ``down`` / ``damped`` backends are removed from ``backends``: they leave the Maglev
  ring, so only the slots they held move (Maglev's minimal disruption); flows pinned to
  them in a flow table are dead anyway, so an adapter may flush them.
- ``draining`` (operator drain, or weight 0 in the config): the backend stays in
  ``backends`` with weight 0. Weight 0 means "no new flows": Maglev leaves it out of
  the ring (``halb.lb.maglev.build_table`` skips weight 0), but flows already in the
  dataplane's flow table (BPF LRU map, conntrack, IPVS connections) keep going to it
  because the flow table is consulted before the ring; sync also keeps accepting
  flows to it, because it is still a backend of the service. An adapter must therefore
  not flush flows of weight-0 backends.
- ``up``: stays with its configured weight (the config is the only source of weights;
  the view's ``weight`` field is informational).
- When no backend can take new flows (none up with weight > 0), the service's ``sorry``
  backends are appended to ``backends`` with their configured weight, so they are the
  ring. Sorry backends are not health-checked (keepalived's ``sorry_server`` isn't).

So for the dataplane: *the ring of a service is exactly its backends with weight > 0*,
``{str(b): b.weight for b in svc.backends}`` fed to ``build_table``.

A backend missing from the view (e.g. just added to the config, view not yet
republished) counts as ``up``, the same as a fresh checker's initial state, so nodes
that share a config and a view still agree.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from halb.checks.base import CheckResult
from halb.checks.state import BackendHealth, Health
from halb.model import Backend, Service, ServiceKey

__all__ = [
    "BackendView",
    "Drain",
    "HealthView",
    "ViewError",
    "backend_key",
    "build_backends",
    "configured_backends",
    "effective_services",
    "next_view",
    "split_backend_key",
    "states_from_view",
]


class ViewError(ValueError):
    """A published view or drain value that cannot be read."""


def _t(x: float) -> float:
    # Millisecond resolution keeps JSON short and round trips exact.
    return round(float(x), 3)


def backend_key(service: ServiceKey | str, backend: Backend | str) -> str:
    """``<vip:port/proto>/<address:port>``: the view's key, and the drain key's tail."""
    return f"{service}/{backend}"


def split_backend_key(key: str) -> tuple[str, str]:
    """``("10.0.0.100:80/tcp", "10.0.0.21:80")``: the service part holds exactly one '/'."""
    parts = key.split("/")
    if len(parts) != 3 or not all(parts):
        raise ViewError(f"{key!r} is not <vip:port/proto>/<backend>")
    return f"{parts[0]}/{parts[1]}", parts[2]


def configured_backends(services: Iterable[Service]) -> list[tuple[str, Service, Backend]]:
    """Every checked backend (not the sorry ones) with its key, in config order."""
    return [(backend_key(s.key, b), s, b) for s in services for b in s.backends]


@dataclass(frozen=True, slots=True)
class Drain:
    """An operator drain (the value of a drain-backend key)."""

    reason: str = ""
    since: float = 0.0
    by: str = ""

    def to_json(self) -> bytes:
        return json.dumps(
            {"reason": self.reason, "since": _t(self.since), "by": self.by},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Drain:
        # Tolerate a hand-written key (`etcdctl put ... "maintenance"`): plain text is
        # the reason.
        try:
            doc = json.loads(data)
        except ValueError:
            return cls(reason=data.decode(errors="replace"))
        if not isinstance(doc, dict):
            return cls(reason=str(doc))
        try:
            return cls(
                reason=str(doc.get("reason", "")),
                since=float(doc.get("since", 0.0)),
                by=str(doc.get("by", "")),
            )
        except (TypeError, ValueError):
            raise ViewError(f"unreadable drain value {data!r}") from None


@dataclass(frozen=True, slots=True)
class BackendView:
    """One backend in the published view.

    ``state`` is up/down/damped from the checks, or ``draining`` when up but drained or
    of weight 0; ``since`` (wall-clock seconds) when it entered that state; ``reason``
    why. ``last_up``/``last_reason`` describe the latest check result (``None`` before
    the first one).
    """

    state: Health
    since: float
    reason: str
    weight: int
    drained: bool = False
    drain_reason: str = ""
    last_up: bool | None = None
    last_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "since": _t(self.since),
            "reason": self.reason,
            "weight": self.weight,
            "drained": self.drained,
            "drain_reason": self.drain_reason,
            "last": None
            if self.last_up is None
            else {"up": self.last_up, "reason": self.last_reason},
        }

    @classmethod
    def from_dict(cls, doc: Any) -> BackendView:
        try:
            last = doc.get("last")
            return cls(
                state=Health(doc["state"]),
                since=float(doc["since"]),
                reason=str(doc["reason"]),
                weight=int(doc["weight"]),
                drained=bool(doc.get("drained", False)),
                drain_reason=str(doc.get("drain_reason", "")),
                last_up=None if last is None else bool(last["up"]),
                last_reason="" if last is None else str(last["reason"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ViewError(f"unreadable backend entry {doc!r}: {exc}") from None


@dataclass(frozen=True)
class HealthView:
    """The published value. Treat ``backends`` as read-only."""

    revision: int
    backends: Mapping[str, BackendView] = field(default_factory=dict)
    node: str = ""
    term: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "node": self.node,
            "term": self.term,
            "backends": {k: self.backends[k].to_dict() for k in sorted(self.backends)},
        }

    def to_json(self) -> bytes:
        """Deterministic: equal views give equal bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> HealthView:
        try:
            doc = json.loads(data)
            backends = doc["backends"]
            if not isinstance(backends, dict):
                raise TypeError("backends is not a mapping")
            return cls(
                revision=int(doc["revision"]),
                node=str(doc.get("node", "")),
                term=str(doc.get("term", "")),
                backends={str(k): BackendView.from_dict(v) for k, v in backends.items()},
            )
        except ViewError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ViewError(f"unreadable health view: {exc}") from None


def _entry(state: BackendHealth | None, weight: int, drain: Drain | None) -> BackendView:
    if state is None:
        # since 0 = unknown: a stamp of "now" would change the view on every rebuild.
        health, since, reason, last = Health.UP, 0.0, "not checked yet", None
    else:
        health, since, reason, last = state.health, state.since, state.reason, state.last
    if health is Health.UP and (drain is not None or weight == 0):
        health = Health.DRAINING
        if drain is not None:
            since = max(since, drain.since)
            reason = f"drained by operator: {drain.reason}" if drain.reason else "drained"
        else:
            reason = "weight 0 in the config"
    return BackendView(
        state=health,
        since=_t(since),
        reason=reason,
        weight=weight,
        drained=drain is not None,
        drain_reason=drain.reason if drain is not None else "",
        last_up=None if last is None else last.up,
        last_reason="" if last is None else last.reason,
    )


def build_backends(
    services: Iterable[Service],
    states: Mapping[str, BackendHealth],
    drains: Mapping[str, Drain],
) -> dict[str, BackendView]:
    """The view's entries for every configured backend.

    ``states`` and ``drains`` are keyed by :func:`backend_key`; entries for backends
    that are not in the config are ignored. A backend without a state is ``up`` with
    ``since`` 0 (unknown), like a checker that has not run yet.
    """
    return {
        key: _entry(states.get(key), b.weight, drains.get(key))
        for key, _svc, b in configured_backends(services)
    }


def next_view(
    prev: HealthView | None, backends: Mapping[str, BackendView], *, node: str, term: str
) -> HealthView:
    """``prev`` itself when nothing changed, else a view with the next revision."""
    if (
        prev is not None
        and prev.node == node
        and prev.term == term
        and dict(prev.backends) == dict(backends)
    ):
        return prev
    revision = prev.revision + 1 if prev is not None else 1
    return HealthView(revision=revision, backends=dict(backends), node=node, term=term)


def effective_services(services: Iterable[Service], view: HealthView | None) -> list[Service]:
    """The services the dataplane must hold under ``view`` (see the module docstring)."""
    entries: Mapping[str, BackendView] = view.backends if view is not None else {}
    out: list[Service] = []
    for svc in services:
        kept: list[Backend] = []
        for b in svc.backends:
            entry = entries.get(backend_key(svc.key, b))
            if entry is not None and entry.state in (Health.DOWN, Health.DAMPED):
                continue
            if entry is not None and entry.drained:
                kept.append(replace(b, weight=0))
            else:
                kept.append(b)
        if not any(b.weight > 0 for b in kept):
            kept.extend(svc.sorry)
        out.append(replace(svc, backends=tuple(kept)))
    return out


def states_from_view(view: HealthView) -> dict[str, BackendHealth]:
    """Seed checker states from a published view (a standby promoted to active keeps
    the cluster's current opinion instead of starting every backend ``up``).

    ``draining`` seeds as up: the drain is re-applied by the view, not by the checks.
    """
    out: dict[str, BackendHealth] = {}
    for key, e in view.backends.items():
        health = Health.UP if e.state is Health.DRAINING else e.state
        # A damped backend is seeded as down: the hold's deadline is the old active
        # node's, and the new one's checks must bring it back through ``rise``.
        if health is Health.DAMPED:
            health = Health.DOWN
        last = None if e.last_up is None else CheckResult(e.last_up, e.last_reason)
        out[key] = BackendHealth(
            health=health,
            since=e.since,
            reason=e.reason,
            verdict=health is Health.UP,
            last=last,
        )
    return out
