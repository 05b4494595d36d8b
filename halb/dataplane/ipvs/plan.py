"""Pure: the fewest IPVS writes that turn the kernel's state into the desired one.

Order matters for traffic, not for correctness: services that go away are deleted
first; a kept service is edited before its dests change; inside a service, dests that
leave are deleted before new ones are added (so a changed forwarding method never has
two dests for one address:port), and new dests go in sorted order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from halb.dataplane.ipvs.kernel import DestSpec, KernelService, ServiceSpec
from halb.model import IPAddress, ServiceKey

__all__ = ["Op", "OpKind", "plan"]


class OpKind(enum.StrEnum):
    ADD_SERVICE = "add-service"
    EDIT_SERVICE = "edit-service"
    DEL_SERVICE = "del-service"
    ADD_DEST = "add-dest"
    EDIT_DEST = "edit-dest"
    DEL_DEST = "del-dest"


@dataclass(frozen=True, slots=True)
class Op:
    kind: OpKind
    service: ServiceSpec
    dest: DestSpec | None = None

    def __str__(self) -> str:
        what = f" {self.dest.address}:{self.dest.port}" if self.dest else ""
        return f"{self.kind} {self.service.key}{what}"


def _by_addr(dests: tuple[DestSpec, ...]) -> dict[tuple[IPAddress, int], DestSpec]:
    return {(d.address, d.port): d for d in dests}


def plan(want: dict[ServiceKey, KernelService], have: dict[ServiceKey, KernelService]) -> list[Op]:
    ops = [Op(OpKind.DEL_SERVICE, have[k].spec) for k in sorted(have) if k not in want]
    for key in sorted(want):
        target = want[key]
        current = have.get(key)
        if current is None:
            ops.append(Op(OpKind.ADD_SERVICE, target.spec))
            ops += [Op(OpKind.ADD_DEST, target.spec, d) for d in target.dests]
            continue
        if current.spec != target.spec:
            ops.append(Op(OpKind.EDIT_SERVICE, target.spec))
        old, new = _by_addr(current.dests), _by_addr(target.dests)
        ops += [Op(OpKind.DEL_DEST, target.spec, d) for a, d in old.items() if a not in new]
        for addr, dest in new.items():
            before = old.get(addr)
            if before is None:
                ops.append(Op(OpKind.ADD_DEST, target.spec, dest))
            elif before != dest:
                ops.append(Op(OpKind.EDIT_DEST, target.spec, dest))
    return ops
