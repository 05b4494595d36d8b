"""Pure: what turns one rendered table into another of the same layout.

A backend, weight or health change touches only the changed ring slots, the backend
counters that come or go, the service's dispatch and counting chains when their rules
differ, and the backend set elements. The whole update goes to the kernel
as one transaction: a rejected update leaves the running rules as they were. Rewriting
a 65537-slot ring whole costs about a third of a second per service in nft alone; a
backend added to ten rewrites about a tenth of it.

Order inside the transaction: what new rules reference is created first (counters),
and what old rules referenced is removed last, once nothing points at it.

An update that only moves ring slots (health and weight changes on Maglev services,
the frequent case) is also given as RingEdits, which halb.dataplane.nft.nfnl sends as
one raw nf_tables batch: libnftables parses text at ~4.5 us per element, which alone
would take a tenth of a 65537-slot ring past 50 ms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from halb.dataplane.nft.ruleset import (
    FAMILY,
    TABLE,
    Endpoint,
    Rendered,
    Ring,
    ServiceParts,
    checked,
    dispatch_chain,
    endpoint_value,
    forward_chain,
    layout,
    ring_map,
    service_parts,
)
from halb.model import IPAddress, Service, ServiceKey

__all__ = ["RingEdit", "Update", "diff", "ring_edit", "update"]

_T = f"{FAMILY} {TABLE}"


@dataclass(frozen=True, slots=True)
class RingEdit:
    """Slots of one ring map to delete, then slots to add, grouped by the endpoint
    they map to (a few groups of thousands of slots: no Python work per slot)."""

    map: str
    delete: tuple[int, ...]
    add: tuple[tuple[Endpoint, tuple[int, ...]], ...]

    @property
    def added(self) -> int:
        return sum(len(slots) for _, slots in self.add)

    def lines(self) -> list[str]:
        # A map element's data cannot be replaced in place (the kernel answers EEXIST):
        # delete the slot and add it again, in the same transaction.
        out = []
        if self.delete:
            out.append(f"delete element {_T} {self.map} {{ {', '.join(map(str, self.delete))} }}")
        if self.add:
            elems = ", ".join(
                f"{i} : {value}"
                for e, slots in self.add
                for value in (endpoint_value(e),)
                for i in slots
            )
            out.append(f"add element {_T} {self.map} {{ {elems} }}")
        return out


@dataclass(frozen=True, slots=True)
class Update:
    """The commands of an in-place update: ``head`` (creations, chain rewrites), the
    ring edits, then ``tail`` (removals)."""

    rendered: Rendered  # the table once applied
    head: tuple[str, ...]
    rings: tuple[RingEdit, ...]
    tail: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.head or self.rings or self.tail)

    @property
    def rings_only(self) -> bool:
        """Only ring slots move: the raw netlink path can carry it."""
        return bool(self.rings) and not (self.head or self.tail)

    @property
    def slots(self) -> int:
        return sum(len(e.delete) + e.added for e in self.rings)

    def script(self) -> str:
        """The whole update as one libnftables script (one transaction)."""
        lines = [*self.head, *(ln for e in self.rings for ln in e.lines()), *self.tail]
        return "".join(f"{line}\n" for line in lines)


def update(
    old: Rendered, services: Sequence[Service], snat: Mapping[IPAddress, IPAddress]
) -> Update | None:
    """The table for ``services`` as an update of ``old``, or None when the layout
    differs and the table must be loaded whole. Raises RenderError like
    ruleset.render."""
    snat = dict(snat)
    ordered = checked(services, snat)
    shape = layout(ordered, snat)
    if shape != old.layout:
        return None
    parts: dict[ServiceKey, ServiceParts] = {}
    for svc in ordered:
        prev = old.parts.get(svc.key)
        # An unchanged service keeps its parts: no Maglev rebuild (tens of ms per ring).
        parts[svc.key] = prev if prev is not None and prev.source == svc else service_parts(svc)
    head, rings, tail = diff(old.parts, parts)
    return Update(Rendered("", shape, parts), head, rings, tail)


def ring_edit(name: str, old: Ring, new: Ring) -> RingEdit:
    """The slots whose endpoint differs, compared as arrays (65537 slots in well under
    a millisecond)."""
    ids = {e: i for i, e in enumerate(dict.fromkeys((*old.endpoints, *new.endpoints)))}
    values = list(ids)
    # One more entry, -1, for index -1: an empty slot stays -1 after the mapping.
    o_ids = np.array([*(ids[e] for e in old.endpoints), -1], dtype=np.int32)
    n_ids = np.array([*(ids[e] for e in new.endpoints), -1], dtype=np.int32)
    o = o_ids[np.frombuffer(old.slots, dtype=np.int32)]
    n = n_ids[np.frombuffer(new.slots, dtype=np.int32)]
    changed = np.flatnonzero(o != n)
    gone = changed[o[changed] >= 0]
    put = changed[n[changed] >= 0]
    to = n[put]
    add = tuple((values[v], tuple(put[to == v].tolist())) for v in np.unique(to).tolist())
    return RingEdit(name, tuple(gone.tolist()), add)


def _by_family(parts: Mapping[ServiceKey, ServiceParts]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {4: set(), 6: set()}
    for key, p in parts.items():
        out[key.vip.version].update(p.backend_elems)
    return out


def _fill(name: str, rules: Sequence[str]) -> list[str]:
    return [f"flush chain {_T} {name}", *(f"add rule {_T} {name} {r}" for r in rules)]


def _elements(items: Sequence[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def diff(
    old: Mapping[ServiceKey, ServiceParts], new: Mapping[ServiceKey, ServiceParts]
) -> tuple[tuple[str, ...], tuple[RingEdit, ...], tuple[str, ...]]:
    """(head, ring edits, tail) from ``old`` to ``new`` (the same services)."""
    if old.keys() != new.keys():
        raise ValueError("an update keeps the services; a layout change reloads the table")
    old_counters = {n for p in old.values() for n, _ in p.counters}
    new_counters = {n for p in new.values() for n, _ in p.counters}
    old_be, new_be = _by_family(old), _by_family(new)

    head: list[str] = [f"add counter {_T} {n}" for n in sorted(new_counters - old_counters)]
    for v in (4, 6):
        if added := new_be[v] - old_be[v]:
            head.append(f"add element {_T} backends{v} {_elements(sorted(added))}")
    rings: list[RingEdit] = []
    for key in sorted(new, key=str):
        o, n = old[key], new[key]
        if o is n:
            continue
        if n.forward != o.forward:
            head += _fill(forward_chain(key), n.forward)
        if n.dispatch != o.dispatch:
            head += _fill(dispatch_chain(key), n.dispatch)
        if n.ring is not None and o.ring is not None and n.ring != o.ring:
            edit = ring_edit(ring_map(key), o.ring, n.ring)
            if edit.delete or edit.add:
                rings.append(edit)
    tail: list[str] = []
    for v in (4, 6):
        if removed := old_be[v] - new_be[v]:
            tail.append(f"delete element {_T} backends{v} {_elements(sorted(removed))}")
    tail += [f"delete counter {_T} {n}" for n in sorted(old_counters - new_counters)]
    return tuple(head), tuple(rings), tuple(tail)
