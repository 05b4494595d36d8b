"""Long-lived TCP connections through the lab's VIP, held from the client namespace.

Used by the flow-takeover lab tests (XDP and nft): N connections (the program
halb/testing/holder_client.py), each sending a line every 10 ms and checking its echo;
on command every live connection asks WHOAMI (which backend serves it), and at the end
each reports its backends, errors and echo count. A connection with no echo for 20 s is
declared dead (a stall).

    client = Client(lab)                # lab: the lab's state (halb lab status --output json)
    start = client.read(60)["ready"]    # connection -> backend at the start
    client.whoami("after_kill")
    report = client.report()
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["CLIENT", "CONNECTIONS", "Client"]

CONNECTIONS = 50

# The program run in the client namespace (by path: see its docstring).
CLIENT = Path(__file__).with_name("holder_client.py")


class Client:
    """The connection client running in the lab's client namespace."""

    def __init__(
        self, lab: dict[str, Any], connections: int = CONNECTIONS, port: int | None = None
    ) -> None:
        ns = lab["client"]["namespace"]
        port = lab["echo_port"] if port is None else port
        argv = [sys.executable, str(CLIENT), lab["vip"], str(port), str(connections)]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Reader threads: a pipe that is not drained can block the client, and select()
        # on a buffered file misses lines already in its buffer.
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put)).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append)).start()

    @staticmethod
    def _pump(pipe: IO[str] | None, put: Callable[[str], None]) -> None:
        assert pipe is not None
        with pipe:
            for line in pipe:
                put(line)
        put("")

    def read(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"the connection client said nothing for {timeout:g} s: {''.join(self.stderr)}"
            ) from None
        if not line:
            self.proc.wait(5)
            raise RuntimeError(f"the connection client exited: {''.join(self.stderr)}")
        doc: dict[str, Any] = json.loads(line)
        return doc

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def whoami(self, tag: str) -> None:
        self.send(f"whoami {tag}")
        assert self.read(90) == {"whoami": tag}

    def report(self) -> list[dict[str, Any]]:
        self.send("stop")
        doc = self.read(30)
        self.proc.wait(10)
        report: list[dict[str, Any]] = doc["report"]
        return report

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
