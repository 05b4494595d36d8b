"""A real etcd for tests: free loopback ports, a temp data dir, fast timings.

    with EtcdServer() as etcd:          # started and ready
        etcd.endpoint                   # "http://127.0.0.1:<port>"
        etcd.stop(); etcd.start()       # restart on the same ports and data (reconnects)
        etcd.freeze(); etcd.thaw()      # SIGSTOP / SIGCONT: unreachable but alive
    EtcdServer(netns="halbt-x")         # inside a namespace (ip netns exec), on its lo

``--heartbeat-interval=50 --election-timeout=500`` makes it ready in ~0.3 s and allows a
1 s lease TTL (etcd's minimum TTL is 1.5 x election timeout). The data dir and the
process are removed on ``close()`` (and on exit of the ``with`` block), also on failure.
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path
from types import TracebackType

from halb.net.netns import setns

__all__ = ["ETCD_BINARY", "EtcdServer", "free_port"]

ETCD_BINARY = os.environ.get("HALB_ETCD", "/usr/bin/etcd")


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
    ) -> None:
        self.binary = binary
        self.netns = netns
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.client_port = free_port()
        self.peer_port = free_port()
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
        return f"http://127.0.0.1:{self.client_port}"

    def _argv(self) -> list[str]:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [
            *prefix,
            self.binary,
            "--name=halbt",
            f"--data-dir={self.data_dir / 'data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=halbt={peer}",
            f"--heartbeat-interval={self.heartbeat_ms}",
            f"--election-timeout={self.election_ms}",
            "--log-level=warn",
        ]

    def start(self, timeout: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self._argv(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"{self.endpoint}/health"
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
