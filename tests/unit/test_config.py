from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from halb.cli.main import cli
from halb.config import (
    ConfigError,
    dump_config,
    load_config,
    parse_config,
    parse_config_text,
)
from halb.lab.topology import lab_config, plan
from halb.model import Forwarding, Protocol, ServiceKey

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
BROKEN = sorted((ROOT / "tests" / "configs" / "broken").glob("*.yaml"))


def expected_lines(path: Path) -> list[str]:
    return [
        line.removeprefix("# expect: ").rstrip("\n")
        for line in path.read_text().splitlines()
        if line.startswith("# expect: ")
    ]


def test_there_is_one_example_per_dataplane() -> None:
    kinds = {load_config(p).dataplane.kind.value for p in EXAMPLES}
    assert kinds == {"xdp", "nft", "ipvs"}


def test_examples_validate_ok() -> None:
    result = CliRunner().invoke(cli, ["config", "validate", *map(str, EXAMPLES)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"{p}: OK" for p in EXAMPLES]


def test_single_file_prints_ok() -> None:
    result = CliRunner().invoke(cli, ["config", "validate", str(EXAMPLES[0])])
    assert (result.exit_code, result.output) == (0, "OK\n")


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_config_gives_its_message_and_exit_2(path: Path) -> None:
    want = expected_lines(path)
    assert want, f"{path} has no '# expect:' line"
    result = CliRunner().invoke(cli, ["config", "validate", str(path)])
    assert result.exit_code == 2
    got = result.output.splitlines()
    for line in want:
        assert line in got, f"missing {line!r} in:\n{result.output}"
    # Nothing but the expected problems is reported.
    assert sorted(got) == sorted(want)


def test_every_error_is_reported_not_only_the_first() -> None:
    doc = yaml.safe_load((ROOT / "examples" / "xdp.yaml").read_text())
    doc["etcd"]["lease_ttl"] = 0.2
    doc["vip_groups"][0]["vips"][0]["services"][0]["backends"][0]["address"] = "nope"
    doc["nodes"][1]["priority"] = 999
    with pytest.raises(ConfigError) as ei:
        parse_config(doc)
    paths = {i.path for i in ei.value.issues}
    assert paths == {
        "vip_groups[0].vips[0].services[0].backends[0].address",
        "nodes[1].priority",
    }  # semantic checks run only once the schema holds; ttl is reported after a fix
    doc["vip_groups"][0]["vips"][0]["services"][0]["backends"][0]["address"] = "10.0.0.21"
    doc["nodes"][1]["priority"] = 100
    with pytest.raises(ConfigError) as ei:
        parse_config(doc)
    assert [str(i) for i in ei.value.issues] == [
        "etcd.lease_ttl: 0.2 is below the minimum of 1 second"
    ]


def test_user_braces_in_values_do_not_break_messages() -> None:
    doc = yaml.safe_load((ROOT / "examples" / "xdp.yaml").read_text())
    doc["vip_groups"][0]["vips"][0]["address"] = "{oops}"
    with pytest.raises(ConfigError) as ei:
        parse_config(doc)
    assert "vip_groups[0].vips[0].address: '{oops}' is not an IP address" in str(ei.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["config", "validate", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2
    assert "cannot read" in result.output and "No such file" in result.output


def test_services_are_derived_with_default_ports() -> None:
    cfg = load_config(ROOT / "examples" / "xdp.yaml")
    services = {s.key: s for s in cfg.services()}
    key = ServiceKey(ipaddress.ip_address("10.0.0.100"), 80, Protocol.TCP)
    svc = services[key]
    assert svc.forwarding is Forwarding.DSR
    assert [(str(b.address), b.port, b.weight) for b in svc.backends] == [
        ("10.0.0.21", 80, 1),
        ("10.0.0.22", 80, 1),
        ("10.0.0.23", 80, 2),
    ]
    assert len(services) == 3


def test_dump_roundtrip() -> None:
    for p in EXAMPLES:
        cfg = load_config(p)
        assert parse_config_text(dump_config(cfg)) == cfg


def test_tls_paths_take_the_node_name() -> None:
    cfg = load_config(ROOT / "examples" / "xdp.yaml")
    assert cfg.sync.tls is not None
    assert cfg.sync.tls.for_node("lb2").cert == "/etc/halb/tls/lb2.crt"


@pytest.mark.parametrize("dataplane", ["xdp", "nft"])
def test_lab_config_is_valid(dataplane: str) -> None:
    cfg = parse_config(lab_config(plan(3, 4), dataplane))
    assert [n.name for n in cfg.nodes] == ["lb1", "lb2", "lb3"]
    assert len(cfg.vip_groups[0].vips[0].services[0].backends) == 4


def test_fast_failover_defaults_follow_the_dataplane() -> None:
    doc = yaml.safe_load((ROOT / "examples" / "xdp.yaml").read_text())
    cfg = parse_config(doc)
    assert cfg.failover.interval_for(cfg.dataplane.kind) == 0.1
    # The standby's wait covers the timeout, one interval and a coarse-clock tick.
    assert cfg.failover.fence_wait(cfg.dataplane.kind) > cfg.failover.heartbeat_timeout + 0.1
    ipvs = parse_config(yaml.safe_load((ROOT / "examples" / "ipvs.yaml").read_text()))
    assert ipvs.failover.interval_for(ipvs.dataplane.kind) == 0.0
    assert ipvs.failover.fence_wait(ipvs.dataplane.kind) == 0.0
    doc["failover"] = {"heartbeat_interval": 0}
    off = parse_config(doc)
    assert off.failover.fence_wait(off.dataplane.kind) == 0.0
    doc["failover"] = {"heartbeat_timeout": 2.5}
    with pytest.raises(ConfigError) as ei:
        parse_config(doc)
    assert [i.path for i in ei.value.issues] == ["failover.heartbeat_timeout"]
    assert "etcd.lease_ttl" in str(ei.value)
