"""The runtime's ownership check between a coordinator's fence and the machine
hearing of it (found in the lab: a leader resumed from SIGSTOP announced once)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from ipaddress import IPv4Address

import pytest

from halb.ha.machine import CampaignWon, LeaderObserved, LeaseGranted, Machine, MachineConfig
from halb.ha.runtime import GroupRuntime, _TermTask
from halb.model import IPAddress, Term

pytestmark = pytest.mark.unit

VIP = IPv4Address("10.0.0.100")
TERM = Term(0x10, 5)


class Vips:
    def __init__(self) -> None:
        self.announced = 0

    async def add(self, vip: IPAddress, lifetime: int | None) -> None:
        pass

    async def remove(self, vip: IPAddress) -> bool:
        return True

    def announce(self, vip: IPAddress) -> int:
        self.announced += 1
        return 1


class Coord:
    """Only what the ownership check reads."""

    def __init__(self, deadline: float | None, ready: bool = True) -> None:
        self.fence_deadline = deadline
        self.heartbeats = False
        self._ready = ready

    def ready(self, term: Term) -> bool:
        return self._ready

    async def heartbeat(self, term: Term, ready: Callable[[], None] | None = None) -> None:
        pass

    async def force_takeover(self, term: Term) -> None:
        pass

    async def run(self) -> None:
        pass

    async def campaign(self, lease: int) -> None:
        pass

    async def resign(self, lease: int) -> None:
        pass

    async def request_handover(self, target: str, term: Term, reason: str = "") -> None:
        pass

    async def clear_handover(self) -> None:
        pass

    def retire(self) -> None:
        pass


def announced(coord: Coord) -> int:
    machine = Machine(MachineConfig("lb1", 100))
    for ev in (LeaseGranted(TERM.lease_id), LeaderObserved(None), CampaignWon(TERM)):
        machine.feed(ev)
    assert machine.holds(TERM)
    vips = Vips()
    rt = GroupRuntime(machine, coord, vips, addresses=[VIP], announce_count=1)
    tt = _TermTask(TERM)
    tt.added.append(VIP)  # what the term holds is what it announces
    asyncio.run(rt._announce(tt))
    return vips.announced


def test_announces_inside_the_deadline() -> None:
    assert announced(Coord(deadline=1e12)) == 1


def test_no_announcement_once_the_coordinator_has_dropped_the_lease() -> None:
    # The machine still holds the term (FenceDeadlinePassed is queued, not yet fed).
    assert announced(Coord(deadline=None)) == 0


def test_no_announcement_past_the_deadline_or_before_the_first_heartbeat() -> None:
    assert announced(Coord(deadline=0.0)) == 0
    assert announced(Coord(deadline=1e12, ready=False)) == 0


class SlowVips(Vips):
    """Kernel addresses as a set; each add takes a little while."""

    def __init__(self) -> None:
        super().__init__()
        self.held: set[IPAddress] = set()

    async def add(self, vip: IPAddress, lifetime: int | None) -> None:
        await asyncio.sleep(0.01)
        self.held.add(vip)

    async def remove(self, vip: IPAddress) -> bool:
        found = vip in self.held
        self.held.discard(vip)
        return found


VIP2 = IPv4Address("10.0.0.101")


async def holding_runtime(vips: SlowVips) -> GroupRuntime:
    """A runtime whose term task holds VIP (started, its first add landed)."""
    machine = Machine(MachineConfig("lb1", 100))
    for ev in (LeaseGranted(TERM.lease_id), LeaderObserved(None), CampaignWon(TERM)):
        machine.feed(ev)
    rt = GroupRuntime(machine, Coord(deadline=1e12), vips, addresses=[VIP])
    tt = _TermTask(TERM)
    rt._term = tt
    tt.task = asyncio.create_task(rt._run_term(tt))
    await asyncio.sleep(0.05)
    return rt


def test_set_addresses_follows_the_term_and_the_term_end_removes_what_it_added() -> None:
    async def scenario() -> None:
        vips = SlowVips()
        rt = await holding_runtime(vips)
        assert vips.held == {VIP}
        await rt.set_addresses([VIP, VIP2])
        assert vips.held == {VIP, VIP2} and vips.announced == 1
        await rt.set_addresses([VIP2])
        assert vips.held == {VIP2}
        await rt._end_term()
        assert vips.held == set()

    asyncio.run(scenario())


def test_an_add_in_flight_when_the_term_ends_is_removed_too() -> None:
    async def scenario() -> None:
        vips = SlowVips()
        rt = await holding_runtime(vips)
        adding = asyncio.create_task(rt.set_addresses([VIP, VIP2]))
        await asyncio.sleep(0.001)  # the add of VIP2 is in flight
        await rt._end_term()
        await adding
        assert vips.held == set()
        # A term that no longer holds adds nothing.
        await rt.set_addresses([VIP, VIP2])
        assert vips.held == set()

    asyncio.run(scenario())


def test_set_addresses_adds_nothing_once_ownership_is_gone() -> None:
    async def scenario() -> None:
        vips = SlowVips()
        rt = await holding_runtime(vips)
        assert isinstance(rt.coord, Coord)
        rt.coord.fence_deadline = 0.0  # past the fence: not owning any more
        await rt.set_addresses([VIP, VIP2])
        assert VIP2 not in vips.held
        await rt._end_term()

    asyncio.run(scenario())


def test_announcements_are_refreshed_while_the_term_holds_and_stop_when_it_does_not() -> None:
    from halb.testing.clock import FakeClock

    async def scenario() -> None:
        clock = FakeClock()
        machine = Machine(MachineConfig("lb1", 100))
        for ev in (LeaseGranted(TERM.lease_id), LeaderObserved(None), CampaignWon(TERM)):
            machine.feed(ev)
        vips, coord = Vips(), Coord(deadline=1e12)
        rt = GroupRuntime(
            machine,
            coord,
            vips,
            addresses=[VIP],
            announce_count=1,
            announce_refresh=5.0,
            clock=clock,
        )
        tt = _TermTask(TERM)
        tt.added.append(VIP)
        task = asyncio.create_task(rt._announce(tt))
        await clock.advance(12)
        assert (vips.announced, rt.refreshes) == (3, 2)  # at 0, 5 and 10 s
        coord.fence_deadline = 0.0  # past the fence: not owning any more
        await clock.advance(10)
        assert vips.announced == 3 and task.done()

    asyncio.run(scenario())
