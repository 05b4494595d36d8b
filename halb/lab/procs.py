"""The lab's processes: start them detached in a namespace, find and start agents and
backend servers. Used by the builder (lab up) and by fault injection (restart)."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from halb.lab import netns
from halb.lab.errors import FaultError, LabError
from halb.lab.netns import run
from halb.lab.topology import ECHO_PORT, HTTP_PORT, UDP_PORT, site_from_env

__all__ = [
    "agent_argv",
    "agent_pid",
    "backend_argv",
    "node_ns",
    "short_name",
    "spawn",
    "start_agent",
    "start_backend",
    "wait_for",
]


def node_ns(node: str) -> str:
    """The namespace of a node given by its short name or its namespace."""
    return site_from_env().ns(node)


def short_name(node: str) -> str:
    return node.removeprefix(site_from_env().prefix)


def spawn(argv: Sequence[str], logfile: Path, ns: str | None = None, append: bool = False) -> int:
    """Start a detached process (own session, reparented to init); return its pid.

    Going through `sh -c '... &'` leaves no child of ours behind to reap.
    """
    full = netns.netns_exec(ns, argv) if ns else list(argv)
    redirect = ">>" if append else ">"
    script = (
        f"setsid {shlex.join(full)} {redirect}{shlex.quote(str(logfile))} 2>&1 </dev/null & echo $!"
    )
    out = run(["sh", "-c", script])
    return int(out.strip())


def is_stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] in ("T", "t")


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise LabError(f"timed out after {timeout:g} s waiting for {what}")


def backend_argv(name: str, lab_dir: Path) -> list[str]:
    ready = lab_dir / "run" / f"{name}.ready"
    return [
        sys.executable, "-m", "halb.lab.backend_server", name,
        "--echo-port", str(ECHO_PORT), "--http-port", str(HTTP_PORT),
        "--udp-port", str(UDP_PORT), "--ready-file", str(ready),
    ]  # fmt: skip


def start_backend(name: str, namespace: str, lab_dir: Path) -> int:
    """Start one backend server and wait until it serves; returns its pid."""
    ready = lab_dir / "run" / f"{name}.ready"
    ready.unlink(missing_ok=True)
    pid = spawn(backend_argv(name, lab_dir), lab_dir / "logs" / f"{name}.log", ns=namespace,
                append=True)  # fmt: skip
    wait_for(f"the server on {name}", ready.exists, 20)
    return pid


def agent_pid(node: str) -> int | None:
    """The pid of the `halb agent` running in the node's namespace, if any."""
    for pid in netns.netns_pids(node_ns(node)):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        is_agent = b"agent" in argv and any(a.endswith(b"halb") for a in argv)
        if is_agent and netns.pid_alive(pid):
            return pid
    return None


def agent_argv(node: str, config: Path) -> list[str]:
    halb = str(Path(sys.executable).with_name("halb"))
    # The lab's config has sync.insecure: true, which an agent accepts only when told.
    return [
        halb, "agent", "--config", str(config), "--node", short_name(node), "--allow-insecure-sync"
    ]  # fmt: skip


def start_agent(node: str, config: Path, lab_dir: Path | None = None) -> int:
    if (pid := agent_pid(node)) is not None:
        raise FaultError(f"an agent already runs on {short_name(node)} (pid {pid})")
    log = (lab_dir or config.parent) / "logs" / f"agent-{short_name(node)}.log"
    # Append: a restarted agent's log follows the previous run's.
    return spawn(agent_argv(node, config), log, ns=node_ns(node), append=True)
