"""A discrete-time model of one VIP group's election with the peer-witnessed hold, for
checking "never two owners" over random fault sequences (tests/unit/test_hold.py).

What is modelled: real time in ticks; every node's monotonic clock with its own rate
(within the policy's drift bound) and offset; etcd (up or down, leases with TTLs kept by
keepalives and renewed in full when etcd restarts, the leader key on a lease); network
cuts between a node and etcd and between two nodes; nodes that are killed (their VIP and
dead-man deadline stay behind), frozen (likewise, until thawed) and restarted (their
promises forgotten). The nodes' decisions are the real pure pieces: ``HoldKeeper`` and
``PromiseBook`` (halb.ha.hold) and the lease timings (halb.timing). A node forwards for
the VIP while it believes it holds it *and* its own clock is before the deadline it
last armed in its dataplane: that is what the kernel enforces, even for a dead or
frozen process.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from halb.ha.hold import Grant, HoldKeeper, HoldPolicy, PromiseBook
from halb.timing import lease_timings

__all__ = ["Cluster", "Node", "random_run"]

TICK = 0.01


@dataclass
class Node:
    name: str
    rate: float
    offset: float
    policy: HoldPolicy | None
    started_at: float = 0.0
    alive: bool = True
    frozen: bool = False
    lease: int | None = None
    last_ok: float | None = None  # own clock: send time of the last keepalive that worked
    next_keepalive: float = 0.0
    active: bool = False
    has_vip: bool = False
    armed: float = float("-inf")  # own clock: the dataplane's dead-man deadline
    keeper: HoldKeeper | None = None
    next_ask: float = 0.0
    book: PromiseBook | None = None

    def clock(self, t: float) -> float:
        return self.offset + self.rate * t

    def forwarding(self, t: float) -> bool:
        return self.has_vip and self.clock(t) < self.armed


@dataclass
class Cluster:
    names: list[str]
    policy: HoldPolicy | None
    ttl: int = 2
    rng: random.Random = field(default_factory=random.Random)
    # Bugs to plant, to show the checker can fail.
    forget_promises_on_restart: bool = False
    # How often a peer's answer about etcd is wrong (its view lags the truth).
    view_noise: float = 0.0
    # Clock rates by node (default: random within the policy's drift bound).
    rates: dict[str, float] = field(default_factory=dict)
    t: float = 0.0
    etcd_up: bool = True
    cut_etcd: set[str] = field(default_factory=set)
    cut_pairs: set[frozenset[str]] = field(default_factory=set)
    leases: dict[int, float] = field(default_factory=dict)  # id -> real expiry
    leader: tuple[str, int] | None = None
    next_lease: int = 1
    nodes: dict[str, Node] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    outage_gaps: int = 0  # ticks with etcd down and nobody forwarding

    def __post_init__(self) -> None:
        drift = self.policy.drift if self.policy is not None else 0.001
        for name in self.names:
            rate = self.rates.get(name, 1 + self.rng.uniform(-drift, drift))
            self.nodes[name] = Node(name, rate, self.rng.uniform(0, 1000), self.policy)
            self._boot(self.nodes[name])
        self.timing = lease_timings(self.ttl)

    # -- the environment -------------------------------------------------------------------

    def reaches_etcd(self, n: Node) -> bool:
        return self.etcd_up and n.name not in self.cut_etcd

    def linked(self, a: Node, b: Node) -> bool:
        return frozenset({a.name, b.name}) not in self.cut_pairs

    def _boot(self, n: Node) -> None:
        n.alive, n.frozen = True, False
        n.lease = n.last_ok = None
        n.active = n.has_vip = False
        n.keeper = None
        now = n.clock(self.t)
        n.started_at = now
        if n.policy is not None:
            n.book = PromiseBook(n.policy, now)
            if self.forget_promises_on_restart:
                n.book = PromiseBook(n.policy, now - n.policy.promise)

    def kill(self, name: str) -> None:
        self.nodes[name].alive = False  # VIP and dead-man deadline stay in the kernel

    def restart(self, name: str) -> None:
        n = self.nodes[name]
        if not n.alive:
            # The kernel keeps an address until its deadline; the new process
            # reconciles it away at start-up.
            self._boot(n)

    # -- etcd ------------------------------------------------------------------------------

    def _etcd_tick(self) -> None:
        if not self.etcd_up:
            return
        for lease, expiry in list(self.leases.items()):
            if self.t >= expiry:
                del self.leases[lease]
                if self.leader is not None and self.leader[1] == lease:
                    self.leader = None

    def etcd_restart(self) -> None:
        self.etcd_up = True
        for lease in self.leases:  # a new etcd leader gives every lease a full TTL
            self.leases[lease] = self.t + self.ttl

    # -- one node --------------------------------------------------------------------------

    def _deadline(self, n: Node) -> float:
        fence = float("-inf")
        if n.lease is not None and n.last_ok is not None:
            fence = n.last_ok + self.timing.fence_after
        hold = n.keeper.hold_until() if n.keeper is not None else None
        return fence if hold is None else max(fence, hold)

    def _drop_vip(self, n: Node) -> None:
        n.active = n.has_vip = False
        n.keeper = None
        n.armed = float("-inf")

    def _node_tick(self, n: Node) -> None:
        now = n.clock(self.t)
        up = self.reaches_etcd(n)
        if n.lease is None and up:
            n.lease = self.next_lease
            self.next_lease += 1
            self.leases[n.lease] = self.t + self.ttl
            n.last_ok, n.next_keepalive = now, now + self.timing.keepalive_interval
        if n.lease is not None and up and now >= n.next_keepalive:
            n.next_keepalive = now + self.timing.keepalive_interval
            if n.lease in self.leases:
                self.leases[n.lease] = self.t + self.ttl
                n.last_ok = now
            else:
                n.lease = None  # lost: fence, a new lease next tick
                self._drop_vip(n)
                return
        # What this node sees of the leader key (only when it reaches etcd).
        if up and n.active and (self.leader is None or self.leader[1] != n.lease):
            self._drop_vip(n)
        bound = n.book is not None and n.book.bound(now)
        if up and not n.active and n.lease is not None and self.leader is None and not bound:
            self.leader = (n.name, n.lease)
            n.active = True
            if n.policy is not None:
                peers = [p for p in self.names if p != n.name]
                n.keeper = HoldKeeper(n.policy, peers)
                n.next_ask = now
        if n.active and n.keeper is not None and now >= n.next_ask:
            self._ask_peers(n, now)
        if not n.active:
            return
        deadline = self._deadline(n)
        if now >= deadline:
            self._drop_vip(n)
            n.lease = None  # self-fenced: gives the lease up
            return
        n.has_vip, n.armed = True, deadline

    def _ask_peers(self, n: Node, now: float) -> None:
        assert n.keeper is not None and n.policy is not None
        n.next_ask = now + n.policy.renew
        seq = n.keeper.ask(now)
        for p in self.nodes.values():
            if p is n or not (p.alive and not p.frozen and self.linked(n, p)):
                continue
            assert p.book is not None
            # Any answer about etcd is safe (a wrong "cannot reach" binds the peer, a
            # wrong "can" ends the hold), so the peer's view is allowed to lag.
            truth = self.reaches_etcd(p)
            view = truth if self.rng.random() >= self.view_noise else not truth
            reply = p.book.request(
                n.name,
                self.names,
                p.clock(self.t),
                reaches_etcd=view,
                contending=p.active,
            )
            if isinstance(reply, Grant):
                n.keeper.on_grant(p.name, seq, reply.duration)
            else:
                n.keeper.on_refusal(p.name, seq, reply.reason)

    # -- the run ---------------------------------------------------------------------------

    def tick(self) -> None:
        self._etcd_tick()
        for n in self.nodes.values():
            if n.alive and not n.frozen:
                self._node_tick(n)
        owners = [n.name for n in self.nodes.values() if n.forwarding(self.t)]
        if len(owners) > 1:
            self.violations.append(f"t={self.t:.2f}s: {owners} forward for the VIP")
        if not owners and not self.etcd_up:
            self.outage_gaps += 1
        self.t += TICK

    def run_for(self, seconds: float) -> None:
        for _ in range(round(seconds / TICK)):
            self.tick()


Fault = Callable[[Cluster], None]


def _faults(c: Cluster) -> list[tuple[str, Fault]]:
    rng = c.rng
    name = rng.choice(c.names)
    other = rng.choice([n for n in c.names if n != name])
    return [
        ("etcd down", lambda c: setattr(c, "etcd_up", False)),
        ("etcd up", lambda c: c.etcd_restart() if not c.etcd_up else None),
        (f"cut {name} from etcd", lambda c: c.cut_etcd.add(name)),
        ("heal etcd cuts", lambda c: c.cut_etcd.clear()),
        (f"heal {name} to etcd", lambda c: c.cut_etcd.discard(name)),
        (f"cut {name}-{other}", lambda c: c.cut_pairs.add(frozenset({name, other}))),
        ("heal peer cuts", lambda c: c.cut_pairs.clear()),
        (f"kill {name}", lambda c: c.kill(name)),
        (f"restart {name}", lambda c: c.restart(name)),
        (f"freeze {name}", lambda c: setattr(c.nodes[name], "frozen", True)),
        (f"thaw {name}", lambda c: setattr(c.nodes[name], "frozen", False)),
    ]


def random_run(
    seed: int,
    policy: HoldPolicy | None,
    *,
    nodes: int = 2,
    faults: int = 40,
    forget_promises_on_restart: bool = False,
    view_noise: float = 0.2,
) -> Cluster:
    """A cluster run through ``faults`` random faults, each followed by 0.05-3 s."""
    c = Cluster(
        [f"lb{i + 1}" for i in range(nodes)],
        policy,
        rng=random.Random(seed),
        forget_promises_on_restart=forget_promises_on_restart,
        view_noise=view_noise,
    )
    c.run_for(3.0)
    for _ in range(faults):
        _what, fault = c.rng.choice(_faults(c))
        fault(c)
        c.run_for(c.rng.uniform(0.05, 3.0))
    return c
