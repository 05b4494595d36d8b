"""Election, preemption, handover, reconnect and fencing against a real etcd.

Each node is the real stack minus the network: Coordinator (halb.etcd) -> Machine ->
GroupRuntime, with a recording VIP port (the VIP adapter has its own kernel tests).
Measured figures are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from halb.etcd import ClientSettings, EtcdClient, EventKind
from halb.ha.admin import request_handover, set_drain
from halb.ha.coord import Coordinator
from halb.ha.machine import CampaignLost, CampaignWon, Leader, Machine, MachineConfig, State
from halb.ha.runtime import GroupRuntime
from halb.ha.values import parse_leader
from halb.keys import GroupKeys
from halb.model import IPAddress, Term
from halb.testing.etcd import EtcdServer
from halb.testing.waits import until

pytestmark = pytest.mark.kernel

VIP = IPv4Address("10.99.0.100")
KEYS = GroupKeys("/halbt", "c1", "g1")


class RecordingVips:
    """Stands in for the interface; records who holds the VIP when."""

    def __init__(self, owners: dict[str, float], name: str) -> None:
        self.held: set[IPAddress] = set()
        self.announced = 0
        self.owners = owners
        self.name = name

    async def add(self, vip: IPAddress, lifetime: int | None) -> None:
        self.held.add(vip)
        self.owners.setdefault(self.name, time.monotonic())

    async def remove(self, vip: IPAddress) -> bool:
        had = vip in self.held
        self.held.discard(vip)
        self.owners.pop(self.name, None)
        return had

    def announce(self, vip: IPAddress) -> int:
        self.announced += 1
        return 1


class FlakyClient:
    """A real etcd client whose keepalives can be made to hang (a network fault
    between this node and etcd), while etcd itself keeps running."""

    def __init__(self, client: EtcdClient) -> None:
        self._client = client
        self.block_keepalive = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def keepalive(self, lease_id: int, **kw: Any) -> Any:
        if self.block_keepalive:
            await asyncio.sleep(3600)
        return await self._client.keepalive(lease_id, **kw)

    async def revoke(self, lease_id: int, **kw: Any) -> Any:
        # Partitioned: the fenced node's resign cannot reach etcd either.
        if self.block_keepalive:
            await asyncio.sleep(3600)
        return await self._client.revoke(lease_id, **kw)

    async def txn(self, *args: Any, **kw: Any) -> Any:
        # Heartbeats and campaigns are transactions.
        if self.block_keepalive:
            await asyncio.sleep(3600)
        return await self._client.txn(*args, **kw)


class GatedSync:
    """Sync roles whose follower reports caught up only when told to."""

    def __init__(self) -> None:
        self.synced = False
        self.asked = 0

    async def serve(self, group: str, term: Term) -> None:
        await asyncio.Event().wait()

    async def follow(self, group: str, leader: Leader) -> None:
        await asyncio.Event().wait()

    def caught_up(self, group: str, leader: Leader) -> bool:
        self.asked += 1
        return self.synced


@dataclass
class Node:
    name: str
    machine: Machine
    rt: GroupRuntime
    coord: Coordinator
    vips: RecordingVips
    client: Any
    task: asyncio.Task[None] | None = None


@dataclass
class Cluster:
    etcd: EtcdServer
    owners: dict[str, float] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    overlaps: int = 0

    async def start(
        self,
        name: str,
        priority: int,
        *,
        ttl: float = 1,
        preempt: bool = True,
        preempt_delay: float = 0.5,
        flaky: bool = False,
        state_dir: Path | None = None,
        heartbeat: tuple[float, float] | None = None,
        sync: GatedSync | None = None,
    ) -> Node:
        raw = EtcdClient(ClientSettings((self.etcd.endpoint,)))
        client: Any = FlakyClient(raw) if flaky else raw
        interval, timeout = heartbeat or (0.0, 0.0)
        machine = Machine(
            MachineConfig(
                name,
                priority,
                preempt=preempt,
                preempt_delay=preempt_delay,
                handover_timeout=1.0,
                fence_wait=timeout + interval + 0.02 if heartbeat else 0.0,
            )
        )
        vips = RecordingVips(self.owners, name)
        rt = GroupRuntime(
            machine, None, vips, addresses=[VIP], announce_interval=0.05, name=name, sync=sync
        )
        coord = Coordinator(
            client,
            KEYS,
            name,
            priority,
            ttl=ttl,
            emit=rt.emit,
            state_dir=state_dir,
            heartbeat_interval=interval,
            heartbeat_timeout=timeout,
        )
        rt.coord = coord
        node = Node(name, machine, rt, coord, vips, client)
        node.task = asyncio.create_task(rt.run())
        self.nodes[name] = node
        return node

    async def stop(self, name: str, *, handoff: bool = True) -> None:
        node = self.nodes.pop(name)
        if node.task is not None and not node.task.done():
            await node.rt.stop(handoff=handoff)
            await asyncio.wait_for(node.task, 10)
        await node.client.close()

    async def crash(self, name: str) -> None:
        """The agent dies: no resign; its lease runs out on the etcd side."""
        node = self.nodes.pop(name)
        assert node.task is not None
        node.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await node.task
        await node.client.close()

    async def close(self) -> None:
        for name in list(self.nodes):
            with contextlib.suppress(Exception):
                await self.stop(name)

    def active(self) -> list[str]:
        return [n.name for n in self.nodes.values() if n.machine.state is State.ACTIVE]

    async def monitor(self) -> None:
        """Count any instant where two nodes hold the VIP."""
        while True:
            if len([n for n in self.nodes.values() if n.vips.held]) > 1:
                self.overlaps += 1
            await asyncio.sleep(0.005)


async def leader_in_etcd(client: EtcdClient) -> Leader | None:
    kv = await client.get(KEYS.leader)
    return None if kv is None else parse_leader(kv.value, kv.lease, kv.create_revision)


@pytest.fixture
def etcd() -> Any:
    with EtcdServer() as server:
        yield server


def run(etcd: EtcdServer, body: Callable[[Cluster, EtcdClient], Awaitable[None]]) -> None:
    async def main() -> None:
        cluster = Cluster(etcd)
        mon = asyncio.create_task(cluster.monitor())
        admin = EtcdClient(ClientSettings((etcd.endpoint,)))
        try:
            # A hang fails here, with its stack, long before pytest-timeout.
            async with asyncio.timeout(120):
                await body(cluster, admin)
            assert cluster.overlaps == 0, "two nodes held the VIP at once"
        finally:
            mon.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await mon
            await cluster.close()
            await admin.close()

    asyncio.run(main())


# --- election ----------------------------------------------------------------------


@pytest.mark.parametrize("priorities", [(100, 200), (100, 200, 150)])
def test_election_converges_on_highest_priority(
    etcd: EtcdServer, priorities: tuple[int, ...]
) -> None:
    async def body(cluster: Cluster, admin: EtcdClient) -> None:
        names = [f"lb{i}" for i in range(len(priorities))]
        for name, prio in zip(names, priorities, strict=True):
            await cluster.start(name, prio, preempt_delay=0.3)
        best = names[priorities.index(max(priorities))]
        await until(lambda: cluster.active() == [best], 10, f"{best} to lead")
        leader = await leader_in_etcd(admin)
        assert leader is not None and leader.holder == best
        assert leader.term == cluster.nodes[best].machine.term
        # It stays that way.
        await asyncio.sleep(1.0)
        assert cluster.active() == [best]
        others = [n for n in names if n != best]
        for n in others:
            assert cluster.nodes[n].machine.state is State.STANDBY
            assert cluster.nodes[n].machine.st.following == leader
        assert cluster.nodes[best].vips.held == {VIP}

    run(etcd, body)


def test_preemption_waits_for_hold_down(etcd: EtcdServer) -> None:
    async def body(cluster: Cluster, admin: EtcdClient) -> None:
        await cluster.start("low", 100)
        await until(lambda: cluster.active() == ["low"], 5, "low to lead")
        high = await cluster.start("high", 200, preempt_delay=1.5)
        await until(lambda: high.machine.state is State.STANDBY, 5, "high standby")
        t0 = time.monotonic()
        await asyncio.sleep(1.0)
        assert cluster.active() == ["low"], "preempted before the hold-down"
        took = await until(lambda: cluster.active() == ["high"], 5, "high to preempt")
        elapsed = time.monotonic() - t0
        print(f"\npreemption after {elapsed:.2f}s (hold-down 1.5s; handover {took:.2f}s)")
        assert 1.4 <= elapsed < 4.0
        assert cluster.nodes["low"].machine.state is State.STANDBY
        handover = await admin.get(KEYS.handover)
        assert handover is None, "the winner clears the handover request"

    run(etcd, body)


def test_preemption_waits_for_the_flow_sync(etcd: EtcdServer) -> None:
    async def body(cluster: Cluster, admin: EtcdClient) -> None:
        await cluster.start("b", 100)
        await until(lambda: cluster.active() == ["b"], 5, "b to lead")
        sync = GatedSync()
        await cluster.start("a", 200, preempt_delay=0.2, sync=sync)
        await until(lambda: sync.asked >= 3, 5, "a to try preempting a few times")
        assert cluster.active() == ["b"], "a preempted before its flows were synced"
        sync.synced = True
        await until(lambda: cluster.active() == ["a"], 5, "a to preempt once synced")

    run(etcd, body)


def test_preempt_false_keeps_the_leader(etcd: EtcdServer) -> None:
    async def body(cluster: Cluster, admin: EtcdClient) -> None:
        await cluster.start("low", 100, preempt=False)
        await until(lambda: cluster.active() == ["low"], 5, "low to lead")
        await cluster.start("high", 200, preempt=False, preempt_delay=0.2)
        await asyncio.sleep(2.0)
        assert cluster.active() == ["low"]
        # Without the leader, the group does move.
        await cluster.stop("low")
        await until(lambda: cluster.active() == ["high"], 2, "high to take over")

    run(etcd, body)


# --- handover ----------------------------------------------------------------------


def test_resign_hands_over_well_under_a_second(etcd: EtcdServer) -> None:
    async def body(cluster: Cluster, admin: EtcdClient) -> None:
        await cluster.start("a", 200, preempt=False)
        await until(lambda: cluster.active() == ["a"], 5, "a to lead")
        b = await cluster.start("b", 100, preempt=False)
        await until(lambda: b.machine.state is State.STANDBY, 5, "b standby")
        await asyncio.sleep(0.2)
        # SIGTERM: the leader removes its VIPs, then revokes its lease.
        t0 = time.monotonic()
        await cluster.stop("a")
        took = await until(lambda: cluster.active() == ["b"], 2, "b to take over")
        # Time from the revoke itself (stop() returns after it) is shorter still.
        print(f"\nhandover on leader SIGTERM (resign = revoke own lease): {took * 1000:.0f} ms")
        assert time.monotonic() - t0 < 1.0

    run(etcd, body)


def test_external_revoke_ends_the_term_at_once(etcd: EtcdServer) -> None:
    # Revoking a leader's lease from outside is seen by the leader and the standbys at
    # the same moment, so it cannot promise no overlap (a partitioned leader would keep
    # its VIP until its fence deadline): operators use the handover key instead. Here
    # only the leader runs, to measure how fast it lets go.
    async def body(cluster: Cluster, admin: EtcdClient) -> None:
        a = await cluster.start("a", 200, ttl=2)
        await until(lambda: cluster.active() == ["a"], 5, "a to lead")
        lease = a.coord.lease_id
        assert lease is not None
        t0 = time.monotonic()
        await admin.revoke(lease)
        took = await until(lambda: not a.vips.held, 2, "a to drop the VIP")
        print(f"\nexternal revoke: VIP dropped in {took * 1000:.0f} ms")
        assert a.machine.term is None or a.machine.term.lease_id != lease
        assert time.monotonic() - t0 < 0.5
        # It re-elects itself on a fresh lease.
        await until(lambda: cluster.active() == ["a"], 3, "a to lead again")
        assert a.coord.lease_id != lease

    run(etcd, body)


def test_planned_failover_to_named_node(etcd: EtcdServer) -> None:
    async def body(cluster: Cluster, admin: EtcdClient) -> None:
        await cluster.start("a", 200, preempt=False)
        await until(lambda: cluster.active() == ["a"], 5, "a to lead")
        await cluster.start("b", 100, preempt=False)
        await cluster.start("c", 150, preempt=False)
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        await request_handover(admin, KEYS, "b")
        await until(lambda: cluster.active() == ["b"], 3, "b to take over")
        print(f"\nplanned failover to b in {(time.monotonic() - t0) * 1000:.0f} ms")
        await until(lambda: cluster.nodes["a"].machine.state is State.STANDBY, 3, "a")
        # The winner consumes the request (a delete it sends once it holds the term).
        deadline = time.monotonic() + 2.0
        while await admin.get(KEYS.handover) is not None:
            assert time.monotonic() < deadline, "the winner left the handover request"
            await asyncio.sleep(0.02)

    run(etcd, body)


def test_drain_moves_the_group_and_blocks_campaign(etcd: EtcdServer) -> None:
    async def body(cluster: Cluster, admin: EtcdClient) -> None:
        await cluster.start("a", 200)
        await until(lambda: cluster.active() == ["a"], 5, "a to lead")
        await cluster.start("b", 100)
        await set_drain(admin, KEYS, "a", "maintenance")
        await until(lambda: cluster.active() == ["b"], 3, "b to take over")
        a = cluster.nodes["a"]
        await until(lambda: a.machine.state is State.DRAINED, 3, "a drained")
        await asyncio.sleep(1.0)  # a would preempt after 0.5 s if it were not drained
        assert cluster.active() == ["b"]
        await admin.delete(KEYS.drain("a"))
        await until(lambda: cluster.active() == ["a"], 5, "a to preempt again")

    run(etcd, body)


# --- failures ----------------------------------------------------------------------


def test_dead_leader_detected_after_ttl(etcd: EtcdServer) -> None:
    async def body(cluster: Cluster, admin: EtcdClient) -> None:
        await cluster.start("a", 200, ttl=1)
        await until(lambda: cluster.active() == ["a"], 5, "a to lead")
        b = await cluster.start("b", 100, ttl=1)
        await until(lambda: b.machine.state is State.STANDBY, 5, "b standby")
        await asyncio.sleep(0.3)
        last_ok = cluster.nodes["a"].coord.last_keepalive_ok
        assert last_ok is not None
        await cluster.crash("a")
        took = await until(lambda: cluster.active() == ["b"], 5, "b to take over")
        since_ka = time.monotonic() - last_ok
        print(
            f"\ndead leader (TTL 1 s): takeover {took:.2f}s after crash, "
            f"{since_ka:.2f}s after its last keepalive"
        )
        assert 0.9 <= since_ka < 2.5

    run(etcd, body)


HB = (0.05, 0.3)


def test_crashed_leader_is_replaced_long_before_its_ttl(etcd: EtcdServer) -> None:
    """Heartbeats: with a 5 s lease, a dead leader is replaced in about twice the
    heartbeat timeout, by a revoke of its lease rather than by its expiry."""

    async def body(cluster: Cluster, admin: EtcdClient) -> None:
        a = await cluster.start("a", 200, ttl=5, heartbeat=HB)
        await until(lambda: cluster.active() == ["a"], 5, "a to lead")
        b = await cluster.start("b", 100, ttl=5, heartbeat=HB)
        await until(lambda: b.machine.state is State.STANDBY, 5, "b standby")
        old = await leader_in_etcd(admin)
        assert old is not None and old.holder == "a"
        assert a.coord.fence_deadline is not None
        # The heartbeat brings the deadline well inside the lease's TTL - margin.
        assert a.coord.fence_deadline - time.monotonic() < 0.5
        await asyncio.sleep(0.3)
        await cluster.crash("a")
        took = await until(lambda: cluster.active() == ["b"], 4, "b to take over")
        print(f"\ncrashed leader (TTL 5 s, heartbeat 50/300 ms): takeover after {took:.2f}s")
        # Revoked, not expired: etcd no longer knows the lease at all.
        info = await admin.time_to_live(old.term.lease_id)
        assert info.ttl == -1
        # And b waited out the fence after the revoke (timeout + interval + tick).
        assert took >= HB[1] + sum(HB)

    run(etcd, body)


def test_leader_cut_from_etcd_fences_before_the_standby_takes_over(etcd: EtcdServer) -> None:
    """The leader is alive but cannot reach etcd (its keepalives and heartbeats hang):
    it drops the VIP at its heartbeat deadline, and the standby, which revokes the
    lease after the heartbeat timeout, adds it only after the fence wait. The monitor
    asserts there is no instant with two owners."""

    async def body(cluster: Cluster, admin: EtcdClient) -> None:
        a = await cluster.start("a", 200, ttl=5, heartbeat=HB, flaky=True)
        await until(lambda: cluster.active() == ["a"], 5, "a to lead")
        b = await cluster.start("b", 100, ttl=5, heartbeat=HB)
        await until(lambda: b.machine.state is State.STANDBY, 5, "b standby")
        await asyncio.sleep(0.3)
        a.client.block_keepalive = True
        cut = time.monotonic()
        await until(lambda: not a.vips.held, 2, "a to drop the VIP")
        dropped = time.monotonic() - cut
        await until(lambda: bool(b.vips.held), 4, "b to add the VIP")
        added = time.monotonic() - cut
        print(
            f"\nleader cut from etcd: VIP dropped after {dropped:.2f}s, re-added after {added:.2f}s"
        )
        assert dropped <= HB[1] + 0.2
        assert added > dropped

    run(etcd, body)


def test_etcd_restart_recreates_watch_and_rereads_leader(etcd: EtcdServer) -> None:
    async def body(cluster: Cluster, admin: EtcdClient) -> None:
        a = await cluster.start("a", 200, ttl=3)
        await until(lambda: cluster.active() == ["a"], 5, "a to lead")
        b = await cluster.start("b", 100, ttl=3)
        await until(lambda: b.machine.state is State.STANDBY, 5, "b standby")
        term = a.machine.term
        etcd.stop()
        await asyncio.sleep(0.3)
        etcd.start()
        # The leader survives a short outage (TTL 3 s, fence at 2.1 s).
        await asyncio.sleep(1.0)
        assert a.machine.term == term
        assert b.machine.st.leader is not None and b.machine.st.leader.term == term
        # The watches work again: a change now is seen by both nodes.
        lease = a.coord.lease_id
        assert lease is not None
        await admin.revoke(lease)
        took = await until(lambda: cluster.active() == ["b"], 3, "b to take over")
        print(f"\nafter etcd restart: revoke seen and handed over in {took * 1000:.0f} ms")
        # And a long outage: etcd gone past the fence deadline, then back.
        etcd.stop()
        await until(lambda: b.machine.state is State.FENCED, 5, "b to fence")
        assert not b.vips.held
        etcd.start()
        await until(lambda: len(cluster.active()) == 1, 15, "a leader after recovery")

    run(etcd, body)


def test_keepalive_failure_fences_before_etcd_expires_lease(etcd: EtcdServer) -> None:
    async def body(cluster: Cluster, admin: EtcdClient) -> None:
        a = await cluster.start("a", 200, ttl=2, flaky=True)
        await until(lambda: cluster.active() == ["a"], 5, "a to lead")
        deleted: list[float] = []

        async def watch_key() -> None:
            start = (await admin.range(KEYS.leader)).revision + 1
            async for ev in admin.watch(KEYS.leader, start_revision=start):
                if ev.kind is EventKind.DELETE:
                    deleted.append(time.monotonic())
                    return

        watcher = asyncio.create_task(watch_key())
        await asyncio.sleep(0.3)
        a.client.block_keepalive = True
        await until(lambda: a.machine.state is State.FENCED, 5, "a to fence")
        fenced = time.monotonic()
        assert not a.vips.held
        assert a.coord.fence_deadline is None  # the abandoned lease has no deadline
        await asyncio.wait_for(watcher, 5)
        print(
            f"\nTTL 2 s: fenced {deleted[0] - fenced:.2f}s before etcd expired the lease "
            f"(margin {a.coord.fence_margin:.2f}s + expiry sweep)"
        )
        assert deleted[0] - fenced >= 0.3

    run(etcd, body)


def test_a_retired_coordinator_grants_no_lease_after_its_last_resign(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """Stopping: the resign must be the end. Without retire() the lease loop grants a
    fresh lease at its next turn and stores it for the next start to 'resume'."""

    async def body(cluster: Cluster, admin: EtcdClient) -> None:
        a = await cluster.start("a", 200, ttl=1, state_dir=tmp_path)
        await until(lambda: cluster.active() == ["a"], 5, "a to lead")
        lease = a.coord.lease_id
        assert lease is not None
        a.coord.retire()
        await a.coord.resign(lease)
        await asyncio.sleep(3 * a.coord.keepalive_interval)
        assert a.coord.lease_id is None
        assert not (tmp_path / "lease-c1-g1").exists()

    run(etcd, body)


def test_lease_resume_after_restart_keeps_the_term(etcd: EtcdServer, tmp_path: Path) -> None:
    async def body(cluster: Cluster, admin: EtcdClient) -> None:
        a = await cluster.start("a", 200, ttl=3, state_dir=tmp_path)
        await until(lambda: cluster.active() == ["a"], 5, "a to lead")
        term = a.machine.term
        assert (tmp_path / "lease-c1-g1").exists()
        await cluster.stop("a", handoff=False)  # restart in place: no revoke
        a2 = await cluster.start("a", 200, ttl=3, state_dir=tmp_path)
        await until(lambda: cluster.active() == ["a"], 3, "a to resume")
        assert a2.machine.term == term, "resumed the same term: no failover"
        # A stale lease file (lease revoked meanwhile) falls back to a new lease.
        await cluster.stop("a", handoff=True)
        assert not (tmp_path / "lease-c1-g1").exists()
        a3 = await cluster.start("a", 200, ttl=3, state_dir=tmp_path)
        await until(lambda: cluster.active() == ["a"], 3, "a to lead again")
        assert a3.machine.term != term

    run(etcd, body)


class LostReplyClient:
    """A real client whose first transaction is applied twice, as when the reply of
    the first attempt is lost and the etcd client retries it: the caller sees only the
    retry's answer."""

    def __init__(self, client: EtcdClient) -> None:
        self._client = client
        self.doubled = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def txn(self, *args: Any, **kw: Any) -> Any:
        if not self.doubled:
            self.doubled = True
            await self._client.txn(*args, **kw)
        return await self._client.txn(*args, **kw)


@pytest.mark.parametrize("rival", [False, True])
def test_a_retried_campaign_neither_wins_twice_nor_steals_a_term(
    etcd: EtcdServer, rival: bool
) -> None:
    async def body(cluster: Cluster, admin: EtcdClient) -> None:
        events: list[Any] = []
        client = LostReplyClient(EtcdClient(ClientSettings((etcd.endpoint,))))
        coord = Coordinator(client, KEYS, "a", 200, ttl=2, emit=events.append)  # type: ignore[arg-type]
        task = asyncio.create_task(coord.run())
        try:
            await until(lambda: coord.lease_id is not None, 5, "a lease")
            lease = coord.lease_id
            assert lease is not None
            if rival:
                other = await admin.grant(5)
                await admin.put(KEYS.leader, b'{"node": "b", "priority": 100}', lease=other.id)
            await coord.campaign(lease)
            outcome = [e for e in events if isinstance(e, CampaignWon | CampaignLost)]
            held = await admin.get(KEYS.leader)
            assert held is not None
            if rival:
                # The doubled txn found b's key both times: lost, b's term untouched.
                assert isinstance(outcome[0], CampaignLost)
                assert outcome[0].leader is not None and outcome[0].leader.holder == "b"
                assert held.lease != lease
            else:
                # The first attempt won; the retry found our own key: still a win, at
                # the key's create revision (one term, not two).
                assert outcome == [CampaignWon(Term(lease, held.create_revision))]
                assert held.lease == lease and held.version == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.close()

    run(etcd, body)
