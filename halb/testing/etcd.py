"""A real etcd for tests: free loopback ports, a temp data dir, fast timings.

    with EtcdServer() as etcd:          # started and ready
        etcd.endpoint                   # "http://127.0.0.1:<port>"
        etcd.stop(); etcd.start()       # restart on the same ports and data (reconnects)
        etcd.freeze(); etcd.thaw()      # SIGSTOP / SIGCONT: unreachable but alive
    EtcdServer(netns="halbt-x")         # inside a namespace (ip netns exec), on its lo

    with EtcdCluster(3, tls=True, auth=True) as c:   # three members on loopback
        c.endpoints                     # ["https://127.0.0.1:<port>", ...]
        c.members[1].stop(kill=True)    # SIGKILL one; .freeze() for SIGSTOP
        c.leader_index()                # which member is the raft leader
        c.tls                           # CA / client cert / key files, server name
        c.etcdctl("get", "/x")          # as root

TLS: a CA, one server certificate for every member (DNS name ``SERVER_NAME``, IP
127.0.0.1) and a client certificate (CN ``halb``), made by halb.sync.certs. Auth: a
root user, a user ``halb`` (password ``USER_PASSWORD``) whose role may read and write
only ``AUTH_PREFIX``; the same commands an operator runs (docs in README).

``--heartbeat-interval=50 --election-timeout=500`` makes it ready in ~0.3 s and allows a
1 s lease TTL (etcd's minimum TTL is 1.5 x election timeout). The data dir and the
process are removed on ``close()`` (and on exit of the ``with`` block), also on failure.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from halb.net.netns import setns

__all__ = [
    "AUTH_PREFIX",
    "ETCDCTL_BINARY",
    "ETCD_BINARY",
    "SERVER_NAME",
    "USER_PASSWORD",
    "ClusterTls",
    "EtcdCluster",
    "EtcdServer",
    "free_port",
]

ETCD_BINARY = os.environ.get("HALB_ETCD", "/usr/bin/etcd")
ETCDCTL_BINARY = os.environ.get("HALB_ETCDCTL", "/usr/bin/etcdctl")
SERVER_NAME = "etcd.halb.test"
AUTH_PREFIX = "/halb/"
USER_PASSWORD = "halb-test-password"
ROOT_PASSWORD = "halb-test-root"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    def __init__(
        self,
        *,
        heartbeat_ms: int = 50,
        election_ms: int = 500,
        binary: str = ETCD_BINARY,
        start: bool = True,
        netns: str | None = None,
        name: str = "halbt",
        initial_cluster: str | None = None,
        peer_port: int | None = None,
        tls: ClusterTls | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.binary = binary
        self.extra_args = extra_args
        self.netns = netns
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.name = name
        self.tls = tls
        self.client_port = free_port()
        self.peer_port = peer_port or free_port()
        self.metrics_port = free_port()
        self.initial_cluster = initial_cluster or f"{name}=http://127.0.0.1:{self.peer_port}"
        self.data_dir = Path(tempfile.mkdtemp(prefix="halbt-etcd-"))
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._frozen = False
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self.client_port

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    def _argv(self) -> list[str]:
        client = self.endpoint
        peer = f"http://127.0.0.1:{self.peer_port}"
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        tls: list[str] = []
        if self.tls is not None:
            tls = [
                f"--cert-file={self.tls.server_cert}",
                f"--key-file={self.tls.server_key}",
                f"--trusted-ca-file={self.tls.ca}",
                "--client-cert-auth",
            ]
        return [
            *prefix,
            self.binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir / 'data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.initial_cluster}",
            f"--listen-metrics-urls=http://127.0.0.1:{self.metrics_port}",
            f"--heartbeat-interval={self.heartbeat_ms}",
            f"--election-timeout={self.election_ms}",
            "--log-level=warn",
            *tls,
            *self.extra_args,
        ]

    def spawn(self) -> None:
        """Start the process without waiting (members of a new cluster wait for each
        other)."""
        if self.proc is not None and self.proc.poll() is None:
            return
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self._argv(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def start(self, timeout: float = 15.0) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.metrics_port}/health"
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited early; log:\n{self.log()}")
            if self._healthy(url):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd not ready after {timeout}s; log:\n{self.log()}")
            time.sleep(0.05)

    def _healthy(self, url: str) -> bool:
        def probe(out: list[bool]) -> None:
            try:
                if self.netns:
                    setns(self.netns)  # this probe thread only
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    out.append(b'"health":"true"' in resp.read())
            except (urllib.error.URLError, OSError):
                out.append(False)

        result: list[bool] = []
        if self.netns is None:
            probe(result)
        else:
            thread = threading.Thread(target=probe, args=(result,), daemon=True)
            thread.start()
            thread.join(5)
        return bool(result and result[0])

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, *, kill: bool = False) -> None:
        """Stop the process (SIGTERM, or SIGKILL with ``kill``); data is kept."""
        proc = self.proc
        if proc is None:
            return
        if self._frozen:
            self.thaw()
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung etcd)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        if self.proc is not None and self._frozen:
            self.proc.send_signal(signal.SIGCONT)
        self._frozen = False

    def close(self) -> None:
        try:
            self.stop(kill=True)
        finally:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def __enter__(self) -> EtcdServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class ClusterTls:
    """PEM files of a test cluster (and a foreign CA, to test refusals)."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    server_name: str = SERVER_NAME

    @classmethod
    def make(cls, directory: Path, client_cn: str = "halb") -> ClusterTls:
        from halb.sync.certs import generate_ca, generate_node_cert

        ca = generate_ca("etcd-test")
        server = generate_node_cert(ca, SERVER_NAME, [ipaddress.ip_address("127.0.0.1")])
        client = generate_node_cert(ca, client_cn)
        other = generate_ca("someone-else")
        files = {
            "ca.pem": ca.cert_pem,
            "server.pem": server.cert_pem,
            "server-key.pem": server.key_pem,
            "client.pem": client.cert_pem,
            "client-key.pem": client.key_pem,
            "other-ca.pem": other.cert_pem,
        }
        for name, data in files.items():
            (directory / name).write_bytes(data)
        d = directory
        return cls(
            d,
            d / "ca.pem",
            d / "server.pem",
            d / "server-key.pem",
            d / "client.pem",
            d / "client-key.pem",
            d / "other-ca.pem",
        )


class EtcdCluster:
    """``size`` members on loopback, optionally TLS (client certificates required) and
    auth (root + a user limited to AUTH_PREFIX)."""

    def __init__(
        self,
        size: int = 3,
        *,
        tls: bool = False,
        auth: bool = False,
        heartbeat_ms: int = 50,
        election_ms: int = 500,
        token_ttl: int | None = None,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="halbt-etcdc-"))
        extra = (f"--auth-token-ttl={token_ttl}",) if token_ttl else ()
        self.tls = ClusterTls.make(self.dir) if tls else None
        self.auth = auth
        peers = [free_port() for _ in range(size)]
        initial = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, p in enumerate(peers))
        self.members = [
            EtcdServer(
                heartbeat_ms=heartbeat_ms,
                election_ms=election_ms,
                start=False,
                name=f"m{i}",
                initial_cluster=initial,
                peer_port=peers[i],
                tls=self.tls,
                extra_args=extra,
            )
            for i in range(size)
        ]
        try:
            for m in self.members:
                m.spawn()
            for m in self.members:
                m.wait_ready()
            if auth:
                self._enable_auth()
        except BaseException:
            self.close()
            raise

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def etcdctl(
        self,
        *args: str,
        user: str | None = "root",
        check: bool = True,
        endpoints: list[str] | None = None,
    ) -> str:
        """etcdctl against the live members (as root once auth is on)."""
        live = endpoints or [
            m.endpoint for m in self.members if m.proc is not None and not m._frozen
        ]
        argv = [ETCDCTL_BINARY, f"--endpoints={','.join(live)}", "--dial-timeout=2s"]
        if self.tls is not None:
            argv += [
                f"--cacert={self.tls.ca}",
                f"--cert={self.tls.client_cert}",
                f"--key={self.tls.client_key}",
                "--insecure-discovery=false",
            ]
        if user == "root" and self._auth_on:
            argv.append(f"--user=root:{ROOT_PASSWORD}")
        env = dict(os.environ, ETCDCTL_API="3")
        done = subprocess.run(
            [*argv, *args], capture_output=True, text=True, env=env, timeout=30, check=False
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    _auth_on = False

    def _enable_auth(self) -> None:
        # What an operator runs (README "etcd TLS and auth").
        self.etcdctl("user", "add", f"root:{ROOT_PASSWORD}")
        self.etcdctl("user", "grant-role", "root", "root")
        self.etcdctl("role", "add", "halb")
        self.etcdctl("role", "grant-permission", "halb", "--prefix=true", "readwrite", AUTH_PREFIX)
        self.etcdctl("user", "add", f"halb:{USER_PASSWORD}")
        self.etcdctl("user", "grant-role", "halb", "halb")
        self.etcdctl("auth", "enable")
        self._auth_on = True

    def leader_index(self) -> int:
        """Index of the raft leader among the members (asked over the metrics port)."""
        for i, m in enumerate(self.members):
            if m.proc is None or m._frozen:
                continue
            url = f"http://127.0.0.1:{m.metrics_port}/metrics"
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    text = resp.read().decode()
            except (urllib.error.URLError, OSError):
                continue
            if "\netcd_server_is_leader 1" in text:
                return i
        raise RuntimeError("no etcd member reports being the leader")

    def make_follower(self, index: int) -> None:
        """Move raft leadership off member ``index`` if it has it (move-leader)."""
        leader = self.leader_index()
        if leader != index:
            return
        listing = json.loads(self.etcdctl("member", "list", "-w", "json"))
        name = self.members[index].name
        other = next(m for m in listing["members"] if m["name"] != name)
        self.etcdctl("move-leader", f"{other['ID']:x}", endpoints=[self.members[leader].endpoint])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):
                if self.leader_index() != index:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"leadership did not move off member {name}")

    def close(self) -> None:
        for m in self.members:
            with contextlib.suppress(Exception):
                m.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
