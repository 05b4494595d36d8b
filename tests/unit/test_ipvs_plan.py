from __future__ import annotations

from ipaddress import ip_address

import pytest

from halb.dataplane.ipvs.kernel import DestSpec, FwdMethod, desired_state
from halb.dataplane.ipvs.plan import OpKind, plan
from halb.model import Backend, Forwarding, Protocol, Scheduler, Service, ServiceKey

KEY = ServiceKey(ip_address("10.0.0.100"), 80, Protocol.TCP)


def svc(
    scheduler: Scheduler = Scheduler.MAGLEV,
    forwarding: Forwarding = Forwarding.DSR,
    weights: tuple[int, ...] = (1, 1),
    key: ServiceKey = KEY,
    sorry: tuple[Backend, ...] = (),
) -> Service:
    backends = tuple(Backend(ip_address(f"10.0.1.{i + 1}"), 80, w) for i, w in enumerate(weights))
    return Service(key, scheduler, forwarding, backends, sorry=sorry)


def kinds(old: list[Service], new: list[Service]) -> list[OpKind]:
    return [op.kind for op in plan(desired_state(new), desired_state(old))]


def test_desired_state_maps_modes_and_schedulers() -> None:
    state = desired_state([svc(Scheduler.MAGLEV, Forwarding.NAT)])[KEY]
    assert (state.spec.sched, state.spec.flags) == ("mh", 0x10)  # MH_PORT
    assert {d.fwd for d in state.dests} == {FwdMethod.MASQ}
    assert desired_state([svc(Scheduler.WLC, Forwarding.TUNNEL)])[KEY].dests[0].fwd == 2
    assert (
        desired_state([svc(Scheduler.SH)])[KEY].spec == desired_state([svc(Scheduler.SH)])[KEY].spec
    )
    assert desired_state([svc(Scheduler.SH)])[KEY].spec.flags == 0


def test_fullnat_is_refused() -> None:
    with pytest.raises(ValueError, match="fullnat"):
        desired_state([svc(forwarding=Forwarding.FULLNAT)])


def test_sorry_backends_only_when_no_regular_backend_has_weight() -> None:
    sorry = (Backend(ip_address("10.0.9.9"), 80, 1),)
    assert len(desired_state([svc(weights=(1, 0), sorry=sorry)])[KEY].dests) == 2
    dests = desired_state([svc(weights=(0, 0), sorry=sorry)])[KEY].dests
    assert DestSpec(ip_address("10.0.9.9"), 80, FwdMethod.DROUTE, 1) in dests
    assert len(dests) == 3  # weight-0 dests stay: their connections drain


def test_same_state_needs_no_write() -> None:
    assert kinds([svc()], [svc()]) == []


def test_new_service_then_its_dests_in_sorted_order() -> None:
    ops = plan(desired_state([svc(weights=(1, 1, 1))]), {})
    assert [op.kind for op in ops] == [OpKind.ADD_SERVICE] + [OpKind.ADD_DEST] * 3
    addrs = [op.dest.address for op in ops[1:] if op.dest]
    assert addrs == sorted(addrs)


def test_weight_change_edits_one_dest() -> None:
    ops = plan(desired_state([svc(weights=(1, 5))]), desired_state([svc()]))
    assert [(op.kind, op.dest.weight if op.dest else None) for op in ops] == [(OpKind.EDIT_DEST, 5)]


def test_scheduler_change_edits_the_service_only() -> None:
    assert kinds([svc(Scheduler.RR)], [svc(Scheduler.MAGLEV)]) == [OpKind.EDIT_SERVICE]


def test_forwarding_change_edits_every_dest() -> None:
    assert kinds([svc()], [svc(forwarding=Forwarding.TUNNEL)]) == [OpKind.EDIT_DEST] * 2


def test_removed_backend_and_service_are_deleted_first() -> None:
    other = ServiceKey(ip_address("10.0.0.101"), 80, Protocol.TCP)
    assert kinds([svc(weights=(1, 1)), svc(key=other)], [svc(weights=(1,))]) == [
        OpKind.DEL_SERVICE,
        OpKind.DEL_DEST,
    ]


def test_duplicate_service_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        desired_state([svc(), svc()])
