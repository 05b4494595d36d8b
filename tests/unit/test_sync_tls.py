"""mTLS helpers: peer names, the node check, insecure opt-in, generated certificates."""

from __future__ import annotations

import ipaddress
import logging
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from halb.config import ClusterConfig, parse_config
from halb.sync import certs, tls

pytestmark = pytest.mark.unit

CONFIG: dict[str, Any] = {
    "cluster": "t",
    "etcd": {"endpoints": ["http://127.0.0.1:2379"]},
    "dataplane": {"kind": "xdp"},
    "nodes": [
        {
            "name": name,
            "address": f"10.0.0.{11 + i}/24",
            "interface": "eth0",
            "priority": 100 - i,
            "sync_address": f"10.0.0.{11 + i}:7001",
            "admin_address": f"lb{i}.example:7002",
        }
        for i, name in enumerate(["lb1", "lb2"])
    ],
    "vip_groups": [
        {
            "name": "g",
            "vips": [
                {
                    "address": "10.0.0.100",
                    "services": [
                        {"port": 80, "forwarding": "dsr", "backends": [{"address": "10.0.0.21"}]}
                    ],
                }
            ],
        }
    ],
    "sync": {"insecure": True},
    "admin": {"insecure": True},
}


def cfg_with(**sync: Any) -> ClusterConfig:
    return parse_config({**CONFIG, "sync": sync})


def test_peer_names_and_authorized_name() -> None:
    ctx = {
        "transport_security_type": [b"ssl"],
        "x509_common_name": [b"lb2"],
        "x509_subject_alternative_name": [b"lb2", b"10.0.0.12"],
    }
    assert tls.peer_names(ctx) == {"lb2", "10.0.0.12"}
    assert tls.authorized_name(ctx, {"lb1", "lb2"}) == "lb2"
    assert tls.authorized_name(ctx, {"lb1"}) is None
    # SAN alone counts
    assert tls.authorized_name({**ctx, "x509_common_name": [b"x"]}, {"lb2"}) == "lb2"
    # without a verified TLS transport, no name counts
    assert tls.authorized_name({**ctx, "transport_security_type": [b"insecure"]}, {"lb2"}) is None
    assert tls.authorized_name({}, {"lb2"}) is None


def test_insecure_needs_an_explicit_flag_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    cfg = cfg_with(insecure=True)
    with pytest.raises(tls.InsecureNotAllowed, match="plaintext"):
        tls.SyncSecurity.from_config(cfg, "lb1")
    with caplog.at_level(logging.WARNING, logger="halb.sync.tls"):
        sec = tls.SyncSecurity.from_config(cfg, "lb1", allow_insecure=True)
    assert sec.insecure and sec.client is None
    assert sec.allowed_peers == {"lb1", "lb2"}
    assert any(r.levelno == logging.WARNING and "WITHOUT TLS" in r.message for r in caplog.records)


def test_from_config_reads_node_files(tmp_path: Path) -> None:
    files = certs.write_cluster_certs(cfg_with(insecure=True), tmp_path)
    cfg = cfg_with(tls=files.model_dump())
    sec = tls.SyncSecurity.from_config(cfg, "lb2")
    assert not sec.insecure and sec.server is not None and sec.client is not None
    missing = cfg_with(tls={**files.model_dump(), "cert": str(tmp_path / "nope-{node}.pem")})
    with pytest.raises(OSError, match=r"nope-lb1\.pem"):
        tls.SyncSecurity.from_config(missing, "lb1")


def test_node_certificate_contents(tmp_path: Path) -> None:
    cfg = cfg_with(insecure=True)
    files = certs.write_cluster_certs(cfg, tmp_path)
    ca = x509.load_pem_x509_certificate(Path(files.ca).read_bytes())
    cert = x509.load_pem_x509_certificate(Path(files.for_node("lb2").cert).read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "lb2"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["lb2"]
    # the interface address; the sync address is the same IP; admin is a host name
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.12")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    key_mode = stat.S_IMODE(Path(files.for_node("lb2").key).stat().st_mode)
    assert key_mode == 0o600
    assert stat.S_IMODE((tmp_path / "ca-key.pem").stat().st_mode) == 0o600


def test_rerun_keeps_the_ca_and_force_replaces_it(tmp_path: Path) -> None:
    cfg = cfg_with(insecure=True)
    certs.write_cluster_certs(cfg, tmp_path, nodes=["lb1"])
    ca1 = (tmp_path / "ca.pem").read_bytes()
    lb1 = (tmp_path / "lb1.pem").read_bytes()
    certs.write_cluster_certs(cfg, tmp_path)  # adds lb2, keeps CA and lb1
    assert (tmp_path / "ca.pem").read_bytes() == ca1
    assert (tmp_path / "lb1.pem").read_bytes() == lb1
    assert (tmp_path / "lb2.pem").exists()
    certs.write_cluster_certs(cfg, tmp_path, force=True)
    assert (tmp_path / "ca.pem").read_bytes() != ca1
    assert (tmp_path / "lb1.pem").read_bytes() != lb1
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    x509.load_pem_x509_certificate((tmp_path / "lb1.pem").read_bytes()).verify_directly_issued_by(
        ca
    )


def test_cli_certs_generate(tmp_path: Path) -> None:
    import yaml
    from click.testing import CliRunner

    from halb.cli.main import cli

    conf = tmp_path / "halb.yaml"
    conf.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "pki"
    result = CliRunner().invoke(
        cli, ["certs", "generate", "--config", str(conf), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    block = yaml.safe_load(result.stdout)["tls"]
    assert block == {
        "ca": str(out / "ca.pem"),
        "cert": str(out / "{node}.pem"),
        "key": str(out / "{node}-key.pem"),
    }
    assert sorted(p.name for p in out.iterdir()) == [
        "ca-key.pem",
        "ca.pem",
        "lb1-key.pem",
        "lb1.pem",
        "lb2-key.pem",
        "lb2.pem",
    ]
    bad = CliRunner().invoke(
        cli, ["certs", "generate", "--config", str(conf), "--out", str(out), "--node", "lb9"]
    )
    assert bad.exit_code == 2 and "lb9" in bad.output
