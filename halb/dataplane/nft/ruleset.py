"""Pure rendering of halb's nftables table from the desired services.

The whole table is rendered as one `nft -f` script that deletes and re-creates it, so
the kernel swaps the old table for the new one in a single transaction: a script the
kernel rejects leaves the previous table untouched. That is needed only when the
layout changes (services added, removed, re-scheduled); everything a backend, weight
or health change alters lives in per-service chains, ring maps and set elements that
halb.dataplane.nft.delta rewrites in place.

Layout of ``table inet halb`` (chain priorities relative to conntrack at -200):

- ``pre_filter`` (prerouting, -150, after conntrack, before DNAT): drops
  ``ct state invalid`` packets to a VIP service or from a backend (with
  ``nf_conntrack_tcp_loose=0`` a mid-flow TCP packet without an entry is invalid, so it
  is dropped and retransmitted rather than sent to another backend as a new flow), and
  counts every client->VIP packet in the service's named counter.
- ``pre_nat`` (prerouting, dstnat): one rule per service goes to its dispatch chain
  ``d_<service>``, which DNATs through a map, Maglev (``jhash`` of the 5-tuple with a
  fixed seed -> slot of the map ``ring_<service>``) or round
  robin (``numgen inc``), whose element is the backend's address . port to DNAT to.
- ``forward_filter`` (forward, filter): one rule per service counts each backend's
  packets (original direction, after DNAT) in the backend's named counter, found in the
  service's map ``bec_<service>`` (backend address . port -> counter).
- ``post_nat`` (postrouting, srcnat): fullnat services SNAT to the group's floating
  backend-side address.

Only the first packet of a connection traverses the nat chains; conntrack carries the
rest, which is why counters live in the filter chains.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from halb.dataplane.base import Counter
from halb.lb.maglev import MaglevTable, build_table
from halb.model import Backend, Forwarding, IPAddress, Protocol, Scheduler, Service, ServiceKey

__all__ = [
    "FAMILY",
    "HASH_SEED",
    "INVALID_COUNTER",
    "TABLE",
    "BackendKey",
    "Endpoint",
    "RenderError",
    "Rendered",
    "Ring",
    "ServiceParts",
    "backend_counter",
    "backend_value",
    "checked",
    "counter_map",
    "delete_script",
    "dispatch_chain",
    "endpoint_value",
    "layout",
    "live_backends",
    "render",
    "ring_map",
    "ring_slots",
    "service_counter",
    "service_id",
    "service_parts",
]

TABLE = "halb"
FAMILY = "inet"
# A fixed jhash seed: every balancer must hash a 5-tuple to the same ring slot so a
# flow keeps its backend across failover even before its state is synced. Without
# `seed`, nft lets the kernel pick a random one per rule.
HASH_SEED = 0x48414C42  # "HALB"
# Packets dropped because they belong to no connection (mid-flow without state).
INVALID_COUNTER = "invalid"


class RenderError(ValueError):
    """The services cannot be expressed as an nftables table (names the service)."""


@dataclass(frozen=True, slots=True)
class Rendered:
    """The script, the layout it has, and each service's changeable part (from which
    an update is diffed and counters are read back)."""

    script: str
    layout: tuple[object, ...]
    parts: dict[ServiceKey, ServiceParts]

    @property
    def service_counters(self) -> dict[str, ServiceKey]:
        return {service_counter(k): k for k in self.parts}

    @property
    def backend_counters(self) -> dict[str, tuple[ServiceKey, Backend]]:
        return {name: (k, b) for k, p in self.parts.items() for name, b in p.counters}


def _ident(addr: IPAddress) -> str:
    return re.sub(r"[^0-9a-zA-Z]", "_", str(addr))


def service_id(key: ServiceKey) -> str:
    return f"{_ident(key.vip)}_{key.protocol.value}_{key.port}"


def service_counter(key: ServiceKey) -> str:
    return f"svc_{service_id(key)}"


def backend_counter(key: ServiceKey, backend: Backend) -> str:
    return f"be_{service_id(key)}_{_ident(backend.address)}_{backend.port}"


def _order(key: ServiceKey) -> tuple[int, int, int, str]:
    # ServiceKey's own order raises between IPv4 and IPv6 addresses.
    return (key.vip.version, int(key.vip), key.port, key.protocol.value)


_ADDR_T = {4: "ipv4_addr", 6: "ipv6_addr"}


def _ipkw(addr: IPAddress) -> str:
    return "ip" if addr.version == 4 else "ip6"


def _fmt(addr: IPAddress) -> str:
    return str(addr)


def live_backends(svc: Service) -> tuple[Backend, ...]:
    """Backends that take new flows: weight > 0, else the sorry backends."""
    live = tuple(b for b in svc.backends if b.weight > 0)
    if live:
        return live
    return tuple(b for b in svc.sorry if b.weight > 0)


def ring_slots(svc: Service) -> list[Backend | None]:
    """The Maglev ring of a service as halb.lb.maglev builds it: slot -> backend."""
    live = live_backends(svc)
    by_name = {str(b): b for b in live}
    table = build_table({name: b.weight for name, b in by_name.items()}, svc.ring_size)
    return table.mapped(lambda name: by_name[name])


def _check(svc: Service, snat: Mapping[IPAddress, IPAddress]) -> None:
    key = svc.key
    if svc.forwarding not in (Forwarding.NAT, Forwarding.FULLNAT):
        raise RenderError(f"{key}: forwarding {svc.forwarding.value!r} is not an nft mode")
    if svc.scheduler not in (Scheduler.MAGLEV, Scheduler.RR):
        raise RenderError(f"{key}: scheduler {svc.scheduler.value!r} is not supported by nft")
    for b in (*svc.backends, *svc.sorry):
        if not 0 < b.port < 65536:
            raise RenderError(f"{key}: backend {b} has no valid port")
        if b.address.version != key.vip.version:
            raise RenderError(f"{key}: backend {b} is not IPv{key.vip.version}")
    if svc.forwarding is Forwarding.FULLNAT:
        addr = snat.get(key.vip)
        if addr is None:
            raise RenderError(f"{key}: fullnat needs a SNAT address for VIP {key.vip}")
        if addr.version != key.vip.version:
            raise RenderError(f"{key}: SNAT address {addr} is not IPv{key.vip.version}")


def _set_block(name: str, elem_type: str, elements: Iterable[str], indent: str) -> list[str]:
    # Declared even when empty: an incremental update may fill it later.
    items = sorted(set(elements))
    elems = [f"{indent}  elements = {{ {', '.join(items)} }}"] if items else []
    return [f"{indent}set {name} {{", f"{indent}  type {elem_type}", *elems, f"{indent}}}"]


@dataclass(frozen=True, slots=True)
class ServiceParts:
    """What one service puts in the table beyond its layout: everything a backend,
    weight or health change may alter, so an update can rewrite just these
    (halb.dataplane.nft.delta)."""

    source: Service  # what these parts were made from
    key: ServiceKey
    counters: tuple[tuple[str, Backend], ...]  # backend counters (every backend)
    backend_keys: tuple[BackendKey, ...]  # this service's elements of backends4/6
    dispatch: tuple[str, ...]  # rules of its dispatch chain
    ring: Ring | None  # Maglev only


Endpoint = tuple[IPAddress, int]
"""A backend's address and port: what a ring slot DNATs to."""


@dataclass(frozen=True, slots=True)
class Ring:
    """A Maglev ring as nft holds it: ``slots`` (native int32, -1 = empty) index
    ``endpoints``. Bytes, so that comparing two rings is one memcmp and diffing them
    one numpy comparison (halb.dataplane.nft.delta)."""

    endpoints: tuple[Endpoint, ...]
    slots: bytes

    def endpoint_of(self) -> list[Endpoint | None]:
        """Slot -> endpoint."""
        values = [*self.endpoints, None]  # index -1 (empty) picks None
        return [values[i] for i in np.frombuffer(self.slots, dtype=np.int32).tolist()]


BackendKey = tuple[IPAddress, Protocol, int]
"""An element of backends4/6: a backend's address, the protocol, its port."""


def backend_value(k: BackendKey) -> str:
    return f"{_fmt(k[0])} . {k[1].value} . {k[2]}"


def endpoint_value(e: Endpoint) -> str:
    """An endpoint as the data of a ring or round-robin map element."""
    return f"{_fmt(e[0])} . {e[1]}"


@functools.lru_cache(maxsize=16)
def _maglev(weights: tuple[tuple[str, int], ...], size: int) -> MaglevTable:
    # A flapping backend alternates between two tables: keep recent ones (a 65537-slot
    # build costs ~30 ms of Python; a table is 256 KiB).
    return build_table(weights, size)


def dispatch_chain(key: ServiceKey) -> str:
    return f"d_{service_id(key)}"


def counter_map(key: ServiceKey) -> str:
    return f"bec_{service_id(key)}"


def ring_map(key: ServiceKey) -> str:
    return f"ring_{service_id(key)}"


def _match(key: ServiceKey) -> str:
    return f"{_ipkw(key.vip)} daddr {_fmt(key.vip)} {key.protocol.value} dport {key.port}"


def service_parts(svc: Service) -> ServiceParts:
    """The changeable part of one (checked) service."""
    key = svc.key
    ip = _ipkw(key.vip)
    proto = key.protocol.value
    live = live_backends(svc)
    counted = sorted({*svc.backends, *svc.sorry})
    dispatch: tuple[str, ...]
    ring: Ring | None = None
    # Rings and round robin map straight to the backend's address . port, not to
    # per-backend chains: a map holding verdicts makes the kernel re-validate every
    # chain reachable through it, every element included, on each commit that adds
    # one (tens of milliseconds with 65537-slot rings), data maps need no validation.
    nat = f"meta l4proto {proto} dnat {ip} to"
    if svc.scheduler is Scheduler.MAGLEV:
        # Constant rules: backends change only the ring's elements. An empty ring
        # (no live backend) misses and the next rule refuses the new flow.
        hashed = f"{ip} saddr . {proto} sport . {ip} daddr . {proto} dport"
        dispatch = (
            f"{nat} jhash {hashed} mod {svc.ring_size} seed {HASH_SEED:#x} map @{ring_map(key)}",
            "drop",
        )
        by_name = {str(b): b for b in live}
        table = _maglev(tuple(sorted((n, b.weight) for n, b in by_name.items())), svc.ring_size)
        ends = tuple((by_name[n].address, by_name[n].port) for n in table.names)
        ring = Ring(ends, table.slots.tobytes())
    elif live:
        ordered = sorted(live)
        elems = ", ".join(
            f"{i} : {endpoint_value((b.address, b.port))}" for i, b in enumerate(ordered)
        )
        dispatch = (f"{nat} numgen inc mod {len(ordered)} map {{ {elems} }}",)
    else:
        # No backend can take a new flow: refuse it here (established flows keep
        # their conntrack entry and never reach this chain).
        dispatch = ("drop",)
    return ServiceParts(
        source=svc,
        key=key,
        counters=tuple((backend_counter(key, b), b) for b in counted),
        backend_keys=tuple((b.address, key.protocol, b.port) for b in counted),
        dispatch=dispatch,
        ring=ring,
    )


def layout(services: Sequence[Service], snat: Mapping[IPAddress, IPAddress]) -> tuple[object, ...]:
    """What only a whole-table load can change: the services and how each is matched,
    scheduled and translated. Backends, weights and health are not part of it."""
    return tuple(
        (
            s.key.vip.version,
            str(s.key),
            s.scheduler.value,
            s.forwarding.value,
            s.ring_size if s.scheduler is Scheduler.MAGLEV else 0,
            str(snat.get(s.key.vip)) if s.forwarding is Forwarding.FULLNAT else "",
        )
        for s in sorted(services, key=lambda s: _order(s.key))
    )


def checked(services: Sequence[Service], snat: Mapping[IPAddress, IPAddress]) -> list[Service]:
    """The services in table order; RenderError names the first one nft cannot hold."""
    ordered = sorted(services, key=lambda s: _order(s.key))
    seen: set[ServiceKey] = set()
    for svc in ordered:
        if svc.key in seen:
            raise RenderError(f"{svc.key}: duplicate service")
        seen.add(svc.key)
        _check(svc, snat)
    return ordered


def _counter(name: str, carry: Mapping[str, Counter]) -> list[str]:
    c = carry.get(name)
    value = [f"    packets {c.packets} bytes {c.bytes}"] if c and (c.packets or c.bytes) else []
    return [f"  counter {name} {{", *value, "  }"]


def render(
    services: Sequence[Service],
    snat: Mapping[IPAddress, IPAddress] | None = None,
    carry: Mapping[str, Counter] | None = None,
) -> Rendered:
    """The `nft -f` script that replaces halb's table with exactly these services.

    ``snat`` maps a VIP to its group's floating backend-side address (fullnat).
    ``carry`` holds counter values to start from: replacing the table re-creates its
    counters, so the adapter reads them just before and carries them over.
    Deterministic: the same inputs in any order give the same script.
    """
    carry = carry or {}
    snat = dict(snat or {})
    ordered = checked(services, snat)
    parts = {svc.key: service_parts(svc) for svc in ordered}

    body: list[str] = []
    decls: list[str] = []
    dispatch: list[str] = []
    forward: list[str] = []
    post: list[str] = []
    svc_elems: dict[int, list[str]] = {4: [], 6: []}
    be_elems: dict[int, list[str]] = {4: [], 6: []}
    svc_counter_elems: dict[int, list[str]] = {4: [], 6: []}

    def chain(name: str, hook: str | None, rules: Iterable[str]) -> list[str]:
        head = [f"    {hook}"] if hook else []
        return [f"  chain {name} {{", *head, *(f"    {r}" for r in rules), "  }"]

    for svc in ordered:
        key = svc.key
        part = parts[key]
        ip = _ipkw(key.vip)
        proto = key.protocol.value
        v = key.vip.version
        cname = service_counter(key)
        decls += _counter(cname, carry)
        svc_elems[v].append(f"{_fmt(key.vip)} . {proto} . {key.port}")
        svc_counter_elems[v].append(f'{_fmt(key.vip)} . {proto} . {key.port} : "{cname}"')
        be_elems[v] += map(backend_value, part.backend_keys)
        for bname, _ in part.counters:
            decls += _counter(bname, carry)
        body += chain(dispatch_chain(key), None, part.dispatch)
        becs = ", ".join(
            f'{endpoint_value((b.address, b.port))} : "{name}"' for name, b in part.counters
        )
        decls += [
            f"  map {counter_map(key)} {{",
            f"    type {_ADDR_T[v]} . inet_service : counter",
            *([f"    elements = {{ {becs} }}"] if becs else []),
            "  }",
        ]
        if part.ring is not None:
            elems = ", ".join(
                f"{i} : {endpoint_value(e)}"
                for i, e in enumerate(part.ring.endpoint_of())
                if e is not None
            )
            decls += [
                f"  map {ring_map(key)} {{",
                f"    typeof numgen inc mod {svc.ring_size} : {ip} daddr . {proto} dport",
                *([f"    elements = {{ {elems} }}"] if elems else []),
                "  }",
            ]
        dispatch.append(f"{_match(key)} goto {dispatch_chain(key)}")
        forward.append(
            f"ct direction original meta l4proto {proto} "
            f"ct original {ip} daddr {_fmt(key.vip)} ct original proto-dst {key.port} "
            f"counter name {ip} daddr . {proto} dport map @{counter_map(key)}"
        )
        if svc.forwarding is Forwarding.FULLNAT:
            post.append(
                f"meta l4proto {proto} ct original {ip} daddr {_fmt(key.vip)} "
                f"ct original proto-dst {key.port} snat {ip} to {_fmt(snat[key.vip])}"
            )

    for v, addr_t in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        if not svc_elems[v]:
            continue
        decls += _set_block(
            f"services{v}", f"{addr_t} . inet_proto . inet_service", svc_elems[v], "  "
        )
        decls += _set_block(
            f"backends{v}", f"{addr_t} . inet_proto . inet_service", be_elems[v], "  "
        )
        decls += [
            f"  map svc_counters{v} {{",
            f"    type {addr_t} . inet_proto . inet_service : counter",
            f"    elements = {{ {', '.join(sorted(svc_counter_elems[v]))} }}",
            "  }",
        ]

    pre_filter = ["type filter hook prerouting priority -150; policy accept;"]
    for v, ip in ((4, "ip"), (6, "ip6")):
        if svc_elems[v]:
            pre_filter += [
                f"{ip} daddr . meta l4proto . th dport @services{v} ct state invalid "
                f'counter name "{INVALID_COUNTER}" drop',
                f"{ip} saddr . meta l4proto . th sport @backends{v} ct state invalid "
                f'counter name "{INVALID_COUNTER}" drop',
                f"ct direction original counter name {ip} daddr . meta l4proto . th dport "
                f"map @svc_counters{v}",
            ]
    decls = [*_counter(INVALID_COUNTER, carry), *decls]

    lines = [
        f"table {FAMILY} {TABLE}",
        f"delete table {FAMILY} {TABLE}",
        f"table {FAMILY} {TABLE} {{",
        *decls,
        *body,
        *chain("pre_filter", pre_filter[0], pre_filter[1:]),
        *chain("pre_nat", "type nat hook prerouting priority dstnat; policy accept;", dispatch),
        *chain(
            "forward_filter", "type filter hook forward priority filter; policy accept;", forward
        ),
        *chain("post_nat", "type nat hook postrouting priority srcnat; policy accept;", post),
        "}",
    ]
    return Rendered("\n".join(lines) + "\n", layout(ordered, snat), parts)


def delete_script() -> str:
    """Remove halb's table if it exists (the first line creates it when absent)."""
    return f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"
