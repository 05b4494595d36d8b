"""Pure in-place updates of the nft table: only what a backend change alters."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from halb.dataplane.nft.delta import ChainFill, update
from halb.dataplane.nft.ruleset import render, ring_slots
from halb.model import Backend, Forwarding, Protocol, Scheduler, Service, ServiceKey

pytestmark = pytest.mark.unit

VIP = IPv4Address("10.99.0.100")
SNAT = IPv4Address("10.99.1.2")
BS = tuple(Backend(IPv4Address(f"10.99.1.{20 + i}"), 9000) for i in range(1, 5))
KEY = ServiceKey(VIP, 9000, Protocol.TCP)
RR_KEY = ServiceKey(VIP, 9001, Protocol.UDP)


def services(tcp: tuple[Backend, ...] = BS[:3], udp: tuple[Backend, ...] = BS[:2]) -> list[Service]:
    return [
        Service(KEY, Scheduler.MAGLEV, Forwarding.NAT, tcp, 1009),
        Service(RR_KEY, Scheduler.RR, Forwarding.FULLNAT, udp),
    ]


def _lines(script: str, prefix: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith(prefix)]


def test_unchanged_services_give_an_empty_update() -> None:
    old = render(services(), {VIP: SNAT})
    upd = update(old, list(reversed(services())), {VIP: SNAT})
    assert upd is not None and upd.empty and upd.script() == ""
    assert upd.rendered.parts[KEY] is old.parts[KEY]  # reused, not rebuilt


def test_layout_change_needs_a_full_load() -> None:
    old = render(services(), {VIP: SNAT})
    assert update(old, services()[:1], {VIP: SNAT}) is None  # a service removed
    other = services()
    other[0] = Service(KEY, Scheduler.MAGLEV, Forwarding.NAT, BS[:3], 1013)
    assert update(old, other, {VIP: SNAT}) is None  # another ring size
    assert update(old, services(), {VIP: IPv4Address("10.99.1.3")}) is None  # SNAT moved


def test_added_backend_rewrites_only_the_slots_it_takes() -> None:
    old = render(services(), {VIP: SNAT})
    new_services = services(tcp=BS)
    upd = update(old, new_services, {VIP: SNAT})
    assert upd is not None and upd.raw  # counters, elements and slots: no rule
    before, after = ring_slots(services()[0]), ring_slots(new_services[0])
    moved = {i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b}
    assert moved and len(moved) < len(before) // 3  # Maglev: about a quarter
    # Maglev moves a few slots between old backends too; most go to the new one.
    taken = [i for i in moved if after[i] == BS[3]]
    assert len(taken) > 0.8 * len(moved)
    value = "10.99.1.24 . 9000"
    dele = _lines(upd.script(), "delete element inet halb ring_10_99_0_100_tcp_9000 ")
    add = _lines(upd.script(), "add element inet halb ring_10_99_0_100_tcp_9000 ")
    assert len(dele) == 1 and len(add) == 1
    assert add[0].count(f" : {value}") == len(taken)
    assert add[0].count(" : ") == len(moved)
    assert dele[0].count(",") == len(moved) - 1
    # The new counter comes before the counter-map element that points at it.
    script = upd.script()
    counter = "be_10_99_0_100_tcp_9000_10_99_1_24_9000"
    assert script.index(f"add counter inet halb {counter}\n") < script.index(f'"{counter}"')
    assert (
        f'add element inet halb bec_10_99_0_100_tcp_9000 {{ 10.99.1.24 . 9000 : "{counter}" }}\n'
    ) in script
    assert "add element inet halb backends4 { 10.99.1.24 . tcp . 9000 }\n" in script
    assert "chain" not in script  # no rule changes: Maglev dispatch rules are constant
    assert "udp" not in script  # the other service is untouched
    assert "table" not in script.replace("inet halb", "")  # no table-wide command


def test_removed_backend_is_deleted_after_its_last_reference() -> None:
    old = render(services(), {VIP: SNAT})
    upd = update(old, services(tcp=BS[:2]), {VIP: SNAT})
    assert upd is not None
    lines = upd.script().splitlines()
    counter = "be_10_99_0_100_tcp_9000_10_99_1_23_9000"
    assert lines[-2:] == [
        "delete element inet halb bec_10_99_0_100_tcp_9000 { 10.99.1.23 . 9000 }",
        f"delete counter inet halb {counter}",
    ]
    ring_add = _lines(upd.script(), "add element inet halb ring_")[0]
    assert "10.99.1.23" not in ring_add
    # 10.99.1.23 stays in backends4: no other service had it, so it goes.
    assert "delete element inet halb backends4 { 10.99.1.23 . tcp . 9000 }" in lines


def test_health_change_only_moves_ring_slots_and_rr_rule() -> None:
    old = render(services(), {VIP: SNAT})
    down = Backend(BS[0].address, 9000, weight=0)
    upd = update(old, services(tcp=(down, *BS[1:3]), udp=(down, BS[1])), {VIP: SNAT})
    assert upd is not None
    script = upd.script()
    # The down backend keeps its counter and set element: only the round-robin rule is
    # rewritten, and the ring's slots move.
    assert "counter" not in script and "backends4" not in script
    assert upd.head == (
        ChainFill(
            "d_10_99_0_100_udp_9001",
            ("meta l4proto udp dnat ip to numgen inc mod 1 map { 0 : 10.99.1.22 . 9000 }",),
        ),
    )
    assert not upd.tail and not upd.raw  # a rule: libnftables
    (edit,) = upd.rings
    before = ring_slots(services()[0])
    assert {i for i, b in enumerate(before) if b == BS[0]} <= set(edit.delete)
    after = ring_slots(services(tcp=(down, *BS[1:3]))[0])
    assert set(edit.delete) == {
        i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b
    }
    assert {i for _, slots in edit.add for i in slots} == set(edit.delete)


def test_maglev_health_change_is_rings_only() -> None:
    old = render(services(), {VIP: SNAT})
    down = Backend(BS[0].address, 9000, weight=0)
    upd = update(old, services(tcp=(down, *BS[1:3])), {VIP: SNAT})
    assert upd is not None and upd.raw and not (upd.head or upd.tail)
    weighted = Backend(BS[1].address, 9000, weight=3)
    heavier = update(old, services(tcp=(BS[0], weighted, BS[2])), {VIP: SNAT})
    assert heavier is not None and heavier.raw and heavier.slots > 0
    assert not (heavier.head or heavier.tail)


def test_every_backend_down_empties_the_ring_and_back() -> None:
    old = render(services(), {VIP: SNAT})
    down = tuple(Backend(b.address, 9000, weight=0) for b in BS[:3])
    empty = update(old, services(tcp=down), {VIP: SNAT})
    assert empty is not None
    assert empty.raw and not (empty.head or empty.tail)
    (edit,) = empty.rings
    assert not edit.add and len(edit.delete) == 1009
    back = update(empty.rendered, services(), {VIP: SNAT})
    assert back is not None
    (edit,) = back.rings
    assert not edit.delete and edit.added == 1009
    assert back.rendered.parts[KEY].ring == old.parts[KEY].ring
