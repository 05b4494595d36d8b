"""A cluster CA and per-node certificates for FlowSync (and Admin) mTLS.

Used by the lab and by ``halb certs generate``. Keys are ECDSA P-256 (fast to make,
accepted by gRPC's TLS). Each node certificate carries the node name as CN and as a
DNS SAN (what the sync server checks and what the client pins), plus the node's
addresses as IP SANs, and is valid for both server and client authentication.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from halb.config import ClusterConfig, TlsFiles
from halb.model import IPAddress

__all__ = [
    "CertPair",
    "generate_ca",
    "generate_node_cert",
    "load_ca",
    "node_addresses",
    "write_cluster_certs",
]

_CA_DAYS = 3650
_NODE_DAYS = 825


@dataclass(frozen=True, slots=True)
class CertPair:
    key_pem: bytes
    cert_pem: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> datetime.datetime:
    # Backdated a little: nodes' clocks are never exactly in step.
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)


def generate_ca(cluster: str, days: int = _CA_DAYS) -> CertPair:
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"halb cluster CA {cluster}")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertPair(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def load_ca(ca: CertPair) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key (halb generates P-256 keys)")
    return key, x509.load_pem_x509_certificate(ca.cert_pem)


def generate_node_cert(
    ca: CertPair, name: str, addresses: Iterable[IPAddress] = (), days: int = _NODE_DAYS
) -> CertPair:
    ca_key, ca_cert = load_ca(ca)
    key = _key()
    now = _now()
    sans: list[x509.GeneralName] = [x509.DNSName(name)]
    sans += [x509.IPAddress(a) for a in dict.fromkeys(addresses)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return CertPair(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def node_addresses(cfg: ClusterConfig, node: str) -> list[IPAddress]:
    """Addresses a node is reached at: its interface address and any literal IP in its
    sync / admin / metrics addresses."""
    n = cfg.node(node)
    out: list[IPAddress] = [n.address.ip]
    for hp in (n.sync_address, n.admin_address, n.metrics_address):
        if hp is None:
            continue
        host = hp.rpartition(":")[0].strip("[]")
        # A host name adds nothing: the DNS SAN of the node name is what peers check.
        with contextlib.suppress(ValueError):
            out.append(ipaddress.ip_address(host))
    return out


def _write(path: Path, data: bytes, private: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_cluster_certs(
    cfg: ClusterConfig,
    out_dir: str | Path,
    *,
    nodes: Iterable[str] | None = None,
    force: bool = False,
) -> TlsFiles:
    """Write ca.pem / ca-key.pem and <node>.pem / <node>-key.pem for each node.

    An existing CA in out_dir is reused (so adding a node does not invalidate the
    others) unless force is set; existing node files are kept unless the CA is new.
    Returns the TlsFiles block (with the ``{node}`` placeholder) to put in the config.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = out / "ca.pem", out / "ca-key.pem"
    new_ca = force or not (ca_cert.exists() and ca_key.exists())
    if not new_ca:
        ca = CertPair(ca_key.read_bytes(), ca_cert.read_bytes())
        load_ca(ca)  # fail early on a broken CA
    else:
        ca = generate_ca(cfg.cluster)
        _write(ca_key, ca.key_pem, private=True)
        _write(ca_cert, ca.cert_pem, private=False)
    for name in nodes if nodes is not None else [n.name for n in cfg.nodes]:
        cert_path, key_path = out / f"{name}.pem", out / f"{name}-key.pem"
        if cert_path.exists() and key_path.exists() and not new_ca:
            continue
        pair = generate_node_cert(ca, name, node_addresses(cfg, name))
        _write(key_path, pair.key_pem, private=True)
        _write(cert_path, pair.cert_pem, private=False)
    return TlsFiles(ca=str(ca_cert), cert=str(out / "{node}.pem"), key=str(out / "{node}-key.pem"))
