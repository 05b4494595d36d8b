"""The connection holder that halb.testing.holders runs in the lab's client namespace.

``python holder_client.py VIP PORT N``: N connections to VIP:PORT, each sending a line
every 10 ms and checking its echo. Commands on stdin, one per line: ``whoami TAG``
(every live connection asks which backend serves it), ``stop`` (report). stdout: one
JSON line per command answered, the last one the report.

Run by path, not imported: it must start with only the standard library (it runs under
``ip netns exec``, where nothing of the parent process is shared).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

__all__ = ["Conn", "main"]

STALL = 20.0  # no echo for this long: the connection is declared dead


# asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
# races with its result, and a connection would then never stop.
async def line(r: asyncio.StreamReader, timeout: float) -> bytes:
    async with asyncio.timeout(timeout):
        return await r.readline()


class Conn:
    def __init__(self, i: int) -> None:
        self.i = i
        self.backends: dict[str, str] = {}
        self.errors: list[str] = []
        self.echoes = 0
        self.asks: asyncio.Queue[tuple[str, asyncio.Semaphore]] = asyncio.Queue()
        self.pending: asyncio.Semaphore | None = None
        self.stop = False

    async def run(self, vip: str, port: int, ready: asyncio.Semaphore) -> None:
        try:
            async with asyncio.timeout(10):
                r, w = await asyncio.open_connection(vip, port)
        except Exception as e:
            self.errors.append(f"connect: {e!r}")
            ready.release()
            return
        try:
            w.write(b"WHOAMI\n")
            await w.drain()
            self.backends["start"] = (await line(r, 10)).decode().strip()
            ready.release()
            seq = 0
            while not self.stop:
                if not self.asks.empty():
                    tag, self.pending = self.asks.get_nowait()
                    w.write(b"WHOAMI\n")
                    await w.drain()
                    self.backends[tag] = (await line(r, STALL)).decode().strip()
                    self.pending.release()
                    self.pending = None
                seq += 1
                sent = f"conn {self.i} seq {seq}\n".encode()
                w.write(sent)
                await w.drain()
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


def _say(doc: object) -> None:
    print(json.dumps(doc), flush=True)


async def main(vip: str, port: int, n: int) -> None:
    conns = [Conn(i) for i in range(n)]
    ready = asyncio.Semaphore(0)
    tasks = [asyncio.create_task(c.run(vip, port, ready)) for c in conns]
    for _ in conns:
        await ready.acquire()
    _say({"ready": {c.i: c.backends.get("start") for c in conns}})
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
        _say({"whoami": cmd[1]})
    for c, t in zip(conns, tasks, strict=True):
        c.stop = True
        t.cancel()
    await asyncio.wait(tasks, timeout=30)
    report = [
        {"i": c.i, "backends": c.backends, "errors": c.errors, "echoes": c.echoes} for c in conns
    ]
    _say({"report": report})


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
