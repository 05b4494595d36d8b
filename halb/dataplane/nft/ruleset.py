"""Pure rendering of halb's nftables table from the desired services.

The whole table is rendered as one `nft -f` script that deletes and re-creates it, so
the kernel swaps the old table for the new one in a single transaction: a script the
kernel rejects leaves the previous table untouched.

Layout of ``table inet halb`` (chain priorities relative to conntrack at -200):

- ``pre_filter`` (prerouting, -150, after conntrack, before DNAT): drops
  ``ct state invalid`` packets to a VIP service or from a backend (with
  ``nf_conntrack_tcp_loose=0`` a mid-flow TCP packet without an entry is invalid, so it
  is dropped and retransmitted rather than sent to another backend as a new flow), and
  counts every client->VIP packet in the service's named counter.
- ``pre_nat`` (prerouting, dstnat): one rule per service picks a backend chain through a
  verdict map, Maglev (``jhash`` of the 5-tuple with a fixed seed -> ring slot) or round
  robin (``numgen inc``); each backend chain DNATs to its backend.
- ``forward_filter`` (forward, filter): counts each backend's packets (original
  direction, after DNAT) in its named counter.
- ``post_nat`` (postrouting, srcnat): fullnat services SNAT to the group's floating
  backend-side address.

Only the first packet of a connection traverses the nat chains; conntrack carries the
rest, which is why counters live in the filter chains.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from halb.dataplane.base import Counter
from halb.lb.maglev import build_table
from halb.model import Backend, Forwarding, IPAddress, Scheduler, Service, ServiceKey

__all__ = [
    "FAMILY",
    "HASH_SEED",
    "INVALID_COUNTER",
    "TABLE",
    "RenderError",
    "Rendered",
    "backend_counter",
    "delete_script",
    "live_backends",
    "render",
    "ring_slots",
    "service_counter",
    "service_id",
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
    """The script and the index needed to read counters back."""

    script: str
    service_counters: dict[str, ServiceKey]
    backend_counters: dict[str, tuple[ServiceKey, Backend]]


def _ident(addr: IPAddress) -> str:
    return re.sub(r"[^0-9a-zA-Z]", "_", str(addr))


def service_id(key: ServiceKey) -> str:
    return f"{_ident(key.vip)}_{key.protocol.value}_{key.port}"


def service_counter(key: ServiceKey) -> str:
    return f"svc_{service_id(key)}"


def backend_counter(key: ServiceKey, backend: Backend) -> str:
    return f"be_{service_id(key)}_{_ident(backend.address)}_{backend.port}"


def _backend_chain(key: ServiceKey, backend: Backend) -> str:
    return f"to_{service_id(key)}_{_ident(backend.address)}_{backend.port}"


def _ring_map(key: ServiceKey) -> str:
    return f"ring_{service_id(key)}"


def _order(key: ServiceKey) -> tuple[int, int, int, str]:
    # ServiceKey's own order raises between IPv4 and IPv6 addresses.
    return (key.vip.version, int(key.vip), key.port, key.protocol.value)


def _ipkw(addr: IPAddress) -> str:
    return "ip" if addr.version == 4 else "ip6"


def _fmt(addr: IPAddress) -> str:
    return str(addr)


def _endpoint(addr: IPAddress, port: int) -> str:
    return f"{addr}:{port}" if addr.version == 4 else f"[{addr}]:{port}"


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
        if b.address.version != key.vip.version:
            raise RenderError(f"{key}: backend {b} is not IPv{key.vip.version}")
    if svc.forwarding is Forwarding.FULLNAT:
        addr = snat.get(key.vip)
        if addr is None:
            raise RenderError(f"{key}: fullnat needs a SNAT address for VIP {key.vip}")
        if addr.version != key.vip.version:
            raise RenderError(f"{key}: SNAT address {addr} is not IPv{key.vip.version}")


def _set_block(name: str, elem_type: str, elements: Iterable[str], indent: str) -> list[str]:
    items = sorted(set(elements))
    if not items:
        return []
    return [
        f"{indent}set {name} {{",
        f"{indent}  type {elem_type}",
        f"{indent}  elements = {{ {', '.join(items)} }}",
        f"{indent}}}",
    ]


def _dispatch(svc: Service, live: Sequence[Backend], lines: list[str]) -> str:
    """The pre_nat rule of one service; appends any map it needs to ``lines``."""
    key = svc.key
    ip = _ipkw(key.vip)
    proto = key.protocol.value
    match = f"{ip} daddr {_fmt(key.vip)} {proto} dport {key.port}"
    if not live:
        # No backend can take a new flow: refuse it here (established flows keep
        # their conntrack entry and never reach this chain).
        return f"{match} drop"
    chains = {str(b): _backend_chain(key, b) for b in live}
    if svc.scheduler is Scheduler.RR:
        ordered = sorted(live)
        elems = ", ".join(f"{i} : goto {chains[str(b)]}" for i, b in enumerate(ordered))
        return f"{match} numgen inc mod {len(ordered)} vmap {{ {elems} }}"
    slots = ring_slots(svc)
    name = _ring_map(key)
    elems = ", ".join(f"{i} : goto {chains[str(b)]}" for i, b in enumerate(slots) if b is not None)
    lines += [
        f"  map {name} {{",
        f"    typeof numgen inc mod {svc.ring_size} : verdict",
        f"    elements = {{ {elems} }}",
        "  }",
    ]
    hashed = f"{ip} saddr . {proto} sport . {ip} daddr . {proto} dport"
    return f"{match} jhash {hashed} mod {svc.ring_size} seed {HASH_SEED:#x} vmap @{name}"


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
    ordered = sorted(services, key=lambda s: _order(s.key))
    seen: set[ServiceKey] = set()
    for svc in ordered:
        if svc.key in seen:
            raise RenderError(f"{svc.key}: duplicate service")
        seen.add(svc.key)
        _check(svc, snat)

    svc_counters: dict[str, ServiceKey] = {}
    be_counters: dict[str, tuple[ServiceKey, Backend]] = {}
    body: list[str] = []
    decls: list[str] = []
    dispatch: list[str] = []
    forward: list[str] = []
    post: list[str] = []
    svc_elems: dict[int, list[str]] = {4: [], 6: []}
    be_elems: dict[int, list[str]] = {4: [], 6: []}
    counter_map: dict[int, list[str]] = {4: [], 6: []}

    for svc in ordered:
        key = svc.key
        ip = _ipkw(key.vip)
        proto = key.protocol.value
        v = key.vip.version
        cname = service_counter(key)
        svc_counters[cname] = key
        decls += _counter(cname, carry)
        svc_elems[v].append(f"{_fmt(key.vip)} . {proto} . {key.port}")
        counter_map[v].append(f'{_fmt(key.vip)} . {proto} . {key.port} : "{cname}"')
        live = live_backends(svc)
        counted = sorted({*svc.backends, *svc.sorry})
        for b in counted:
            bname = backend_counter(key, b)
            be_counters[bname] = (key, b)
            decls += _counter(bname, carry)
            be_elems[v].append(f"{_fmt(b.address)} . {proto} . {b.port}")
            forward.append(
                f"ct direction original meta l4proto {proto} "
                f"ct original {ip} daddr {_fmt(key.vip)} ct original proto-dst {key.port} "
                f'{ip} daddr {_fmt(b.address)} {proto} dport {b.port} counter name "{bname}"'
            )
        for b in sorted(live):
            body += [
                f"  chain {_backend_chain(key, b)} {{",
                f"    meta l4proto {proto} dnat {ip} to {_endpoint(b.address, b.port)}",
                "  }",
            ]
        dispatch.append(_dispatch(svc, live, decls))
        if svc.forwarding is Forwarding.FULLNAT:
            post.append(
                f"meta l4proto {proto} ct original {ip} daddr {_fmt(key.vip)} "
                f"ct original proto-dst {key.port} snat {ip} to {_fmt(snat[key.vip])}"
            )

    for v, addr_t in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        decls += _set_block(
            f"services{v}", f"{addr_t} . inet_proto . inet_service", svc_elems[v], "  "
        )
        decls += _set_block(
            f"backends{v}", f"{addr_t} . inet_proto . inet_service", be_elems[v], "  "
        )
        if counter_map[v]:
            decls += [
                f"  map svc_counters{v} {{",
                f"    type {addr_t} . inet_proto . inet_service : counter",
                f"    elements = {{ {', '.join(sorted(counter_map[v]))} }}",
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

    def chain(name: str, hook: str, rules: list[str]) -> list[str]:
        return [f"  chain {name} {{", f"    {hook}", *(f"    {r}" for r in rules), "  }"]

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
    return Rendered("\n".join(lines) + "\n", svc_counters, be_counters)


def delete_script() -> str:
    """Remove halb's table if it exists (the first line creates it when absent)."""
    return f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"
