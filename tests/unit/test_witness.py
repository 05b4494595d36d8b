"""The peer's side of the hold: PeerWitness answers from the group's PromiseBook and
binds the machine in the same step (GroupRuntime.promise)."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address
from typing import Any

import pytest

from halb.agent.witness import PeerWitness
from halb.ha.hold import REFUSE_ACTIVE, REFUSE_NOT_MEMBER, REFUSE_REACHES_ETCD, Grant, Refusal
from halb.ha.machine import CampaignWon, LeaderObserved, LeaseGranted, Machine, MachineConfig, Timer
from halb.ha.runtime import GroupRuntime
from halb.model import IPAddress, Term
from halb.testing.clock import FakeClock
from halb.timing import HoldPolicy

pytestmark = pytest.mark.unit

P = HoldPolicy(promise=2.0, renew=0.05, quiet_after=0.075)
TERM = Term(0x10, 5)


class Vips:
    async def add(self, vip: IPAddress, lifetime: int | None) -> None:
        pass

    async def remove(self, vip: IPAddress) -> bool:
        return True

    def announce(self, vip: IPAddress) -> int:
        return 1


class Coord:
    def __init__(self) -> None:
        self.reaches = False

        self.probes = 0

    def reaches_etcd(self, window: float) -> bool:
        assert window == P.quiet
        return self.reaches

    async def probe(self, timeout: float) -> bool:
        self.probes += 1
        return self.reaches


def setup() -> tuple[PeerWitness, GroupRuntime, Coord, FakeClock]:
    clock = FakeClock()
    machine = Machine(MachineConfig(node="lb2", priority=100, fence_wait=0.5))
    rt = GroupRuntime(machine, None, Vips(), addresses=[IPv4Address("10.0.0.1")], clock=clock)
    coord = Coord()
    w = PeerWitness(clock)
    w.add_group("web", P, ["lb1", "lb2"], rt, coord)  # type: ignore[arg-type]
    return w, rt, coord, clock


def run(body: Any) -> None:
    asyncio.run(asyncio.wait_for(body(), 10))


def test_a_grant_binds_the_machine_and_every_outcome_is_counted() -> None:
    async def body() -> None:
        w, rt, coord, _ = setup()
        assert w.bound_for("web") == pytest.approx(2.0)  # born bound
        assert w.answer("web", "lb1", TERM) == Grant(2.0)
        assert rt.machine.st.promised and rt.machine.st.timer(Timer.PROMISE) is not None
        coord.reaches = True
        assert w.answer("web", "lb1", TERM) == Refusal(REFUSE_REACHES_ETCD)
        assert w.answer("web", "mallory", TERM) == Refusal(REFUSE_NOT_MEMBER)
        other = w.answer("db", "lb1", TERM)
        assert isinstance(other, Refusal) and REFUSE_NOT_MEMBER in other.reason
        assert w.answers[("web", "granted")] == 1
        assert w.answers[("web", REFUSE_REACHES_ETCD)] == 1
        assert w.doc("web")["granted"] == 1
        await asyncio.sleep(0)
        assert coord.probes >= 1  # each request probes etcd (one at a time)

    run(body)


def test_a_node_holding_the_group_never_promises() -> None:
    async def body() -> None:
        w, rt, _, _ = setup()
        rt.machine.feed(LeaseGranted(TERM.lease_id))
        rt.machine.feed(LeaderObserved(None))
        rt.machine.feed(CampaignWon(TERM))
        assert rt.machine.contending
        assert w.answer("web", "lb1", TERM) == Refusal(REFUSE_ACTIVE)
        assert not rt.machine.st.promised

    run(body)
