"""Pure: what turns one rendered table into another of the same layout.

A backend, weight or health change touches only the changed ring slots, the backend
counters that come or go with their elements in the service's counter map and in
``backends4/6``, and a round-robin service's dispatch rule. The whole update goes to the kernel
as one transaction: a rejected update leaves the running rules as they were. Rewriting
a 65537-slot ring whole costs about a third of a second per service in nft alone; a
backend added to ten rewrites about a tenth of it.

Order inside the transaction: what new rules reference is created first (counters),
and what old rules referenced is removed last, once nothing points at it.

An update without rule changes (every Maglev backend change; round robin rewrites its
rule) is made of counters, set elements and ring slots only, which
halb.dataplane.nft.nfnl sends as one raw nf_tables batch: libnftables parses text at
~4.5 us per element, which alone would take a tenth of a 65537-slot ring past 50 ms.
Anything else goes as one libnftables script of the same operations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from halb.dataplane.nft.ruleset import (
    FAMILY,
    TABLE,
    BackendKey,
    Endpoint,
    Rendered,
    Ring,
    ServiceParts,
    backend_value,
    checked,
    counter_map,
    dispatch_chain,
    endpoint_value,
    layout,
    ring_map,
    service_parts,
)
from halb.model import IPAddress, Service, ServiceKey

__all__ = [
    "BackendElem",
    "ChainFill",
    "CounterElem",
    "CounterOp",
    "Op",
    "RingEdit",
    "Update",
    "diff",
    "ring_edit",
    "update",
]

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
class CounterOp:
    """Add or delete a named counter."""

    add: bool
    name: str

    def lines(self) -> list[str]:
        return [f"{'add' if self.add else 'delete'} counter {_T} {self.name}"]


@dataclass(frozen=True, slots=True)
class BackendElem:
    """Add or delete an element of ``backends4/6``."""

    add: bool
    set: str
    key: BackendKey

    def lines(self) -> list[str]:
        verb = "add" if self.add else "delete"
        return [f"{verb} element {_T} {self.set} {{ {backend_value(self.key)} }}"]


@dataclass(frozen=True, slots=True)
class CounterElem:
    """Add or delete a backend's element of its service's counter map."""

    add: bool
    map: str
    key: Endpoint
    counter: str

    def lines(self) -> list[str]:
        if self.add:
            return [
                f'add element {_T} {self.map} {{ {endpoint_value(self.key)} : "{self.counter}" }}'
            ]
        return [f"delete element {_T} {self.map} {{ {endpoint_value(self.key)} }}"]


@dataclass(frozen=True, slots=True)
class ChainFill:
    """Replace a chain's rules (text only: rules are not encoded by hand)."""

    chain: str
    rules: tuple[str, ...]

    def lines(self) -> list[str]:
        return [
            f"flush chain {_T} {self.chain}",
            *(f"add rule {_T} {self.chain} {r}" for r in self.rules),
        ]


Op = CounterOp | BackendElem | CounterElem | ChainFill


@dataclass(frozen=True, slots=True)
class Update:
    """The operations of an in-place update: ``head`` (creations, rule rewrites), the
    ring edits, then ``tail`` (removals)."""

    rendered: Rendered  # the table once applied
    head: tuple[Op, ...]
    rings: tuple[RingEdit, ...]
    tail: tuple[Op, ...]

    @property
    def empty(self) -> bool:
        return not (self.head or self.rings or self.tail)

    @property
    def raw(self) -> bool:
        """No rule changes: the raw netlink path can carry all of it."""
        return not any(isinstance(op, ChainFill) for op in (*self.head, *self.tail))

    @property
    def slots(self) -> int:
        return sum(len(e.delete) + e.added for e in self.rings)

    def script(self) -> str:
        """The whole update as one libnftables script (one transaction)."""
        lines = [
            *(ln for op in self.head for ln in op.lines()),
            *(ln for e in self.rings for ln in e.lines()),
            *(ln for op in self.tail for ln in op.lines()),
        ]
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


def diff(
    old: Mapping[ServiceKey, ServiceParts], new: Mapping[ServiceKey, ServiceParts]
) -> tuple[tuple[Op, ...], tuple[RingEdit, ...], tuple[Op, ...]]:
    """(head, ring edits, tail) from ``old`` to ``new`` (the same services)."""
    if old.keys() != new.keys():
        raise ValueError("an update keeps the services; a layout change reloads the table")
    # backends4/6 is shared by every service of a family: an element goes only when no
    # service has it any more.
    old_be: dict[BackendKey, str] = {}
    new_be: dict[BackendKey, str] = {}
    for parts, out in ((old, old_be), (new, new_be)):
        for key, p in parts.items():
            out.update((k, f"backends{key.vip.version}") for k in p.backend_keys)
    head: list[Op] = []
    tail: list[Op] = []
    rings: list[RingEdit] = []
    for key in sorted(new, key=str):
        o, n = old[key], new[key]
        if o is n:
            continue
        cmap = counter_map(key)
        o_cnt, n_cnt = dict(o.counters), dict(n.counters)
        for name in sorted(n_cnt.keys() - o_cnt.keys()):
            b = n_cnt[name]
            head.append(CounterOp(True, name))
            head.append(CounterElem(True, cmap, (b.address, b.port), name))
        for name in sorted(o_cnt.keys() - n_cnt.keys()):
            b = o_cnt[name]
            tail.append(CounterElem(False, cmap, (b.address, b.port), name))
            tail.append(CounterOp(False, name))
        if n.dispatch != o.dispatch:
            head.append(ChainFill(dispatch_chain(key), n.dispatch))
        if n.ring is not None and o.ring is not None and n.ring != o.ring:
            edit = ring_edit(ring_map(key), o.ring, n.ring)
            if edit.delete or edit.added:
                rings.append(edit)
    head += [BackendElem(True, s, k) for k, s in new_be.items() if k not in old_be]
    # Element deletes before the counters they point at (already ordered per service).
    gone = [BackendElem(False, s, k) for k, s in old_be.items() if k not in new_be]
    return tuple(head), tuple(rings), tuple([*gone, *tail])
