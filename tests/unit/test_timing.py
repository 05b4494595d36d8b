"""halb.timing: one derivation of every interval, and the safety argument's invariants
over the whole range of configs that validation accepts."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml

from halb import timing
from halb.config import ConfigError, parse_config
from halb.model import DataplaneKind

ROOT = Path(__file__).resolve().parents[2]


def example(kind: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "examples" / f"{kind}.yaml").read_text())
    return doc


def test_fractional_lease_ttl_is_refused_with_its_field_path() -> None:
    doc = example("xdp")
    doc["etcd"]["lease_ttl"] = 1.5
    with pytest.raises(ConfigError) as ei:
        parse_config(doc)
    assert [i.path for i in ei.value.issues] == ["etcd.lease_ttl"]
    assert "whole number of seconds" in str(ei.value) and "make it 2" in str(ei.value)


def test_lease_timings_follow_the_ttl() -> None:
    lease = timing.lease_timings(2)
    assert (lease.lease_ttl, lease.keepalive_interval, lease.fence_margin) == (2, 0.5, 0.6)
    assert lease.fence_after == pytest.approx(1.4)
    # The fence comes before the lease can expire, for every TTL.
    for ttl in range(1, 120):
        t = timing.lease_timings(ttl)
        assert 0 < t.fence_after < t.lease_ttl
        assert t.keepalive_interval * timing.MIN_KEEPALIVES_BEFORE_FENCE <= t.fence_after


def test_rank_skews_campaign_and_watchdog_alike() -> None:
    t0, t2 = (
        timing.derive(
            lease_ttl=2,
            heartbeat_interval=None,
            heartbeat_timeout=0.5,
            kind=DataplaneKind.XDP,
            rank=rank,
        )
        for rank in (0, 2)
    )
    assert (t0.campaign_delay, t0.watchdog_slack) == (0.0, 0.0)
    assert t2.campaign_delay == t2.watchdog_slack == pytest.approx(2 * timing.RANK_SKEW)
    # Everything else is the same for every rank: the nodes agree on the protocol.
    assert (t0.lease, t0.fence_wait, t0.vip_lifetime) == (t2.lease, t2.fence_wait, t2.vip_lifetime)


def test_violations_name_what_is_broken() -> None:
    good = timing.derive(
        lease_ttl=2, heartbeat_interval=0.1, heartbeat_timeout=0.5, kind=DataplaneKind.XDP
    )
    assert good.violations() == []
    from dataclasses import replace

    assert "fence wait" in " ".join(replace(good, fence_wait=0.5).violations())
    assert "3 intervals" in " ".join(replace(good, heartbeat_timeout=0.2).violations())
    assert "lifetime" in " ".join(
        replace(good, lease=timing.lease_timings(8), vip_lifetime=1).violations()
    )


def test_the_kernel_lifetime_bounds_a_frozen_leader_only_with_longer_leases() -> None:
    short = timing.derive(
        lease_ttl=2, heartbeat_interval=0, heartbeat_timeout=0.5, kind=DataplaneKind.IPVS
    )
    long = timing.derive(
        lease_ttl=5, heartbeat_interval=0, heartbeat_timeout=0.5, kind=DataplaneKind.IPVS
    )
    assert not short.lifetime_fences_frozen_leader
    assert long.lifetime_fences_frozen_leader
    assert long.vip_lifetime <= long.lease.fence_after


TTLS = [1, 2, 3, 5, 10, 30]
INTERVALS: list[float | None] = [None, 0.0, 0.01, 0.05, 0.1, 0.3, 1.0, 10.0]
TIMEOUTS = [0.03, 0.1, 0.3, 0.5, 0.99, 1.5, 4.0, 9.5, 29.0, 60.0]


@pytest.mark.parametrize("kind", ["xdp", "nft", "ipvs"])
def test_every_accepted_config_keeps_every_invariant(kind: str) -> None:
    """The property: validation accepts a config => its derived timings are safe, for
    every rank; and what validation refuses names a field."""
    doc = example(kind)
    accepted = refused = 0
    for ttl, interval, timeout in itertools.product(TTLS, INTERVALS, TIMEOUTS):
        doc["etcd"]["lease_ttl"] = ttl
        doc["failover"] = {"heartbeat_timeout": timeout}
        if interval is not None:
            doc["failover"]["heartbeat_interval"] = interval
        try:
            cfg = parse_config(doc)
        except ConfigError as exc:
            refused += 1
            assert all(i.path.startswith(("failover", "etcd")) for i in exc.issues), exc
            continue
        accepted += 1
        for rank in range(4):
            t = cfg.timings(rank)
            assert t.violations() == [], (ttl, interval, timeout, rank)
            if t.heartbeats:
                # A standby's forced takeover waits out the old leader's dead-man
                # deadline (its last heartbeat + timeout) plus one interval and a tick.
                assert t.fence_wait >= t.heartbeat_timeout + t.heartbeat_interval
                assert t.heartbeat_timeout < t.lease.lease_ttl
            # A live leader fences before its lease can expire, and its VIP's kernel
            # lifetime is never longer than that.
            assert t.vip_lifetime <= max(1, t.lease.fence_after)
            # Hold by default exactly where a dead-man switch fences a frozen holder.
            assert (t.hold is not None) == (kind != "ipvs"), (ttl, interval, timeout)
            if t.hold is not None:
                usual = t.heartbeat_timeout if t.heartbeats else t.lease.fence_after
                assert t.hold.quiet + t.hold.deadline < usual
                assert t.hold.hold_end(0.0, t.hold.promise) >= 2 * t.hold.renew
    assert accepted and refused


def test_hold_on_ipvs_is_refused_naming_the_field_and_why() -> None:
    doc = example("ipvs")
    doc["failover"] = {"coordinator_outage": "hold"}
    with pytest.raises(ConfigError) as ei:
        parse_config(doc)
    [issue] = ei.value.issues
    assert issue.path == "failover.coordinator_outage"
    assert "dead-man switch" in issue.message and "fence" in issue.message


@pytest.mark.parametrize(
    ("kind", "mode", "holds"),
    [("xdp", None, True), ("nft", None, True), ("ipvs", None, False), ("xdp", "fence", False),
     ("nft", "hold", True), ("ipvs", "fence", False)],
)  # fmt: skip
def test_coordinator_outage_mode_and_its_default(kind: str, mode: str | None, holds: bool) -> None:
    doc = example(kind)
    if mode is not None:
        doc["failover"] = {"coordinator_outage": mode}
    cfg = parse_config(doc)
    assert (cfg.timings().hold is not None) is holds
    assert cfg.failover.outage_mode_for(cfg.dataplane.kind) == ("hold" if holds else "fence")


def test_hold_policy_follows_the_heartbeat_or_the_keepalive() -> None:
    hb = timing.derive(
        lease_ttl=2, heartbeat_interval=0.1, heartbeat_timeout=0.5, kind=DataplaneKind.XDP
    ).hold
    assert hb is not None
    assert (hb.renew, hb.promise, hb.deadline) == (0.1, timing.MIN_PROMISE, 0.1)
    assert hb.quiet == pytest.approx(0.15)
    ka = timing.derive(
        lease_ttl=2, heartbeat_interval=0, heartbeat_timeout=0.5, kind=DataplaneKind.NFT
    ).hold
    assert ka is not None
    assert ka.renew == 0.25 and ka.promise == 2.0 and ka.quiet == pytest.approx(0.625)
    slow = timing.derive(
        lease_ttl=30, heartbeat_interval=0, heartbeat_timeout=0.5, kind=DataplaneKind.NFT
    ).hold
    assert slow is not None and slow.promise == 5 * slow.renew  # a few renewals


def test_hold_violations_name_what_is_broken() -> None:
    from dataclasses import replace

    good = timing.derive(
        lease_ttl=2, heartbeat_interval=0.1, heartbeat_timeout=0.5, kind=DataplaneKind.XDP
    )
    assert good.hold is not None and good.violations() == []
    late = replace(good, hold=replace(good.hold, quiet_after=0.45))
    assert "before the usual fence" in " ".join(late.violations())
    short = replace(good, hold=replace(good.hold, promise=0.2, renew=0.1))
    assert "two renewals" in " ".join(short.violations())
    quick = replace(good, hold=replace(good.hold, withdraw=0.001))
    assert "tick" in " ".join(quick.violations())
