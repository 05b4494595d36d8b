"""Drill analysis: gaps from echo runs, survival, ARP ownership, statistics."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from halb.drill.partition import ruleset
from halb.drill.render import render_one, render_repeat
from halb.drill.report import (
    Claim,
    build_result,
    claims_of,
    conn_result,
    gaps_of,
    ownership,
    repeat_summary,
    stats,
)
from halb.drill.traffic import Runs

pytestmark = pytest.mark.unit

VIP = "10.94.0.100"
LB1, LB2 = "02:5e:00:00:02:01", "02:5e:00:00:02:02"


@dataclass(frozen=True)
class Frame:  # the shape of halb.lab.observe.ArpFrame
    time: float
    src_mac: str
    kind: str
    sender_ip: str
    target_ip: str = VIP


def runs_from(times: list[float], split: float = 0.025) -> list[list[float]]:
    r = Runs(split)
    for t in times:
        r.add(t)
    return r.runs


def echoes(start: float, end: float, every: float = 0.01) -> list[float]:
    n = round((end - start) / every)
    return [round(start + i * every, 6) for i in range(n + 1)]


def test_runs_split_only_at_silences_longer_than_split() -> None:
    times = [*echoes(0.0, 1.0), *echoes(1.8, 3.0)]
    runs = runs_from(times)
    assert len(runs) == 2
    assert runs[0][:3] == [0.0, 1.0, 101]
    assert runs[1][0] == pytest.approx(1.8)
    assert runs[0][3] == pytest.approx(0.01)


def test_gaps_cover_head_between_runs_and_tail() -> None:
    runs = [[1.0, 2.0, 100, 0.01], [2.5, 3.0, 50, 0.01]]
    assert gaps_of(runs, 0.9, 3.2) == [(0.9, 1.0), (2.0, 2.5), (3.0, 3.2)]
    assert gaps_of(runs, 1.0, 3.0) == [(2.0, 2.5)]
    assert gaps_of([], 0.0, 1.0) == [(0.0, 1.0)]


def conn_doc(times: list[float], **kw: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "ev": "conn",
        "id": 0,
        "backend": "be1",
        "backend_end": "be1",
        "echoed": len(times),
        "runs": runs_from(times),
        "error": None,
    }
    doc.update(kw)
    return doc


def test_a_connection_with_one_outage_survives_with_that_gap() -> None:
    times = [*echoes(0.0, 1.0), *echoes(1.8, 6.0)]
    c = conn_result(conn_doc(times), 0.0, 6.0)
    assert not c.lost and c.reason == ""
    assert c.max_gap == pytest.approx(0.8)
    assert c.gaps == ((1.0, 1.8),)


def test_a_reset_connection_is_lost_and_its_gap_runs_to_the_end() -> None:
    times = echoes(0.0, 1.0)
    c = conn_result(conn_doc(times, error="ConnectionResetError", error_t=2.0), 0.0, 6.0)
    assert c.lost and c.reason == "ConnectionResetError"
    assert c.max_gap == pytest.approx(5.0)


def test_a_stalled_connection_is_lost_even_without_an_error() -> None:
    c = conn_result(conn_doc(echoes(0.0, 4.0)), 0.0, 6.0, stall=1.0)
    assert c.lost and "no echo in the last 1s" in c.reason
    # The final WHOAMI timing out after the window only confirms the stall.
    c2 = conn_result(
        conn_doc(echoes(0.0, 4.0), error="whoami at end: timeout", error_t=6.5), 0.0, 6.0
    )
    assert c2.reason.startswith("no echo in the last")


def test_a_connection_answered_by_another_backend_is_lost() -> None:
    c = conn_result(conn_doc(echoes(0.0, 6.0), backend_end="be2"), 0.0, 6.0)
    assert c.lost and c.reason == "moved from be1 to be2"


def test_claims_are_only_frames_whose_sender_is_the_vip() -> None:
    frames = [
        Frame(2.0, LB2.upper(), "request", VIP),
        Frame(1.0, LB1, "request", "10.94.0.2"),  # someone asking, not a claim
        Frame(1.5, LB1, "reply", VIP),
    ]
    assert claims_of(frames, VIP) == [Claim(1.5, LB1, "reply"), Claim(2.0, LB2, "request")]


def test_ownership_finds_the_new_owner_and_later_claims_of_the_old() -> None:
    claims = [
        Claim(0.5, LB1, "reply"),  # before the fault: the old owner, legitimately
        Claim(1.2, LB2, "request"),
        Claim(1.3, LB2, "request"),
        Claim(1.25, LB1, "reply"),  # old owner still answering: two owners
        Claim(2.0, LB1, "reply"),
    ]
    claims.sort(key=lambda c: c.time)
    own = ownership(claims, t_fault=1.0, old_mac=LB1)
    assert own.new_mac == LB2 and own.first_claim == 1.2
    assert [c.time for c in own.conflicts] == [1.25, 2.0]
    # The old owner's claims after the next leader change are a new term, not overlap.
    assert [c.time for c in ownership(claims, 1.0, LB1, until=1.9).conflicts] == [1.25]


def test_ownership_with_a_virtual_mac_judges_other_macs_as_conflicts() -> None:
    vmac = "00:00:5e:00:01:01"
    claims = [
        Claim(0.5, vmac, "reply"),  # the old owner, from the shared MAC
        Claim(1.1, vmac, "reply"),  # the old node's kernel, before its fence
        Claim(1.3, vmac, "request"),  # the new owner's first announcement
        Claim(1.5, LB1, "reply"),  # a node answering from its own MAC: wrong
        Claim(1.6, vmac, "reply"),
    ]
    own = ownership(claims, t_fault=1.0, old_mac=vmac, shared_mac=vmac)
    assert own.new_mac == vmac and own.first_claim == 1.3
    assert [(c.time, c.mac) for c in own.conflicts] == [(1.5, LB1)]
    # Without the shared MAC the same frames would name no new owner at all.
    assert ownership(claims, 1.0, vmac).new_mac == LB1


def test_ownership_without_a_new_owner_reports_no_overlap() -> None:
    own = ownership([Claim(1.5, LB1, "reply")], t_fault=1.0, old_mac=LB1)
    assert own.new_mac is None and own.first_claim is None and own.conflicts == ()


def test_claims_before_the_new_owner_are_not_overlap() -> None:
    claims = [Claim(1.1, LB1, "reply"), Claim(1.4, LB2, "request")]
    assert ownership(claims, t_fault=1.0, old_mac=LB1).conflicts == ()


def test_stats_median_and_nearest_rank_p95() -> None:
    st = stats(float(i) for i in range(1, 21))
    assert st is not None
    assert (st.n, st.min, st.median, st.p95, st.max) == (20, 1.0, 10.5, 19.0, 20.0)
    one = stats([0.7])
    assert one is not None and one.p95 == 0.7 and one.median == 0.7
    assert stats([]) is None


def drill_events(fault_at: float, outage: tuple[float, float] | None) -> list[dict[str, object]]:
    start, end = fault_at - 1.0, fault_at + 6.0
    times = echoes(start, end)
    if outage:
        times = [t for t in times if not outage[0] < t - fault_at < outage[1]]
    return [
        {"ev": "ready", "t": start},
        {"ev": "newerr", "t": fault_at + 0.7, "error": "timeout"},
        conn_doc(times),
        {**conn_doc(times), "id": 1},
        {
            "ev": "summary",
            "t_start": start,
            "t_end": end,
            "new_ok": 900,
            "new_err": 1,
            "new_slow": 3,
        },
    ]


def test_build_result_puts_a_drill_together() -> None:
    t0 = 1000.0
    frames = [Frame(t0 + 1.3, LB2, "request", VIP), Frame(t0 + 1.6, LB1, "reply", VIP)]
    r = build_result(
        fault="kill",
        node="lb1",
        old_owner="lb1",
        new_owner="lb2",
        fault_at=t0,
        events=drill_events(t0, (0.6, 1.4)),
        frames=frames,
        vip=VIP,
        names={LB1: "lb1", LB2: "lb2"},
        old_mac=LB1,
        leader_changed_at=t0 + 1.35,
    )
    assert (r.survived, r.lost) == (2, 0)
    assert r.garp_s == pytest.approx(1.3)
    assert r.leader_s == pytest.approx(1.35)
    assert r.gap_stats is not None and r.gap_stats.max == pytest.approx(0.8, abs=0.02)
    doc = r.to_dict()
    assert doc["first_garp_from"] == "lb2"
    assert doc["two_owners"] == [{"t_s": 1.6, "mac": LB1, "node": "lb1", "kind": "reply"}]
    assert doc["new_connections"]["failed_at_s"] == [0.7]
    text = render_one(r)
    assert "TWO OWNERS" in text and "2 survived, 0 lost" in text


def _kill(t0: float, frames: list[Frame], **kw: object) -> dict[str, object]:
    args: dict[str, object] = {
        "fault": "kill", "node": "lb1", "old_owner": "lb1", "new_owner": "lb2",
        "fault_at": t0, "events": drill_events(t0, (0.6, 1.4)), "frames": frames,
        "vip": VIP, "names": {}, "old_mac": None, "leader_changed_at": t0 + 1.2,
    }  # fmt: skip
    args.update(kw)
    return build_result(**args).to_dict()  # type: ignore[arg-type]


def test_without_a_known_old_mac_the_last_claimer_before_the_fault_is_the_old_owner() -> None:
    # The deploy tier's drill: the client had no neighbour entry, and the killed node's
    # periodic refresh went out just after the fault time was taken. Without the
    # fallback, that refresh was the "new owner" and the real new owner two owners.
    t0 = 1000.0
    frames = [
        Frame(t0 - 4.99, LB1, "request", VIP),
        Frame(t0 + 0.01, LB1, "request", VIP),
        Frame(t0 + 1.22, LB2, "request", VIP),
        Frame(t0 + 1.22, LB2, "reply", VIP),
    ]
    doc = _kill(t0, frames)
    assert doc["first_garp_s"] == pytest.approx(1.22)
    assert doc["two_owners"] == []
    # And a later claim by the old owner still counts.
    doc = _kill(t0, [*frames, Frame(t0 + 2.0, LB1, "reply", VIP)])
    assert [c["mac"] for c in doc["two_owners"]] == [LB1]  # type: ignore[index]


def test_claims_after_the_last_leader_read_are_not_judged() -> None:
    # The restarted old owner preempted back just as the drill ended: the watch's last
    # read (t0+6.2) showed lb2 still the leader, so a claim at +6.25 is unknown ground.
    t0 = 1000.0
    frames = [Frame(t0 + 1.22, LB2, "request", VIP), Frame(t0 + 6.25, LB1, "request", VIP)]
    doc = _kill(t0, frames, old_mac=LB1, known_until=t0 + 6.2)
    assert doc["two_owners"] == []
    assert any("not judged" in n for n in doc["notes"])  # type: ignore[union-attr]
    # Before the last read it is two owners.
    doc = _kill(t0, frames, old_mac=LB1, known_until=t0 + 6.3)
    assert [c["mac"] for c in doc["two_owners"]] == [LB1]  # type: ignore[index]


def test_build_result_needs_the_generator_summary() -> None:
    with pytest.raises(ValueError, match="no summary"):
        build_result(
            fault="kill",
            node="lb1",
            old_owner="lb1",
            new_owner=None,
            fault_at=0.0,
            events=[],
            frames=[],
            vip=VIP,
            names={},
            old_mac=None,
            leader_changed_at=None,
        )


def test_repeat_summary_over_drills() -> None:
    results = []
    for i in range(5):
        t0 = 1000.0 * (i + 1)
        frames = [Frame(t0 + 1.0 + i / 10, LB2, "request", VIP)]
        results.append(
            build_result(
                fault="kill",
                node="lb1",
                old_owner="lb1",
                new_owner="lb2",
                fault_at=t0,
                events=drill_events(t0, (0.5, 1.0 + i / 10)),
                frames=frames,
                vip=VIP,
                names={},
                old_mac=LB1,
                leader_changed_at=t0 + 1.0,
            )
        )
    s = repeat_summary(results)
    assert s["drills"] == 5 and s["lost_total"] == 0 and s["connections_total"] == 10
    assert s["first_garp_s"]["min"] == pytest.approx(1.0)
    assert s["first_garp_s"]["median"] == pytest.approx(1.2)
    assert s["first_garp_s"]["max"] == pytest.approx(1.4)
    assert s["worst_gap_s"]["max"] > s["worst_gap_s"]["min"]
    assert s["drills_with_two_owners"] == 0
    assert "fault -> first GARP" in render_repeat(results, s)


def test_partition_ruleset_drops_both_directions() -> None:
    text = ruleset(["10.94.2.12", "10.94.0.12"])
    assert "ip saddr { 10.94.0.12, 10.94.2.12 } drop" in text
    assert "ip daddr { 10.94.0.12, 10.94.2.12 } drop" in text
