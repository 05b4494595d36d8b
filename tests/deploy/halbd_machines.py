"""systemd-nspawn machines for the deploy tier: a cached Debian rootfs, one network
namespace per machine (prefix ``halbd-``), two bridges, an apt-cacher-ng on the host's
management address, ssh. Everything made here is removed by ``Fabric.teardown``, which
also clears what an interrupted earlier run left (only ``halbd-`` names).

What PLATFORM.md measured: the host's PID 1 is not systemd, so every nspawn runs with
``--register=no --keep-unit`` in a cgroup of its own; ``--private-network`` with
``--network-namespace-path`` makes /proc/sys/net writable inside; XDP needs
``--system-call-filter=bpf`` and CAP_BPF / CAP_PERFMON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path("/var/cache/halb-deploy")
RUN = Path("/run/halbd")
PREFIX = "halbd-"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# In the base: what ansible and ssh need. The roles install the rest (through the proxy).
INCLUDE = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "python3-apt",
    "iproute2",
    "ca-certificates",
    "procps",
)
CGROUP_TREES = ("systemd", "unified")  # the host's hybrid hierarchy: name=systemd and v2
FRONT, MGMT = "front", "mgmt"


def run(cmd: Sequence[str], check: bool = True, timeout: float = 120) -> str:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def _recipe_key() -> str:
    recipe = {"suite": SUITE, "mirror": MIRROR, "include": INCLUDE, "prep": 2}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def base_rootfs() -> Path:
    """The unpacked, prepared base (read-only lower layer of every machine); built once."""
    key = _recipe_key()
    base = CACHE / f"base-{key}"
    if (base / ".halbd-ready").exists():
        return base
    CACHE.mkdir(parents=True, exist_ok=True)
    tar = CACHE / f"rootfs-{key}.tar"
    if not tar.exists():
        tmp = tar.with_suffix(".tmp.tar")
        run(
            [
                "mmdebstrap",
                "--variant=minbase",
                f"--include={','.join(INCLUDE)}",
                SUITE,
                str(tmp),
                MIRROR,
            ],
            timeout=600,
        )
        tmp.rename(tar)
    work = base.with_name(base.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    run(["tar", "-C", str(work), "-xf", str(tar)], timeout=300)
    # nspawn passes --hostname only when the image has none; each boot makes its own id.
    (work / "etc/hostname").unlink(missing_ok=True)
    (work / "etc/machine-id").write_text("")
    (work / "etc/hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost\n")
    (work / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    (work / ".halbd-ready").write_text(key + "\n")
    shutil.rmtree(base, ignore_errors=True)
    work.rename(base)
    return base


def ssh_key() -> Path:
    key = CACHE / "ssh/id_ed25519"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
    return key


@dataclass(frozen=True)
class Link:
    segment: str  # FRONT or MGMT
    ifname: str  # inside the machine
    address: str  # a.b.c.d/prefix
    mac: str


@dataclass
class Machine:
    name: str
    links: list[Link]
    pid: int | None = None

    @property
    def netns(self) -> str:
        return PREFIX + self.name

    def ip(self, segment: str) -> str:
        return next(ln.address.split("/")[0] for ln in self.links if ln.segment == segment)

    def mac(self, segment: str) -> str:
        return next(ln.mac for ln in self.links if ln.segment == segment)


@dataclass
class Fabric:
    """The host side: bridges, the apt proxy, the machines, ssh config."""

    subnet: str  # first two octets, e.g. "10.92"
    machines: dict[str, Machine] = field(default_factory=dict)
    proxy_pid: int | None = None
    # Kept so they are reaped (and never garbage-collected while running).
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def host_mgmt(self) -> str:
        return f"{self.subnet}.2.1"

    @property
    def ssh_config(self) -> Path:
        return RUN / "ssh_config"

    def bridge(self, segment: str) -> str:
        return f"{PREFIX}br-{segment[0]}"

    # -- set-up ------------------------------------------------------------------------

    def up(self, machines: list[Machine]) -> None:
        base = base_rootfs()
        key = ssh_key()
        RUN.mkdir(parents=True, exist_ok=True)
        for seg in (FRONT, MGMT):
            br = self.bridge(seg)
            run(["ip", "link", "add", br, "type", "bridge"])
            run(["ip", "link", "set", br, "up"])
        run(["ip", "addr", "add", f"{self.host_mgmt}/24", "dev", self.bridge(MGMT)])
        self._start_proxy()
        (RUN / "apt-proxy.conf").write_text(
            f'Acquire::http::Proxy "http://{self.host_mgmt}:3142";\n'
        )
        (RUN / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
        self._write_ssh_config(machines, key)
        for m in machines:
            self.machines[m.name] = m
            self._plumb(m)
            self._boot(m, base)
        deadline = time.monotonic() + 60
        for m in machines:
            while self.ssh(m.name, "systemctl is-system-running --wait", check=False)[0] > 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"machine {m.name}: no ssh within 60 s")
                time.sleep(0.3)

    def _plumb(self, m: Machine) -> None:
        run(["ip", "netns", "add", m.netns])
        run(["ip", "-n", m.netns, "link", "set", "lo", "up"])
        for ln in m.links:
            host = f"{PREFIX}{m.name}-{ln.segment[0]}"
            peer = ["name", ln.ifname, "address", ln.mac, "netns", m.netns]
            run(["ip", "link", "add", host, "type", "veth", "peer", *peer])
            run(["ip", "link", "set", host, "master", self.bridge(ln.segment), "up"])
            run(["ip", "-n", m.netns, "addr", "add", ln.address, "dev", ln.ifname])
            run(["ip", "-n", m.netns, "link", "set", ln.ifname, "up"])

    def _boot(self, m: Machine, base: Path) -> None:
        d = RUN / m.name
        d.mkdir(parents=True, exist_ok=True)
        cgroups = [Path("/sys/fs/cgroup") / t / m.netns for t in CGROUP_TREES]
        for cg in cgroups:
            cg.mkdir(exist_ok=True)
        # Each nspawn in its own cgroup (two in one collide): the shell moves itself,
        # then becomes nspawn.
        move = "; ".join(f"echo $$ > {cg}/cgroup.procs" for cg in cgroups)
        nspawn = [
            "systemd-nspawn",
            "-q",
            "-b",
            "--register=no",
            "--keep-unit",
            "--link-journal=no",
            "--console=read-only",
            f"--directory={base}",
            "--volatile=overlay",
            f"--hostname={m.name}",
            f"--machine={m.netns}",
            "--private-network",
            f"--network-namespace-path=/run/netns/{m.netns}",
            "--system-call-filter=bpf",
            "--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN",
            f"--bind-ro={RUN / 'authorized_keys'}:/root/.ssh/authorized_keys",
            f"--bind-ro={RUN / 'apt-proxy.conf'}:/etc/apt/apt.conf.d/01proxy",
        ]
        with open(d / "console.log", "wb") as log:
            p = subprocess.Popen(
                ["sh", "-c", f"{move}; exec {' '.join(nspawn)}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(p)
        m.pid = p.pid
        (d / "pid").write_text(f"{p.pid}\n")

    def _start_proxy(self) -> None:
        conf = RUN / "acng-conf"
        logs = RUN / "acng-log"
        for d in (conf, logs, CACHE / "acng"):
            d.mkdir(parents=True, exist_ok=True)
        # Backend http://deb.debian.org/debian/ (without it: 503); avoid cache_valid_time.
        (conf / "backends_debian").write_text(f"{MIRROR}/\n")
        (conf / "acng.conf").write_text(
            "\n".join(
                [
                    f"CacheDir: {CACHE / 'acng'}",
                    f"LogDir: {logs}",
                    "SupportDir: /usr/lib/apt-cacher-ng",
                    "Port: 3142",
                    f"BindAddress: {self.host_mgmt}",
                    f"PidFile: {RUN / 'acng.pid'}",
                    f"SocketPath: {RUN / 'acng.sock'}",
                    "Remap-debrep: file:deb_mirror*.gz /debian ; file:backends_debian",
                    "ExThreshold: 4",
                    "",
                ]
            )
        )
        with open(logs / "stdout", "wb") as out:
            p = subprocess.Popen(
                ["/usr/sbin/apt-cacher-ng", "-c", str(conf), "ForeGround=1"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(p)
        self.proxy_pid = p.pid
        (RUN / "acng.ownpid").write_text(f"{p.pid}\n")

    def _write_ssh_config(self, machines: list[Machine], key: Path) -> None:
        lines = []
        for m in machines:
            lines += [
                f"Host {m.name}",
                f"  HostName {m.ip(MGMT)}",
                "  User root",
                f"  IdentityFile {key}",
                "  IdentitiesOnly yes",
                "  StrictHostKeyChecking no",
                "  UserKnownHostsFile /dev/null",
                "  LogLevel ERROR",
                "  ConnectTimeout 3",
                "",
            ]
        self.ssh_config.write_text("\n".join(lines))

    # -- use ---------------------------------------------------------------------------

    def ssh_argv(self, name: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), name]

    def ssh(self, name: str, cmd: str, check: bool = True, timeout: float = 60) -> tuple[int, str]:
        p = subprocess.run(
            [*self.ssh_argv(name), cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if check and p.returncode != 0:
            raise RuntimeError(f"{name}: {cmd!r} exited {p.returncode}: {p.stderr.strip()}")
        return p.returncode, p.stdout

    # -- teardown ----------------------------------------------------------------------

    def teardown(self) -> None:
        """Remove every machine, namespace, bridge and the proxy; also those of an
        earlier run that did not finish (found by their halbd- names and pid files)."""
        pids = [m.pid for m in self.machines.values() if m.pid]
        if RUN.is_dir():
            for f in RUN.glob("*/pid"):
                with contextlib.suppress(ValueError):
                    pids.append(int(f.read_text()))
        _stop_all(sorted(set(pids)))
        for pidfile in (RUN / "acng.ownpid",):
            if pidfile.exists():
                with contextlib.suppress(ValueError):
                    _stop_all([int(pidfile.read_text())], grace=3)
        for tree in CGROUP_TREES:
            root = Path("/sys/fs/cgroup") / tree
            for cg in root.glob(PREFIX + "*"):
                _remove_cgroup(cg)
        for ns in run(["ip", "netns", "list"], check=False).split():
            if ns.startswith(PREFIX):
                run(["ip", "netns", "del", ns], check=False)
        for line in run(["ip", "-o", "link", "show"], check=False).splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if name.startswith(PREFIX):
                run(["ip", "link", "del", name], check=False)
        shutil.rmtree(RUN, ignore_errors=True)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self.procs.clear()
        self.machines.clear()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours counts as gone once reaped.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _stop_all(pids: list[int], grace: float = 15) -> None:
    """SIGTERM (nspawn powers its machine off), then SIGKILL after grace seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _remove_cgroup(cg: Path) -> None:
    for _ in range(50):
        for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            cg.rmdir()
        if not cg.exists():
            return
        # Processes still in it (a machine shutting down): kill them, retry.
        for procs in cg.rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.1)
