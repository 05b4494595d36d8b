"""Every interval of the HA protocol, derived in one place (pure; read by everyone else).

The safety argument, in the order time runs. ``s`` is the send time of the last
keepalive (or heartbeat) that succeeded, on the leader's monotonic clock.

1. **Lease.** etcd renewed the lease no earlier than it received the request, so the
   lease cannot expire on the etcd side before ``s + lease_ttl``; no standby can win a
   campaign before then (the leader key lives on the lease).
2. **Self-fence.** A leader whose keepalives fail drops its VIPs at
   ``s + lease_ttl - fence_margin`` (``fence_after`` after ``s``): ``fence_margin`` is the
   time left for removing the addresses, so a live leader is gone before (1) lets
   anyone in. At least ``MIN_KEEPALIVES_BEFORE_FENCE`` keepalives are tried before that.
3. **Kernel lifetime.** Every successful keepalive re-adds the VIP with
   ``valid_lft = vip_lifetime`` (whole seconds): a frozen or killed leader's address is
   withdrawn by the kernel itself. The kernel's address sweep runs about once a second,
   so the lifetime is a bound only where ``vip_lifetime + KERNEL_ADDRESS_SWEEP <
   lease_ttl`` (``lifetime_fences_frozen_leader``); with short leases it is a backstop,
   and the dead-man switch (4) is what fences a frozen leader.
4. **Dead-man switch** (fast takeover, dataplanes with one). The active heartbeats every
   ``heartbeat_interval``, each only while the leader key holds its term, and arms its
   dataplane to stop forwarding and answering ARP at ``s_hb + heartbeat_timeout``. A
   standby that sees no heartbeat for ``heartbeat_timeout`` (+ its rank skew) revokes the
   lease: no heartbeat can succeed after that, so the old leader's switch fires by
   ``revoke + heartbeat_timeout``; with several groups sharing one switch, one more
   interval; the dataplane's coarse clock adds up to ``DEADMAN_TICK_MARGIN``. Every node
   waits ``fence_wait`` (their sum) after the vacancy before campaigning, so even a
   frozen leader has stopped by then. The XDP adapter fires ``DEADMAN_EARLY_TICKS``
   coarse ticks *early* (its clock trails), never late.
5. **Coordinator outage** (``failover.coordinator_outage: hold``, dataplanes with a
   dead-man switch only). While etcd is silent the active may keep its VIPs on the
   strength of its peers' promises (halb.ha.hold: the argument in full). The holder
   asks every ``renew`` (the heartbeat interval, else half a keepalive interval) once
   etcd has been quiet for ``quiet_after`` (one success cadence and half a renewal),
   each call bounded by ``call_timeout``; a peer is bound ``promise`` (a few renewals)
   per grant. The first answers must land before the usual fence, and a promise must
   cover two renewals after its round trip, else one late reply drops the VIP.
6. **Resumed term.** A new term adds VIPs only after its first heartbeat succeeded (a
   standby may already have revoked the campaign's lease).

Invariants (``Timings.violations`` lists any broken one; unit tests check them over the
whole allowed config range): fence deadline < lease expiry; keepalives fit before the
fence; the VIP lifetime outlasts a keepalive interval; heartbeat timeout >= 3 intervals
and < the lease TTL; fence wait covers the dead-man deadline; the lease TTL is whole
seconds (etcd would round it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from halb.model import DataplaneKind

__all__ = [
    "DEADMAN_DATAPLANES",
    "DEADMAN_EARLY_TICKS",
    "DEADMAN_TICK_MARGIN",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "HOLD_RENEWALS",
    "KERNEL_ADDRESS_SWEEP",
    "MIN_FENCE_MARGIN",
    "MIN_KEEPALIVES_BEFORE_FENCE",
    "MIN_LEASE_TTL",
    "MIN_PROMISE",
    "OUTAGE_FENCE",
    "OUTAGE_HOLD",
    "RANK_SKEW",
    "HoldPolicy",
    "LeaseTimings",
    "Timings",
    "derive",
    "fence_wait",
    "heartbeat_interval_for",
    "hold_policy",
    "lease_timings",
    "outage_mode_for",
    "rpc_timeout_for",
    "ttl_issue",
    "vip_lifetime",
]

MIN_LEASE_TTL = 1.0
DEFAULT_HEARTBEAT_INTERVAL = 0.1
# Dataplanes whose adapter enforces a dead-man deadline (forwarding and ARP).
DEADMAN_DATAPLANES = frozenset({DataplaneKind.XDP, DataplaneKind.NFT})
# The XDP program reads jiffies (one tick: 4 ms at HZ=250, 10 ms at HZ=100; they move
# with CLOCK_MONOTONIC_COARSE); nft expires set elements on its own clock, also at tick
# granularity.
DEADMAN_TICK_MARGIN = 0.02
# The XDP adapter arms its deadline this many coarse ticks early (the clock it reads
# trails CLOCK_MONOTONIC by up to a tick, a little more when the tick runs late), plus
# one when it converts the deadline to jiffies (halb.dataplane.xdp.clock).
DEADMAN_EARLY_TICKS = 2
# Share of the TTL kept between the self-fence and the earliest lease expiry.
FENCE_MARGIN_SHARE = 0.3
MIN_FENCE_MARGIN = 0.25
# Keepalives per TTL: four, so two can fail before the fence.
KEEPALIVES_PER_TTL = 4
MIN_KEEPALIVES_BEFORE_FENCE = 2
# Linux checks address lifetimes about once a second (addrconf_verify).
KERNEL_ADDRESS_SWEEP = 1.0
# Lower-ranked standbys campaign and judge heartbeats this much later per rank, so the
# best standby usually acts alone.
RANK_SKEW = 0.05
# Coordinator outage modes (failover.coordinator_outage).
OUTAGE_HOLD = "hold"
OUTAGE_FENCE = "fence"
# A promise spans this many renewals (so a lost reply or two changes nothing), and
# never less than MIN_PROMISE: when etcd comes back the peers reach it (and refuse)
# first, and the holder's own etcd client may need about a second more to reconnect
# (measured in the lab); its heartbeat must get through before its last promise ends.
HOLD_RENEWALS = 5
MIN_PROMISE = 2.0
# The holder's time to stop forwarding once its hold ends: the dead-man switch fires
# within DEADMAN_TICK_MARGIN; the rest is slack for the deadline's early arming.
HOLD_WITHDRAW = 0.05
# The status document's lease: longer than the election's, whole seconds.
STATUS_TTL_FACTOR = 3
MIN_STATUS_TTL = 2


@dataclass(frozen=True, slots=True)
class HoldPolicy:
    """The peer-witnessed hold's intervals (halb.ha.hold holds the protocol)."""

    promise: float  # seconds a peer is bound per grant
    renew: float  # the holder asks every ``renew`` seconds
    drift: float = 0.001  # bound on any clock's rate error (1000 ppm; NTP gives ~50)
    withdraw: float = HOLD_WITHDRAW  # the holder's time to withdraw (VIP, switch tick)
    # etcd quiet this long (no success): the holder asks, a peer says it cannot reach it.
    quiet_after: float = 0.0
    call_timeout: float = 0.0  # per peer call; 0: ``renew``

    def __post_init__(self) -> None:
        if not 0 < self.renew < self.promise:
            raise ValueError("a promise must outlast the renewal interval")
        if not 0 <= self.drift < 0.1:
            raise ValueError("clock drift bound out of range")

    @property
    def deadline(self) -> float:
        """One peer call's deadline."""
        return self.call_timeout or self.renew

    @property
    def quiet(self) -> float:
        return self.quiet_after or self.renew

    def hold_end(self, asked_at: float, granted: float) -> float:
        """The last instant (holder's clock) the holder may hold on the strength of a
        grant of ``granted`` seconds to a request it sent at ``asked_at``."""
        return asked_at + granted * (1 - self.drift) / (1 + self.drift) - self.withdraw


@dataclass(frozen=True, slots=True)
class LeaseTimings:
    """What the coordinator needs for one lease."""

    lease_ttl: int  # whole seconds: etcd's unit
    keepalive_interval: float
    fence_margin: float
    rpc_timeout: float

    @property
    def fence_after(self) -> float:
        """Seconds after a keepalive's send time at which its leader fences."""
        return self.lease_ttl - self.fence_margin


def lease_timings(lease_ttl: float) -> LeaseTimings:
    """Keepalive cadence and fence margin for a lease TTL (whole seconds; a fractional
    one is refused by config validation, see ``ttl_issue``)."""
    ttl = max(1, math.ceil(lease_ttl))
    keepalive = ttl / KEEPALIVES_PER_TTL
    margin = max(MIN_FENCE_MARGIN, FENCE_MARGIN_SHARE * ttl)
    return LeaseTimings(ttl, keepalive, margin, rpc_timeout_for(keepalive))


def rpc_timeout_for(keepalive_interval: float) -> float:
    """Bound of one coordinator call: a keepalive late by more than its own interval
    is treated as failed (the next one is due)."""
    return max(0.2, keepalive_interval)


def vip_lifetime(lease_ttl: float, fence_margin: float) -> int:
    """The VIP address lifetime (whole seconds): no later than the process itself would
    have fenced, never below 1 s (the kernel's unit)."""
    return max(1, int(lease_ttl - fence_margin))


def ttl_issue(lease_ttl: float) -> str | None:
    """Why etcd could not take ``lease_ttl`` as given, or None."""
    if lease_ttl < MIN_LEASE_TTL:
        return f"{lease_ttl:g} is below the minimum of {MIN_LEASE_TTL:g} second"
    if lease_ttl != int(lease_ttl):
        return (
            f"{lease_ttl:g} is not a whole number of seconds: etcd grants leases in whole "
            f"seconds and would make it {math.ceil(lease_ttl)}"
        )
    return None


@dataclass(frozen=True, slots=True)
class Timings:
    """Every derived interval for one node in one group (seconds unless named)."""

    lease: LeaseTimings
    vip_lifetime: int
    heartbeat_interval: float  # 0: no heartbeats (fail over on the lease TTL)
    heartbeat_timeout: float
    fence_wait: float  # after a forced vacancy, before campaigning; 0: no forcing
    campaign_delay: float  # rank skew before campaigning for a vacant group
    watchdog_slack: float  # rank skew added to the heartbeat timeout by a standby
    status_ttl: int  # the status document's lease
    hold: HoldPolicy | None = None  # None: a coordinator outage fences (today's way)

    @property
    def heartbeats(self) -> bool:
        return self.heartbeat_interval > 0

    @property
    def lifetime_fences_frozen_leader(self) -> bool:
        """Whether the kernel withdraws a frozen leader's VIP before its lease can
        expire (else the lifetime is a backstop and the dead-man switch fences)."""
        # Strictly: the refresh lands a round trip after the keepalive's send time.
        return self.vip_lifetime + KERNEL_ADDRESS_SWEEP < self.lease.lease_ttl

    def violations(self) -> list[str]:
        """Broken invariants of the safety argument (empty when safe)."""
        out: list[str] = []
        lease = self.lease
        if not 0 < lease.fence_margin < lease.lease_ttl:
            out.append("the self-fence must come before the lease can expire")
        if lease.fence_margin < MIN_FENCE_MARGIN:
            out.append(f"fence margin below {MIN_FENCE_MARGIN:g} s")
        if lease.keepalive_interval * MIN_KEEPALIVES_BEFORE_FENCE > lease.fence_after:
            out.append("fewer than two keepalives fit before the fence")
        if self.vip_lifetime < 1 or self.vip_lifetime < lease.keepalive_interval:
            out.append("the VIP lifetime would run out between two keepalives")
        if self.heartbeats:
            if self.heartbeat_timeout < 3 * self.heartbeat_interval:
                out.append("heartbeat timeout under 3 intervals")
            if self.heartbeat_timeout >= lease.lease_ttl:
                out.append("heartbeat timeout not below the lease TTL")
            covered = self.heartbeat_timeout + self.heartbeat_interval + DEADMAN_TICK_MARGIN
            if self.fence_wait < covered:
                out.append("fence wait shorter than the old leader's dead-man deadline")
        elif self.fence_wait != 0:
            out.append("a fence wait without heartbeats")
        if self.status_ttl < lease.lease_ttl:
            out.append("status lease shorter than the election lease")
        if self.hold is not None:
            out.extend(self._hold_violations(self.hold))
        return out

    def _hold_violations(self, h: HoldPolicy) -> list[str]:
        out: list[str] = []
        usual = self.heartbeat_timeout if self.heartbeats else self.lease.fence_after
        if h.quiet + h.deadline >= usual:
            out.append("the hold's first promises cannot arrive before the usual fence")
        if h.hold_end(0.0, h.promise) < 2 * h.renew + h.deadline:
            out.append("a promise does not cover two renewals")
        if h.withdraw < DEADMAN_TICK_MARGIN:
            out.append("the hold's withdraw time is shorter than the dead-man switch's tick")
        return out


def heartbeat_interval_for(interval: float | None, kind: DataplaneKind) -> float:
    """The configured interval, or the default: on with a dead-man switch, else off."""
    if interval is not None:
        return interval
    return DEFAULT_HEARTBEAT_INTERVAL if kind in DEADMAN_DATAPLANES else 0.0


def fence_wait(heartbeat_interval: float, heartbeat_timeout: float) -> float:
    """How long every node waits after a forced vacancy: the old leader's last
    heartbeat deadline, one interval for the other groups sharing its dataplane switch,
    and a tick of the dataplane's coarse clock."""
    if heartbeat_interval <= 0:
        return 0.0
    return heartbeat_timeout + heartbeat_interval + DEADMAN_TICK_MARGIN


def outage_mode_for(mode: str | None, kind: DataplaneKind) -> str:
    """The configured coordinator-outage mode, or the default: hold where a frozen
    holder is fenced by its own kernel at the hold's end (a dead-man switch), else fence."""
    if mode is not None:
        return mode
    return OUTAGE_HOLD if kind in DEADMAN_DATAPLANES else OUTAGE_FENCE


def hold_policy(lease: LeaseTimings, heartbeat_interval: float) -> HoldPolicy:
    """Renew at the heartbeat cadence (else half a keepalive interval); a promise spans
    a few renewals; etcd counts as quiet after one success cadence and half a renewal."""
    cadence = heartbeat_interval if heartbeat_interval > 0 else lease.keepalive_interval
    renew = heartbeat_interval if heartbeat_interval > 0 else lease.keepalive_interval / 2
    return HoldPolicy(
        promise=max(MIN_PROMISE, HOLD_RENEWALS * renew),
        renew=renew,
        quiet_after=cadence + renew / 2,
        call_timeout=renew,
    )


def derive(
    *,
    lease_ttl: float,
    heartbeat_interval: float | None,
    heartbeat_timeout: float,
    kind: DataplaneKind,
    rank: int = 0,
    coordinator_outage: str | None = None,
) -> Timings:
    """All intervals for a node of priority ``rank`` (0 = the best) in a group."""
    lease = lease_timings(lease_ttl)
    interval = heartbeat_interval_for(heartbeat_interval, kind)
    hold = (
        hold_policy(lease, interval)
        if outage_mode_for(coordinator_outage, kind) == OUTAGE_HOLD
        else None
    )
    return Timings(
        lease=lease,
        vip_lifetime=vip_lifetime(lease.lease_ttl, lease.fence_margin),
        heartbeat_interval=interval,
        heartbeat_timeout=heartbeat_timeout,
        fence_wait=fence_wait(interval, heartbeat_timeout),
        campaign_delay=RANK_SKEW * rank,
        watchdog_slack=RANK_SKEW * rank,
        status_ttl=max(MIN_STATUS_TTL, STATUS_TTL_FACTOR * lease.lease_ttl),
        hold=hold,
    )
