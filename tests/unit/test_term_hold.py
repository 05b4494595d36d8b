"""halb.ha.holding.TermHold on a fake clock: when the hold starts, what it hands the
coordinator, how a refusal and a silent peer count, and how it ends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

import pytest

from halb.ha.hold import Grant, Refusal
from halb.ha.holding import HoldStatus, TermHold
from halb.model import Term
from halb.testing.clock import FakeClock
from halb.timing import HoldPolicy

pytestmark = pytest.mark.unit

TERM = Term(1, 10)
P = HoldPolicy(promise=0.5, renew=0.1, drift=0.0, withdraw=0.05, quiet_after=0.15)


class Coord:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.etcd_ok = clock.now()
        self.usual: float | None = clock.now() + 0.5
        self.held: list[float | None] = []

    @property
    def usual_fence_deadline(self) -> float | None:
        return self.usual

    def hold(self, until: float | None) -> None:
        self.held.append(until)

    def etcd_quiet_for(self) -> float:
        return self.clock.now() - self.etcd_ok


class Peers:
    def __init__(self) -> None:
        self.answers: dict[str, Grant | Refusal | None] = {}  # None: silent
        self.asked: list[tuple[str, int]] = []
        self.connected: list[str] = []

    def connect(self, peers: Iterable[str]) -> None:
        self.connected.extend(peers)

    async def ask(
        self, peer: str, group: str, term: Term, round_: int, timeout: float
    ) -> Grant | Refusal:
        self.asked.append((peer, round_))
        a = self.answers.get(peer, Grant(0.5))
        if a is None:
            raise ConnectionError("no route")
        return a


def run(body: Callable[[FakeClock, Coord, Peers, TermHold, list[int]], Awaitable[None]]) -> None:
    async def main() -> None:
        clock = FakeClock()
        coord, peers, refreshes = Coord(clock), Peers(), [0]

        async def refresh() -> None:
            refreshes[0] += 1

        th = TermHold(group="web", term=TERM, policy=P, peers=["b", "c"], port=peers,
                      coord=coord, clock=clock, refresh=refresh, status=HoldStatus())  # fmt: skip
        task = asyncio.create_task(th.run())
        try:
            await body(clock, coord, peers, th, refreshes)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(asyncio.wait_for(main(), 10))


def test_no_hold_while_etcd_answers_then_every_peer_is_asked() -> None:
    async def body(
        clock: FakeClock, coord: Coord, peers: Peers, th: TermHold, r: list[int]
    ) -> None:
        for _ in range(5):  # etcd keeps answering: nobody is asked
            coord.etcd_ok = clock.now()
            await clock.advance(0.1)
        assert peers.asked == [] and coord.held == []
        assert peers.connected == ["b", "c"]  # channels opened at the term's start
        await clock.advance(0.2)  # quiet for 0.2 s > quiet_after
        assert {p for p, _ in peers.asked} == {"b", "c"}
        asked_at = clock.now()
        # Hold until the earliest promise end: sent + 0.5 - withdraw.
        assert coord.held[-1] == pytest.approx(asked_at + 0.45, abs=0.11)
        assert r[0] >= 1  # VIPs re-added and the dead-man switch re-armed
        assert th.status.holding_since is not None and set(th.status.promises) == {"b", "c"}

    run(body)


def test_a_refusing_or_silent_peer_gives_no_extension_its_promise_runs_out() -> None:
    async def body(
        clock: FakeClock, coord: Coord, peers: Peers, th: TermHold, r: list[int]
    ) -> None:
        await clock.advance(0.3)
        first = coord.held[-1]
        assert first is not None
        peers.answers["c"] = None  # silent: its older promise still binds it
        await clock.advance(0.3)
        assert coord.held[-1] == first  # no extension from c, but not cut short either
        assert th.status.refusals["c"].startswith("silent")
        peers.answers["c"] = Refusal("reaches etcd")
        await clock.advance(0.1)
        # No extension; c's standing promise still binds it, so it still counts.
        assert coord.held[-1] == first
        assert th.status.refusals["c"] == "reaches etcd"
        await clock.advance(0.5)  # c's promise is over: nothing lets us hold
        assert coord.held[-1] is None or coord.held[-1] < clock.now()

    run(body)


def test_when_etcd_answers_again_the_hold_ends_once_the_usual_deadline_is_valid() -> None:
    async def body(
        clock: FakeClock, coord: Coord, peers: Peers, th: TermHold, r: list[int]
    ) -> None:
        await clock.advance(0.4)
        assert coord.held and coord.held[-1] is not None
        coord.etcd_ok = clock.now()  # a watch event, but no keepalive yet
        coord.usual = clock.now() - 1.0
        n = len(peers.asked)
        await clock.advance(0.1)
        assert len(peers.asked) == n  # peers reach etcd now: no more asking
        assert coord.held[-1] is not None  # what was promised still holds
        coord.etcd_ok = clock.now()
        coord.usual = clock.now() + 1.5  # a keepalive succeeded
        await clock.advance(0.1)
        assert coord.held[-1] is None
        assert th.status.last_end == "etcd answers again" and th.status.holding_since is None

    run(body)
