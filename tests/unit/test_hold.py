"""The peer-witnessed hold (halb.ha.hold): its pure pieces, and "never two owners" over
random and exhaustive fault sequences of a modelled cluster (halb.testing.holdsim),
with planted bugs to show the check can fail."""

from __future__ import annotations

import itertools

import pytest

from halb.ha.hold import (
    REFUSE_ACTIVE,
    REFUSE_NOT_MEMBER,
    REFUSE_REACHES_ETCD,
    Grant,
    HoldKeeper,
    HoldPolicy,
    PromiseBook,
    Refusal,
)
from halb.testing.holdsim import Cluster, random_run

pytestmark = pytest.mark.unit

P = HoldPolicy(promise=0.6, renew=0.15)


def test_policy_refuses_a_promise_shorter_than_its_renewal() -> None:
    with pytest.raises(ValueError, match="outlast"):
        HoldPolicy(promise=0.1, renew=0.2)


def test_hold_end_counts_from_the_send_time_minus_drift_and_withdrawal() -> None:
    p = HoldPolicy(promise=1.0, renew=0.2, drift=0.01, withdraw=0.05)
    assert p.hold_end(10.0, 1.0) == pytest.approx(10.0 + 0.99 / 1.01 - 0.05)


def test_keeper_holds_until_the_earliest_promise_of_every_peer() -> None:
    k = HoldKeeper(P, ["lb2", "lb3"])
    seq = k.ask(100.0)
    k.on_grant("lb2", seq, 0.6)
    assert k.hold_until() is None  # lb3 has not answered
    later = k.ask(100.1)
    k.on_grant("lb3", later, 0.6)
    assert k.hold_until() == pytest.approx(P.hold_end(100.0, 0.6))
    k.on_grant("lb2", later, 0.6)
    assert k.hold_until() == pytest.approx(P.hold_end(100.1, 0.6))
    # A late reply to the older round does not move lb2's promise back.
    k.on_grant("lb2", seq, 0.6)
    assert k.promises()["lb2"] == pytest.approx(P.hold_end(100.1, 0.6))


def test_a_refusal_gives_no_extension_and_strangers_are_ignored() -> None:
    k = HoldKeeper(P, ["lb2"])
    seq = k.ask(5.0)
    k.on_grant("mallory", seq, 60.0)
    assert k.hold_until() is None
    k.on_grant("lb2", seq, 0.6)
    standing = k.hold_until()
    assert standing is not None
    k.on_refusal("lb2", k.ask(5.1), REFUSE_REACHES_ETCD)
    # lb2 is still bound by its grant of round 1: the hold runs to its end, no further.
    assert k.hold_until() == standing
    assert k.refusals == {"lb2": REFUSE_REACHES_ETCD}
    k.on_grant("lb2", seq, 0.6)  # a late reply to the older round: no extension
    assert k.hold_until() == standing
    fresh = HoldKeeper(P, ["lb2"])
    fresh.on_refusal("lb2", fresh.ask(5.0), REFUSE_REACHES_ETCD)
    assert fresh.hold_until() is None  # never promised: no hold
    assert HoldKeeper(P, []).hold_until() is None  # nobody to witness


def test_book_is_born_bound_and_grants_only_without_etcd() -> None:
    book = PromiseBook(P, started=50.0)
    assert book.bound(50.5) and not book.bound(50.6)
    members = ["lb1", "lb2"]
    refusal = book.request("lb1", members, 51.0, reaches_etcd=True, contending=False)
    assert refusal == Refusal(REFUSE_REACHES_ETCD)
    assert not book.bound(51.0)
    assert book.request("lb1", members, 51.0, reaches_etcd=False, contending=True) == Refusal(
        REFUSE_ACTIVE
    )
    assert book.request("lbx", members, 51.0, reaches_etcd=False, contending=False) == Refusal(
        REFUSE_NOT_MEMBER
    )
    assert book.request("lb1", members, 51.0, reaches_etcd=False, contending=False) == Grant(0.6)
    assert book.bound_until() == pytest.approx(51.6)
    assert book.remaining(51.5) == pytest.approx(0.1)
    assert book.refused == {REFUSE_REACHES_ETCD: 1, REFUSE_ACTIVE: 1, REFUSE_NOT_MEMBER: 1}
    assert book.granted == 1


# --- the modelled cluster ---------------------------------------------------------------


@pytest.mark.parametrize("policy", [P, None], ids=["hold", "fence"])
def test_random_fault_sequences_never_give_two_owners(policy: HoldPolicy | None) -> None:
    for seed in range(300):
        c = random_run(seed, policy, nodes=2 + seed % 2, faults=50)
        assert c.violations == [], f"seed {seed}: {c.violations[:3]}"


FAULTS = [
    ("etcd down", lambda c: setattr(c, "etcd_up", False)),
    ("etcd up", lambda c: c.etcd_restart() if not c.etcd_up else None),
    ("cut lb1 from etcd", lambda c: c.cut_etcd.add("lb1")),
    ("cut lb2 from etcd", lambda c: c.cut_etcd.add("lb2")),
    ("heal lb2 to etcd", lambda c: c.cut_etcd.discard("lb2")),
    ("cut lb1-lb2", lambda c: c.cut_pairs.add(frozenset({"lb1", "lb2"}))),
    ("kill+restart lb2", lambda c: (c.kill("lb2"), c.restart("lb2"))),
    ("freeze lb1", lambda c: setattr(c.nodes["lb1"], "frozen", True)),
    ("thaw lb1", lambda c: setattr(c.nodes["lb1"], "frozen", False)),
]


def test_every_sequence_of_three_faults_keeps_one_owner() -> None:
    """Exhaustive over a small alphabet: every ordered triple of faults, each followed by
    a short or a long wait (shorter and longer than the promise and the lease TTL)."""
    steps = list(itertools.product(FAULTS, (0.3, 2.5)))
    runs = 0
    for seq in itertools.product(steps, repeat=3):
        c = Cluster(["lb1", "lb2"], P)
        c.kill("lb2")  # lb1 wins the start: the faults name the holder
        c.run_for(1.0)
        c.restart("lb2")
        c.run_for(1.0)
        for (_name, fault), wait in seq:
            fault(c)
            c.run_for(wait)
        runs += 1
        assert c.violations == [], [name for (name, _), _ in seq]
    assert runs == len(steps) ** 3


def holder_cut_from_etcd(policy: HoldPolicy, **kw: object) -> Cluster:
    c = Cluster(["lb1", "lb2"], policy, **kw)  # type: ignore[arg-type]
    c.kill("lb2")
    c.run_for(3)
    c.restart("lb2")
    c.run_for(3)
    assert c.leader is not None and c.leader[0] == "lb1"
    c.cut_etcd |= {"lb1", "lb2"}
    return c


def test_the_check_fails_when_a_restarted_peer_forgets_its_promises() -> None:
    """Planted bug: a peer that restarts unbound campaigns while the holder still holds
    on its forgotten promise."""
    hits = {False: 0, True: 0}
    for forget in hits:
        for k in range(15):
            c = holder_cut_from_etcd(P, forget_promises_on_restart=forget)
            c.run_for(3 + k * 0.01)  # the holder's lease has expired in etcd
            c.kill("lb2")
            c.restart("lb2")
            c.cut_etcd.discard("lb2")
            c.run_for(2)
            hits[forget] += bool(c.violations)
    assert hits == {False: 0, True: hits[True]} and hits[True] >= 5


def test_the_check_fails_when_a_clock_drifts_beyond_the_bound() -> None:
    """The holder's clock slow, the peer's fast: within the policy's drift bound the
    margin covers it; beyond it, the promise ends before the hold in real time."""
    policy = HoldPolicy(promise=0.6, renew=0.15, drift=0.05)
    hits = {}
    for fast in (1.05, 1.3):
        hits[fast] = 0
        for k in range(15):
            c = holder_cut_from_etcd(policy, rates={"lb1": 0.95, "lb2": fast})
            c.run_for(3 + k * 0.01)
            assert c.nodes["lb1"].forwarding(c.t)
            c.cut_pairs.add(frozenset({"lb1", "lb2"}))  # no more renewals
            c.cut_etcd.discard("lb2")
            c.run_for(3)
            hits[fast] += bool(c.violations)
    assert hits[1.05] == 0 and hits[1.3] >= 5


def owners(c: Cluster) -> list[str]:
    return [n.name for n in c.nodes.values() if n.forwarding(c.t)]


@pytest.mark.parametrize(("policy", "gap"), [(P, 0), (None, 900)], ids=["hold", "fence"])
def test_an_etcd_outage_keeps_the_vip_with_the_hold_and_loses_it_without(
    policy: HoldPolicy | None, gap: int
) -> None:
    c = Cluster(["lb1", "lb2", "lb3"], policy)
    c.run_for(3)
    (before,) = owners(c)
    c.etcd_up = False
    c.run_for(10)
    assert c.outage_gaps >= gap if gap else c.outage_gaps == 0
    c.etcd_restart()
    c.run_for(3)
    assert owners(c) == [before] and c.violations == []


def test_a_holder_killed_during_the_outage_is_replaced_only_after_etcd_is_back() -> None:
    c = holder_cut_from_etcd(P)
    c.etcd_up = False
    c.cut_etcd.clear()
    c.run_for(2)
    assert owners(c) == ["lb1"]
    c.kill("lb1")
    c.run_for(P.promise + 0.1)
    assert owners(c) == []  # its dead-man deadline ended it; nobody may take over yet
    c.run_for(3)
    assert owners(c) == []  # etcd is still down
    c.etcd_restart()
    c.run_for(2 * c.ttl + 1)
    assert owners(c) == ["lb2"] and c.violations == []


def test_a_cut_between_the_balancers_during_the_outage_fences_the_active() -> None:
    c = holder_cut_from_etcd(P)
    c.run_for(2)
    assert owners(c) == ["lb1"]
    c.cut_pairs.add(frozenset({"lb1", "lb2"}))
    c.run_for(P.promise + 0.1)
    assert owners(c) == [] and c.violations == []
