"""The group runtime for real: etcd and the agent both inside a private namespace,
the VIP on a real veth, announcements captured on its peer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest

from halb.etcd import ClientSettings, EtcdClient
from halb.ha.coord import Coordinator
from halb.ha.machine import Machine, MachineConfig, State
from halb.ha.runtime import GroupRuntime
from halb.keys import GroupKeys
from halb.net.netns import entered
from halb.net.vip import InterfaceVips
from halb.testing.etcd import EtcdServer
from halb.testing.fake_dataplane import FakeDataplane
from halb.testing.waits import until
from halb.timing import vip_lifetime

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

VIP = IPv4Address("10.99.0.100")
KEYS = GroupKeys("/halbt", "c1", "g1")


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"halbt-ha-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        sh("ip", "-n", name, "link", "set", "v0", "up")
        sh("ip", "-n", name, "link", "set", "v1", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    # In the root namespace: gRPC's own threads stay where they were created, so the
    # etcd client must live here; only the VIP sockets are made in the test namespace.
    with EtcdServer() as server:
        yield server


def vip_present(netns: str) -> bool:
    out = subprocess.run(
        ["ip", "-n", netns, "-4", "addr", "show", "dev", "v0"], capture_output=True, text=True
    ).stdout
    return f"{VIP}/32" in out


class Agent:
    """One node's runtime inside the namespace, on v0."""

    def __init__(self, netns: str, etcd: EtcdServer, ttl: float) -> None:
        self.netns = netns
        self.etcd = etcd
        self.ttl = ttl
        self.client: Any = None
        self.rt: GroupRuntime | None = None
        self.coord: Coordinator | None = None
        self.task: asyncio.Task[None] | None = None
        self.dataplane = FakeDataplane()

    @contextlib.asynccontextmanager
    async def running(self) -> Any:
        port = InterfaceVips("v0")
        with entered(self.netns):
            await port.__aenter__()
        self.client = EtcdClient(ClientSettings((self.etcd.endpoint,)))
        machine = Machine(MachineConfig("lb1", 100))
        try:
            coord_margin = 0.3 * self.ttl
            rt = GroupRuntime(
                machine,
                None,
                port,
                addresses=[VIP],
                announce_count=3,
                announce_interval=0.1,
                lifetime=vip_lifetime(self.ttl, coord_margin),
                dataplane=self.dataplane,
                name="lb1",
            )
            self.coord = Coordinator(
                self.client, KEYS, "lb1", 100, ttl=self.ttl, emit=rt.emit, fence_margin=coord_margin
            )
            rt.coord = self.coord
            self.rt = rt
            self.task = asyncio.create_task(rt.run())
            try:
                yield self
            finally:
                if not self.task.done():
                    await rt.stop()
                    await asyncio.wait_for(self.task, 10)
        finally:
            await self.client.close()
            port.close()


def in_ns(netns: str, fn: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        return await fn()

    return asyncio.run(main())


def test_winning_adds_vip_and_announces(netns: str, etcd: EtcdServer) -> None:
    async def body() -> list[bytes]:
        with entered(netns):
            cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
            cap.bind(("v1", 0))
        cap.settimeout(3.0)
        try:
            agent = Agent(netns, etcd, ttl=2)
            async with agent.running():
                assert agent.rt is not None
                await agent.rt.wait_for(State.ACTIVE, 5)
                frames: list[bytes] = []
                while len(frames) < 6:
                    frames.append(await asyncio.to_thread(cap.recv, 2048))
                await until(lambda: agent.rt is not None and agent.rt.announcements == 3, 2, "3")
                assert vip_present(netns)
                # The dataplane's dead-man switch is armed to the fence deadline.
                assert agent.dataplane.deadline_ns is not None
                assert agent.dataplane.deadline_ns > time.monotonic_ns()
            assert not vip_present(netns), "SIGTERM removes the VIP"
            return frames
        finally:
            cap.close()

    frames = in_ns(netns, body)
    garps = [f for f in frames if f[12:14] == b"\x08\x06" and f[28:32] == VIP.packed]
    assert len(garps) == 6  # 3 rounds x (request + reply)
    assert {f[21] for f in garps} == {1, 2}


def test_external_revoke_removes_the_vip(netns: str, etcd: EtcdServer) -> None:
    async def body() -> float:
        agent = Agent(netns, etcd, ttl=2)
        admin = EtcdClient(ClientSettings((etcd.endpoint,)))
        try:
            async with agent.running():
                assert agent.rt is not None and agent.coord is not None
                await agent.rt.wait_for(State.ACTIVE, 5)
                assert vip_present(netns)
                term = agent.rt.machine.term
                lease = agent.coord.lease_id
                t0 = time.monotonic()
                await admin.revoke(lease)
                await until(lambda: not vip_present(netns), 2, "VIP removed")
                took = time.monotonic() - t0
                # It wins a new term on a new lease and the VIP comes back.
                await until(lambda: vip_present(netns), 3, "VIP back")
                assert agent.rt.machine.term != term
                return took
        finally:
            await admin.close()

    took = in_ns(netns, body)
    print(f"\nexternal revoke: VIP gone from the interface in {took * 1000:.0f} ms")
    assert took < 1.0


def test_frozen_etcd_fences_vip_before_lease_ttl(netns: str, etcd: EtcdServer) -> None:
    ttl = 2

    async def body() -> tuple[float, float, float, int]:
        agent = Agent(netns, etcd, ttl=ttl)
        async with agent.running():
            assert agent.rt is not None and agent.coord is not None
            await agent.rt.wait_for(State.ACTIVE, 5)
            await asyncio.sleep(0.3)
            etcd.freeze()
            try:
                last_ok = agent.coord.last_keepalive_ok
                assert last_ok is not None
                await until(lambda: not vip_present(netns), ttl + 1, "VIP gone")
                gone = time.monotonic() - last_ok
                await agent.rt.wait_for(State.FENCED, ttl + 1)
                fenced = time.monotonic() - last_ok
                assert not vip_present(netns)
            finally:
                etcd.thaw()
            # Recovery: a fresh lease, a new term, the VIP back.
            await until(lambda: vip_present(netns), 10, "VIP back after thaw")
            assert agent.rt.lifetime is not None
            return gone, fenced, agent.coord.fence_margin, agent.rt.lifetime

    gone, fenced, margin, lifetime = in_ns(netns, body)
    print(
        f"\netcd frozen (TTL {ttl} s, margin {margin:.1f} s, VIP lifetime {lifetime} s): "
        f"VIP gone {gone:.2f}s and fenced {fenced:.2f}s after the last keepalive"
    )
    # The kernel lifetime (1 s) runs out first, the fence deadline (TTL - margin) next;
    # both before etcd could expire the lease (>= TTL after the last keepalive).
    assert gone < ttl - margin + 0.1
    assert ttl - margin - 0.05 <= fenced < ttl


def test_frozen_agent_vip_is_withdrawn_by_the_kernel(netns: str, etcd: EtcdServer) -> None:
    """A frozen agent cannot remove its VIP; the address lifetime does it."""
    ttl = 2
    removed: list[float] = []

    def watch_from_outside(stop: threading.Event) -> None:
        while not stop.is_set():
            if not vip_present(netns):
                removed.append(time.monotonic())
                return
            time.sleep(0.01)

    async def body() -> tuple[float, int]:
        agent = Agent(netns, etcd, ttl=ttl)
        async with agent.running():
            assert agent.rt is not None and agent.coord is not None
            await agent.rt.wait_for(State.ACTIVE, 5)
            await asyncio.sleep(0.5)
            stop = threading.Event()
            watcher = threading.Thread(target=watch_from_outside, args=(stop,))
            watcher.start()
            last_ok = agent.coord.last_keepalive_ok
            assert last_ok is not None
            time.sleep(ttl + 0.5)  # freeze this agent's event loop, as SIGSTOP would
            stop.set()
            watcher.join()
            assert agent.rt.lifetime is not None
            return last_ok, agent.rt.lifetime

    last_ok, lifetime = in_ns(netns, body)
    assert removed, "the kernel did not withdraw the VIP"
    after = removed[0] - last_ok
    print(
        f"\nfrozen agent (TTL {ttl} s, lifetime {lifetime} s): kernel removed the VIP "
        f"{after:.2f}s after the last keepalive; etcd frees the key at >= {ttl}.0 s"
    )
    assert after < ttl
