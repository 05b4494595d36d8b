"""mTLS for FlowSync: credentials from the config's TLS files and the peer check.

Both ends present a certificate signed by the cluster CA. The server additionally
requires that the client's certificate names (CN or a DNS SAN) a node of the config:
a certificate from the right CA for some other purpose must not let its holder pull
the flow table. The client pins the server's name to the node it expects to be
active (``grpc.ssl_target_name_override``), so it cannot be redirected to another
holder of a cluster certificate either.

``sync.insecure: true`` is for the lab only and works only when the caller passes
allow_insecure=True explicitly; it logs a WARNING every time it is used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from halb.config import ClusterConfig, TlsFiles

__all__ = [
    "InsecureNotAllowed",
    "SyncSecurity",
    "authorized_name",
    "client_credentials",
    "peer_names",
    "server_credentials",
]

log = logging.getLogger(__name__)


class InsecureNotAllowed(Exception):
    """sync.insecure is set but the caller did not explicitly allow plaintext."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OSError(exc.errno, f"cannot read sync TLS {what} {path}: {exc.strerror}") from None


def server_credentials(files: TlsFiles) -> Any:
    """Server credentials that require a client certificate signed by files.ca."""
    return grpc.ssl_server_credentials(
        [(_read(files.key, "key"), _read(files.cert, "certificate"))],
        root_certificates=_read(files.ca, "CA"),
        require_client_auth=True,
    )


def client_credentials(files: TlsFiles) -> Any:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(files.ca, "CA"),
        private_key=_read(files.key, "key"),
        certificate_chain=_read(files.cert, "certificate"),
    )


def peer_names(auth_context: Mapping[str, Iterable[bytes]]) -> set[str]:
    """Names a verified peer certificate carries: its CN and its SAN entries."""
    names: set[str] = set()
    for key in ("x509_common_name", "x509_subject_alternative_name", "peer_dns"):
        for raw in auth_context.get(key, ()):
            names.add(raw.decode("utf-8", "replace"))
    return names


def authorized_name(
    auth_context: Mapping[str, Iterable[bytes]], allowed: Iterable[str]
) -> str | None:
    """The config node the peer certificate names, or None if it names none.

    gRPC fills the x509 properties only for a certificate that passed verification
    against the CA, so a name here is a name the CA vouched for.
    """
    if b"ssl" not in set(auth_context.get("transport_security_type", ())):
        return None
    matches = sorted(peer_names(auth_context) & set(allowed))
    return matches[0] if matches else None


@dataclass(frozen=True, slots=True)
class SyncSecurity:
    """What a node needs to run both FlowSync roles. Credentials None = plaintext."""

    node: str
    allowed_peers: frozenset[str]
    server: Any | None
    client: Any | None

    @property
    def insecure(self) -> bool:
        return self.server is None

    @classmethod
    def from_config(
        cls, cfg: ClusterConfig, node: str, *, allow_insecure: bool = False
    ) -> SyncSecurity:
        peers = frozenset(n.name for n in cfg.nodes)
        if cfg.sync.insecure:
            if not allow_insecure:
                raise InsecureNotAllowed(
                    "sync.insecure is true: flow sync would run in plaintext with no peer "
                    "authentication; allow it explicitly (lab only) or configure sync.tls"
                )
            log.warning(
                "flow sync runs WITHOUT TLS (sync.insecure=true): any host that reaches "
                "the sync port can read and inject flows; use only in a lab"
            )
            return cls(node, peers, None, None)
        if cfg.sync.tls is None:
            raise ValueError("sync.tls is required unless sync.insecure is true")
        files = cfg.sync.tls.for_node(node)
        return cls(node, peers, server_credentials(files), client_credentials(files))

    @classmethod
    def from_files(cls, files: TlsFiles, node: str, allowed_peers: Iterable[str]) -> SyncSecurity:
        f = files.for_node(node)
        return cls(node, frozenset(allowed_peers), server_credentials(f), client_credentials(f))
