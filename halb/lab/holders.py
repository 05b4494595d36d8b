"""Long-lived TCP connections through the lab's VIP, held from the client namespace.

Used by the flow-takeover lab tests (XDP and nft): N connections, each sending a line
every 10 ms and checking its echo; on command every live connection asks WHOAMI
(which backend serves it), and at the end each reports its backends, errors and
echo count. A connection with no echo for 20 s is declared dead (a stall).

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
from typing import IO, Any

__all__ = ["CLIENT", "CONNECTIONS", "Client"]

CONNECTIONS = 50

# Runs in halb-client: python -c CLIENT VIP PORT N. Commands on stdin, one per line:
# "whoami TAG" (every connection asks which backend serves it), "stop" (report).
# stdout: one JSON line per command answered, the last one the report.
CLIENT = r"""
import asyncio, json, sys, time

VIP, PORT, N = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
STALL = 20.0  # no echo for this long: the connection is declared dead

# asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
# races with its result, and a connection would then never stop.
async def line(r, timeout):
    async with asyncio.timeout(timeout):
        return await r.readline()

class Conn:
    def __init__(self, i):
        self.i, self.backends, self.errors, self.echoes = i, {}, [], 0
        self.asks, self.pending, self.stop = asyncio.Queue(), None, False

    async def run(self, ready):
        try:
            async with asyncio.timeout(10):
                r, w = await asyncio.open_connection(VIP, PORT)
        except Exception as e:
            self.errors.append(f"connect: {e!r}"); ready.release(); return
        try:
            w.write(b"WHOAMI\n"); await w.drain()
            self.backends["start"] = (await line(r, 10)).decode().strip()
            ready.release()
            seq = 0
            while not self.stop:
                if not self.asks.empty():
                    tag, self.pending = self.asks.get_nowait()
                    w.write(b"WHOAMI\n"); await w.drain()
                    self.backends[tag] = (await line(r, STALL)).decode().strip()
                    self.pending.release()
                    self.pending = None
                seq += 1
                sent = f"conn {self.i} seq {seq}\n".encode()
                w.write(sent); await w.drain()
                got = await line(r, STALL)
                if got != sent:
                    raise ConnectionError(f"echo {got!r} for {sent!r}")
                self.echoes += 1
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            pass
        except Exception as e:
            self.errors.append(f"{time.time():.3f} {type(e).__name__}: {e}")
            ready.release()
            if self.pending is not None:
                self.pending.release()
            while not self.asks.empty():
                self.asks.get_nowait()[1].release()
        finally:
            w.close()

async def main():
    conns = [Conn(i) for i in range(N)]
    ready = asyncio.Semaphore(0)
    tasks = [asyncio.create_task(c.run(ready)) for c in conns]
    for _ in conns:
        await ready.acquire()
    print(json.dumps({"ready": {c.i: c.backends.get("start") for c in conns}}), flush=True)
    while True:
        cmd = (await asyncio.to_thread(sys.stdin.readline)).split()
        if not cmd or cmd[0] == "stop":
            break
        done = asyncio.Semaphore(0)
        live = [c for c in conns if not c.errors]
        for c in live:
            c.asks.put_nowait((cmd[1], done))
        async with asyncio.timeout(60):
            for _ in live:
                await done.acquire()
        print(json.dumps({"whoami": cmd[1]}), flush=True)
    for c, t in zip(conns, tasks):
        c.stop = True
        t.cancel()
    await asyncio.wait(tasks, timeout=30)
    print(json.dumps({"report": [
        {"i": c.i, "backends": c.backends, "errors": c.errors, "echoes": c.echoes}
        for c in conns]}), flush=True)

asyncio.run(main())
"""


class Client:
    """The connection client running in the lab's client namespace."""

    def __init__(
        self, lab: dict[str, Any], connections: int = CONNECTIONS, port: int | None = None
    ) -> None:
        ns = lab["client"]["namespace"]
        port = lab["echo_port"] if port is None else port
        argv = [sys.executable, "-c", CLIENT, lab["vip"], str(port), str(connections)]
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
