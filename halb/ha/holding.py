"""The holder's side of the peer-witnessed hold, run inside a term (I/O around
halb.ha.hold.HoldKeeper).

While the term holds its VIPs and etcd has been quiet for ``policy.quiet`` seconds,
every ``policy.renew`` seconds one HoldKeeper round goes to every other member of the
group (each call bounded by ``policy.deadline``); after each round the coordinator's
``hold(until)`` gets the earliest promise end and the runtime's refresh path re-adds
the VIPs with their kernel lifetime and re-arms the dead-man switch to the (extended)
fence deadline. A silent peer's older promise still counts until it ends (the peer is
bound until then); a refusal ends that peer's share at once.

When etcd answers again the holder stops asking (its peers reach etcd now and would
refuse) and keeps what it was promised until the usual fence deadline is valid again
(a keepalive, and with heartbeats a heartbeat, succeeded); then the hold ends. If the
lease expired meanwhile the coordinator reports it lost, the term ends (this task is
cancelled with it) and the node campaigns again while its peers are still bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

from halb.ha.clock import Clock
from halb.ha.hold import Grant, HoldKeeper, Refusal
from halb.model import Term
from halb.timing import HoldPolicy

__all__ = ["HoldCoord", "HoldStatus", "PromisePort", "TermHold"]

log = logging.getLogger(__name__)


class PromisePort(Protocol):
    async def ask(
        self, peer: str, group: str, term: Term, round_: int, timeout: float
    ) -> Grant | Refusal: ...

    def connect(self, peers: Iterable[str]) -> None:
        """Get ready to ask ``peers`` (open connections ahead of an outage)."""
        ...


class HoldCoord(Protocol):
    @property
    def usual_fence_deadline(self) -> float | None: ...

    def hold(self, until: float | None) -> None: ...

    def etcd_quiet_for(self) -> float: ...


class HoldStatus:
    """What `halb status` and the metrics show of a group's hold."""

    def __init__(self) -> None:
        self.holding_since: float | None = None  # wall clock
        self.until_in: float | None = None  # seconds left of the hold (at the last round)
        self.promises: dict[str, float] = {}  # peer -> seconds left of its promise
        self.refusals: dict[str, str] = {}  # peer -> why it refused or was silent
        self.holds = 0  # holds started
        self.last_end: str | None = None  # why the last hold ended

    def doc(self) -> dict[str, object]:
        return {
            "holding": self.holding_since is not None,
            "holding_since": self.holding_since,
            "hold_left": None if self.until_in is None else round(self.until_in, 3),
            "promises": {p: round(v, 3) for p, v in sorted(self.promises.items())},
            "refusals": dict(sorted(self.refusals.items())),
            "holds": self.holds,
            "last_end": self.last_end,
        }


class TermHold:
    def __init__(
        self,
        *,
        group: str,
        term: Term,
        policy: HoldPolicy,
        peers: Sequence[str],
        port: PromisePort,
        coord: HoldCoord,
        clock: Clock,
        refresh: Callable[[], Awaitable[None]],
        status: HoldStatus,
    ) -> None:
        self.group = group
        self.term = term
        self.policy = policy
        self.peers = sorted(peers)
        self.port = port
        self.coord = coord
        self.clock = clock
        self.refresh = refresh
        self.status = status
        self.keeper: HoldKeeper | None = None
        self._logged: tuple[frozenset[str], frozenset[str]] | None = None

    async def run(self) -> None:
        """Until cancelled (the term's end)."""
        self.port.connect(self.peers)
        try:
            while True:
                await self._step()
        finally:
            if self.keeper is not None:
                why = ", ".join(f"{p}: {r}" for p, r in sorted(self.status.refusals.items()))
                self._end("the term ended" + (f" (last answers: {why})" if why else ""))

    async def _step(self) -> None:
        p = self.policy
        quiet = self.coord.etcd_quiet_for()
        if quiet < p.quiet:
            if self.keeper is not None:
                usual = self.coord.usual_fence_deadline
                if usual is not None and usual > self.clock.now():
                    self._end("etcd answers again")
                    await self.refresh()  # the dead-man switch back to the usual deadline
                else:
                    self._update()
            await self.clock.sleep(min(p.renew, 0.05) if self.keeper else p.renew)
            return
        if self.keeper is None:
            if not self.peers:
                await self.clock.sleep(p.renew)
                return  # nobody to witness: fence as usual
            self.keeper = HoldKeeper(p, self.peers)
            self.status.holding_since = time.time()
            self.status.holds += 1
            log.warning("%s: etcd silent for %.2fs: hold of term %s started, asking %s for "
                        "promises every %.2fs", self.group, quiet, self.term,
                        ", ".join(self.peers), p.renew)  # fmt: skip
        t0 = self.clock.now()
        await self._round(self.keeper)
        await self.clock.sleep(max(0.0, p.renew - (self.clock.now() - t0)))

    async def _round(self, keeper: HoldKeeper) -> None:
        seq = keeper.ask(self.clock.now())
        await asyncio.gather(*(self._ask(keeper, peer, seq) for peer in self.peers))
        self.coord.hold(keeper.hold_until())
        self._update()
        self._log_change(keeper)
        await self.refresh()

    async def _ask(self, keeper: HoldKeeper, peer: str, seq: int) -> None:
        try:
            answer = await asyncio.wait_for(
                self.port.ask(peer, self.group, self.term, seq, self.policy.deadline),
                self.policy.deadline + 0.05,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Silent: its older promise still binds it; no extension from it.
            self.status.refusals[peer] = f"silent ({type(exc).__name__})"
            return
        if isinstance(answer, Grant):
            keeper.on_grant(peer, seq, answer.duration)
            self.status.refusals.pop(peer, None)
        else:
            keeper.on_refusal(peer, seq, answer.reason)
            self.status.refusals[peer] = answer.reason

    def _update(self) -> None:
        now = self.clock.now()
        keeper = self.keeper
        if keeper is None:
            return
        self.status.promises = {p: u - now for p, u in keeper.promises().items()}
        until = keeper.hold_until()
        self.status.until_in = None if until is None else until - now

    def _log_change(self, keeper: HoldKeeper) -> None:
        key = (frozenset(keeper.promises()), frozenset(keeper.refusals))
        if key == self._logged:
            return
        self._logged = key
        now = self.clock.now()
        until = keeper.hold_until()
        promised = ", ".join(f"{p} (+{u - now:.2f}s)" for p, u in sorted(keeper.promises().items()))
        refused = ", ".join(f"{p}: {r}" for p, r in sorted(keeper.refusals.items()))
        if until is not None:
            log.info("%s: holding term %s for %.2fs more on promises from %s", self.group,
                     self.term, until - now, promised)  # fmt: skip
        else:
            log.warning("%s: hold of term %s gets no extension (promises: %s; refused: %s); "
                        "it ends at the last promise, then the node fences", self.group,
                        self.term, promised or "none", refused or "none")  # fmt: skip

    def _end(self, why: str) -> None:
        log.warning("%s: hold of term %s ended: %s", self.group, self.term, why)
        self.keeper = None
        self._logged = None
        self.coord.hold(None)
        self.status.holding_since = None
        self.status.until_in = None
        self.status.promises = {}
        self.status.last_end = why
