"""The nft dataplane end to end in the lab (issue 6): nat and fullnat through the VIP,
floating back-side addresses that follow the term, and live-connection takeover with
conntrack sync.

The module brings this instance's lab up with ``--dataplane nft`` and takes it down at
the end, so the other lab tests get their usual (xdp) lab back from the ``lab``
fixture.

Covered elsewhere, against the kernel and real gRPC: a peer's malformed or
out-of-config flows are refused and counted
(tests/kernel/test_nft_conntrack.py::test_refused_flows_are_counted_with_a_reason,
tests/kernel/test_sync_grpc.py::test_out_of_config_flows_are_dropped_and_counted,
::test_malformed_messages_do_not_crash_the_client); events of our own injections are
ignored (test_nft_conntrack.py::test_events_skip_our_own_injections); an event
overflow asks for a resync (::test_event_overflow_asks_for_resync).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import yaml

from halb.config import parse_config
from halb.dataplane.nft.adapter import snat_addresses
from halb.dataplane.nft.conntrack import Conntrack
from halb.dataplane.nft.flows import FlowMap
from halb.lab import builder, faults
from halb.lab.agents import (
    active,
    apply_config,
    logs_on_failure,
    node_status,
    restart_agents,
    status,
    wait_settled,
)
from halb.lab.netns import run
from halb.lab.observe import wait_until
from halb.lab.topology import site_from_env
from halb.net.netns import in_netns
from halb.testing.holders import CONNECTIONS, Client

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def nft_lab(lab_session: None) -> Iterator[dict[str, Any]]:
    site = site_from_env()
    builder.down(site)
    state = builder.up(dataplane="nft", site=site)
    try:
        wait_settled(state, sync=True)
        yield state
    finally:
        builder.down(site)


@pytest.fixture
def lab(nft_lab: dict[str, Any]) -> dict[str, Any]:
    """This module's lab is the nft lab (the conftest's is the default xdp one)."""
    return nft_lab


def _config(lab: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(Path(lab["config"]).read_text())
    return doc


def _with_forwarding(doc: dict[str, Any], mode: str) -> dict[str, Any]:
    for svc in doc["vip_groups"][0]["vips"][0]["services"]:
        svc["forwarding"] = mode
    return doc


@pytest.fixture(params=["nat", "fullnat"])
def mode(request: pytest.FixtureRequest, lab: dict[str, Any]) -> Iterator[str]:
    """Every service in this forwarding mode (a config apply); nat restored after."""
    m: str = request.param
    if m != "nat":
        apply_config(lab, _with_forwarding(_config(lab), m))
    try:
        yield m
    finally:
        if m != "nat":
            restart_agents(lab, [])
            apply_config(lab, _config(lab))


def _client_socket(lab: dict[str, Any], kind: int) -> socket.socket:
    s = in_netns(lab["client"]["namespace"], lambda: socket.socket(socket.AF_INET, kind))
    s.settimeout(5.0)
    return s


def _expected_peer(lab: dict[str, Any], mode: str) -> str:
    """Who a backend sees: the client (nat) or the floating SNAT address (fullnat)."""
    cfg = _config(lab)
    if mode == "nat":
        return str(lab["client"]["address"])
    return str(cfg["vip_groups"][0]["nat"]["snat"]).split("/")[0]


def _tcp_whois(lab: dict[str, Any]) -> tuple[str, str, int]:
    """(backend name, peer address it sees, peer port minus our local port: 0 when the
    backend sees our own port) over one TCP connection."""
    with _client_socket(lab, socket.SOCK_STREAM) as s:
        s.connect((lab["vip"], lab["echo_port"]))
        f = s.makefile("rwb")
        f.write(b"WHOAMI\n")
        f.flush()
        name = f.readline().decode().strip()
        f.write(b"WHOIS\n")
        f.flush()
        peer = f.readline().decode().split()
        f.write(b"hello\n")
        f.flush()
        assert f.readline() == b"hello\n"
        return name, peer[0], int(peer[1]) - s.getsockname()[1]


def _udp_whois(lab: dict[str, Any]) -> tuple[str, str]:
    with _client_socket(lab, socket.SOCK_DGRAM) as s:
        s.connect((lab["vip"], lab["udp_port"]))
        s.send(b"WHOAMI\n")
        name = s.recv(100).decode().strip()
        s.send(b"WHOIS\n")
        peer = s.recv(100).decode().split()[0]
        s.send(b"ping")
        assert s.recv(100) == b"ping"
        return name, peer


def _backend_names(lab: dict[str, Any]) -> set[str]:
    return {b["name"] for b in lab["backends"]}


def _floating(lab: dict[str, Any]) -> dict[str, set[str]]:
    """Per node, which floating back-side addresses its backend interface holds."""
    nat = _config(lab)["vip_groups"][0]["nat"]
    want = {str(nat["gateway"]).split("/")[0], str(nat["snat"]).split("/")[0]}
    out = {}
    for n in lab["nodes"]:
        text = run(["ip", "-n", n["namespace"], "-o", "addr", "show", "dev", "eth1"])
        have = {w.split("/")[0] for w in text.split() if "/" in w}
        out[n["name"]] = have & want
    return out


# -- traffic through the VIP --------------------------------------------------------------


def test_tcp_and_udp_reach_backends_through_the_vip(lab: dict[str, Any], mode: str) -> None:
    expected = _expected_peer(lab, mode)

    def tcp_ok() -> tuple[str, str, int] | None:
        with contextlib.suppress(OSError):
            return _tcp_whois(lab)
        return None

    # A config apply takes a moment to reach the active's dataplane.
    def seen_as_expected() -> tuple[str, str, int] | None:
        got = tcp_ok()
        return got if got is not None and got[1] == expected else None

    name, peer, _port = wait_until(f"TCP through the VIP seen from {expected}",
                                   seen_as_expected, 15, every=0.2)  # fmt: skip
    assert name in _backend_names(lab)
    names = set()
    for _ in range(12):
        name, peer, port_delta = _tcp_whois(lab)
        names.add(name)
        assert peer == expected
        if mode == "nat":
            assert port_delta == 0, "nat must keep the client's port"
    assert len(names) > 1, "every connection went to one backend"
    uname, upeer = _udp_whois(lab)
    assert uname in _backend_names(lab)
    assert upeer == expected


def test_floating_addresses_follow_the_term(lab: dict[str, Any]) -> None:
    first, second = lab["nodes"][0]["name"], lab["nodes"][1]["name"]
    wait_settled(lab, sync=True)
    held = _floating(lab)
    assert len(held[first]) == 2 and not held[second], held
    faults.apply_fault(first, "kill", lab)
    t0 = time.monotonic()
    try:
        wait_until(f"{second} active", lambda: active(lab) == second, 30, every=0.05)
        # The killed node cannot remove them: their kernel lifetime does.
        moved = wait_until(
            "the floating addresses to move",
            lambda: (h := _floating(lab))[second] and not h[first] and h,
            15,
            every=0.05,
        )
        gap = time.monotonic() - t0
        assert len(moved[second]) == 2
        assert gap < 10, gap
        name, _peer, _port = wait_until("TCP through the new active", lambda: _try_tcp(lab), 15)
        assert name in _backend_names(lab)
    finally:
        faults.apply_fault(first, "start", lab)
        wait_settled(lab, sync=True)
    held = _floating(lab)
    assert len(held[first]) == 2 and not held[second], held


def _try_tcp(lab: dict[str, Any]) -> tuple[str, str, int] | None:
    with contextlib.suppress(OSError):
        return _tcp_whois(lab)
    return None


# -- live connections across a SIGKILL of the active --------------------------------------


def _scenario(lab: dict[str, Any], mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Configs in ``mode`` without and with the echo service's last backend."""
    full = _with_forwarding(_config(lab), mode)
    fewer = yaml.safe_load(yaml.safe_dump(full))
    echo = next(
        s
        for s in fewer["vip_groups"][0]["vips"][0]["services"]
        if s["port"] == lab["echo_port"] and s["protocol"] == "tcp"
    )
    echo["backends"].pop()
    assert echo["backends"], "the lab needs at least two backends"
    return full, fewer


def _takeover(lab: dict[str, Any], mode: str) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
    """Connections opened, a backend added, the active SIGKILLed, then restarted.
    Returns the client's report, the standby's sync status before the kill, and the
    gap (s) from the kill until the new active carried a new connection."""
    first, second = lab["nodes"][0]["name"], lab["nodes"][1]["name"]
    full, fewer = _scenario(lab, mode)
    # Entries of earlier tests' connections live on (long TCP timeouts): start clean.
    for n in lab["nodes"]:
        run(["ip", "netns", "exec", n["namespace"], "conntrack", "-F"], check=False)
    apply_config(lab, fewer)
    client = Client(lab)
    try:
        start = client.read(60)["ready"]
        assert all(start.values()), f"connections without a backend: {start}"
        apply_config(lab, full)
        time.sleep(1.0)  # events and batches: the standby holds every flow
        standby_sync = node_status(lab, second)["sync"]
        standby_sync["ct_flows"] = _ct_flows(lab, full)
        t0 = time.monotonic()
        faults.apply_fault(first, "kill", lab)
        wait_until(f"{second} to take over", lambda: active(lab) == second, 30, every=0.05)
        wait_until("a new connection through the new active", lambda: _try_tcp(lab), 30)
        gap = time.monotonic() - t0
        client.whoami("after_kill")
        faults.apply_fault(first, "start", lab)
        wait_until(f"{first} to take the group back", lambda: active(lab) == first, 60,
                   every=0.2)  # fmt: skip
        client.whoami("after_return")
        return client.report(), standby_sync, gap
    finally:
        client.close()


def _ct_flows(lab: dict[str, Any], doc: dict[str, Any]) -> dict[str, int]:
    """Per node, the conntrack entries of this lab's client that are flows of ``doc``'s
    services (what `halb flows` lists, read here without the CLI)."""
    cfg = parse_config(doc, "test")
    fmap = FlowMap(cfg.services(), snat_addresses(cfg))
    client = ip_address(lab["client"]["address"])
    out = {}
    for n in lab["nodes"]:
        ct = Conntrack(n["namespace"])
        try:
            out[n["name"]] = sum(fe.flow.src == client for fe in ct.dump(fmap))
        finally:
            ct.close()
    return out


def test_with_sync_every_connection_survives_on_its_backend(lab: dict[str, Any], mode: str) -> None:
    restart_agents(lab, [])
    report, standby_sync, gap = _takeover(lab, mode)
    print(f"\n{mode} with sync: failover gap {gap:.2f} s, "
          f"{sum(not c['errors'] for c in report)}/{len(report)} survived")  # fmt: skip
    with logs_on_failure(lab):
        assert standby_sync["role"] == "client" and standby_sync["synced"] is True
        assert standby_sync["flows"] >= CONNECTIONS, standby_sync
        assert min(standby_sync["ct_flows"].values()) >= CONNECTIONS, standby_sync
        broken = [c for c in report if c["errors"]]
        assert not broken, f"{len(broken)} connections broke: {broken[:3]}"
        moved = [c for c in report if len(set(c["backends"].values())) != 1]
        assert not moved, f"connections changed backend: {moved[:3]}"
        assert all(c["echoes"] > 50 for c in report)


def test_without_sync_connections_are_lost(lab: dict[str, Any], mode: str) -> None:
    restart_agents(lab, ["--no-sync"])
    try:
        report, standby_sync, gap = _takeover(lab, mode)
    finally:
        restart_agents(lab, [])
    broken = [c for c in report if c["errors"]]
    print(f"\n{mode} without sync: failover gap {gap:.2f} s, "
          f"{len(report) - len(broken)}/{len(report)} survived")  # fmt: skip
    with logs_on_failure(lab):
        assert standby_sync.get("role") == "disabled"
        first, second = lab["nodes"][0]["name"], lab["nodes"][1]["name"]
        flows = standby_sync["ct_flows"]
        assert flows[first] >= CONNECTIONS and flows[second] == 0, flows
        # Strict tracking: the new active drops mid-flow packets it has no state for
        # (never sends them to another backend), so connections stall or are reset.
        assert broken, "no connection broke without sync"
        for c in report:
            assert len(set(c["backends"].values())) == 1, c


def test_a_standby_that_was_down_resyncs_and_takes_over(lab: dict[str, Any]) -> None:
    first, second = lab["nodes"][0]["name"], lab["nodes"][1]["name"]
    restart_agents(lab, [])
    for n in lab["nodes"]:
        run(["ip", "netns", "exec", n["namespace"], "conntrack", "-F"], check=False)
    faults.apply_fault(second, "term", lab)
    wait_until(f"{second} stopped", lambda: faults.agent_pid(second) is None, 15)
    client = Client(lab, connections=20)
    try:
        start = client.read(60)["ready"]
        assert all(start.values()), start
        faults.apply_fault(second, "start", lab)

        def resynced() -> bool:
            sync = node_status(lab, second)["sync"]
            return bool(sync.get("synced")) and int(sync.get("flows") or 0) >= 20

        wait_until(f"{second} resynced", resynced, 60, every=0.2)
        faults.apply_fault(first, "kill", lab)
        wait_until(f"{second} to take over", lambda: active(lab) == second, 30, every=0.05)
        client.whoami("after_kill")
        faults.apply_fault(first, "start", lab)
        wait_until(f"{first} back", lambda: active(lab) == first, 60, every=0.2)
        report = client.report()
    finally:
        client.close()
    with logs_on_failure(lab):
        broken = [c for c in report if c["errors"]]
        assert not broken, broken[:3]
        assert all(len(set(c["backends"].values())) == 1 for c in report), report[:3]
        assert status(lab)["groups"][0]["active"] == first
