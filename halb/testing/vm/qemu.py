"""Boot the test VM once, run one shell script in it, collect what it wrote.

The host side of the protocol: a results dir (a fresh temp dir or the caller's) is
shared writable with the guest as ``results``; ``run.sh`` in it is what the guest runs,
chrooted into the host's root (so /work/... and the project's .venv are where they are
on the host), with the dir itself at /run/halb-vm. The guest writes ``output.log``,
``exit-code``, ``started`` and ``finished`` (guest uptime), then powers off. QEMU is
killed on timeout and always reaped.

TCG (software emulation) is the default: KVM on these machines cannot boot a stock
kernel. ``accel="kvm"`` (or $HALB_VM_ACCEL=kvm) uses it where it works.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from halb.testing.vm.guest_init import GUEST_RESULTS
from halb.testing.vm.image import VmImage

# The checkout this module runs from (halb/testing/vm/qemu.py -> the project root).
PROJECT = Path(__file__).resolve().parents[3]

__all__ = ["GUEST_RESULTS", "GuestRun", "VmError", "qemu_binary", "run_in_vm"]

QEMU = "qemu-system-x86_64"


class VmError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class GuestRun:
    exit_code: int | None  # None: the script never finished (guest crash or timeout)
    output: str  # the script's stdout and stderr
    console: str  # the serial console: kernel and init messages
    results: Path
    seconds: float  # wall time from QEMU start to exit
    script_seconds: float | None  # guest time the script ran (guest clock)
    boot_seconds: float | None  # guest uptime when the script started
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def qemu_binary() -> str | None:
    return shutil.which(QEMU)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _float(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:
        return None


def qemu_argv(image: VmImage, results: Path, *, memory_mb: int, cpus: int, accel: str) -> list[str]:
    binary = qemu_binary()
    if binary is None:
        raise VmError(f"{QEMU} not found: apt-get install qemu-system-x86")
    accel_opt = "tcg,thread=multi" if accel == "tcg" else accel
    return [
        binary,
        "-accel", accel_opt,
        "-cpu", "max" if accel == "tcg" else "host",
        "-smp", str(cpus),
        "-m", str(memory_mb),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", f"file:{results / 'console.log'}",
        "-monitor", "none",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", "console=ttyS0 panic=-1 quiet loglevel=4",
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={results},mount_tag=results,security_model=none",
        # The project again, on its own: the guest mounts tmpfs over /tmp and /run, which
        # would hide a checkout that lives there (CI clones anywhere).
        "-virtfs",
        f"local,path={PROJECT},mount_tag=project,security_model=none,readonly=on,"
        "multidevs=remap",
    ]  # fmt: skip


def run_in_vm(
    image: VmImage,
    script: str,
    results: Path,
    *,
    timeout: float = 600.0,
    memory_mb: int = 1024,
    cpus: int = 2,
    accel: str | None = None,
) -> GuestRun:
    """Boot, run ``script`` (sh) in the guest, power off; results stay in ``results``."""
    accel = accel or os.environ.get("HALB_VM_ACCEL", "tcg")
    results.mkdir(parents=True, exist_ok=True)
    for stale in ("exit-code", "output.log", "console.log", "started", "finished"):
        (results / stale).unlink(missing_ok=True)
    (results / "run.sh").write_text(script)
    (results / "project-path").write_text(str(PROJECT))
    argv = qemu_argv(image, results, memory_mb=memory_mb, cpus=cpus, accel=accel)
    started = time.monotonic()
    timed_out = False
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        qemu_out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        qemu_out = b""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.monotonic() - started
    code_text = _read(results / "exit-code").strip()
    start, finish = _float(_read(results / "started")), _float(_read(results / "finished"))
    console = _read(results / "console.log")
    if qemu_out.strip():
        console += "\n[qemu] " + qemu_out.decode(errors="replace")
    return GuestRun(
        exit_code=int(code_text) if code_text.lstrip("-").isdigit() else None,
        output=_read(results / "output.log"),
        console=console,
        results=results,
        seconds=seconds,
        script_seconds=finish - start if start is not None and finish is not None else None,
        boot_seconds=start,
        timed_out=timed_out,
    )
