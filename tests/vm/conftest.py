"""The vm tier: one VM boot per session runs every test under tests/vm/guest/ inside
the guest (one pytest process there: importing pyroute2 alone takes ~8 s under TCG);
the host-side tests in this directory then assert on the results it wrote.

Without QEMU (or busybox-static) the tier skips locally with the reason, and fails in
CI (CI=true), so a machine that lost its VM set-up cannot pass silently.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from halb.testing.vm.results import GuestResults

IN_GUEST = bool(os.environ.get("HALB_VM_GUEST"))
# On the host the guest tests are not collected; test_guest.py runs them in the VM.
collect_ignore = [] if IN_GUEST else ["guest"]

PROJECT = Path(__file__).resolve().parents[2]
GUEST_TIMEOUT = float(os.environ.get("HALB_VM_TIMEOUT", "900"))


def _unavailable() -> str | None:
    from halb.testing.vm import qemu_binary
    from halb.testing.vm.image import BUSYBOX

    if qemu_binary() is None:
        return "qemu-system-x86_64 is not installed (scripts/setup installs it)"
    if not BUSYBOX.exists():
        return f"{BUSYBOX} is missing (scripts/setup installs busybox-static)"
    return None


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="session")
def guest_results() -> Iterator[GuestResults]:
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"vm tier cannot run in CI: {reason}", pytrace=False)
        pytest.skip(reason)
    from halb.testing.vm import build_image, run_in_vm

    started = time.monotonic()
    image = build_image()
    build_s = time.monotonic() - started
    results = Path(tempfile.mkdtemp(prefix="halb-vm-"))
    try:
        # The guest cannot write .pyc files to the read-only host root: compile now.
        subprocess.run(
            [
                sys.executable,
                "-m",
                "compileall",
                "-q",
                str(PROJECT / "halb"),
                str(PROJECT / "tests"),
            ],
            check=False,
            capture_output=True,
        )
        script = (
            f"cd {shlex.quote(str(PROJECT))}\n"
            f"export HALB_VM_RESULTS=/run/halb-vm/reports.jsonl PYTHONDONTWRITEBYTECODE=1\n"
            ".venv/bin/python -m pytest -p no:cacheprovider -q --timeout=300 "
            "tests/vm/guest\n"
        )
        run = run_in_vm(image, script, results, timeout=GUEST_TIMEOUT)
        out = GuestResults.read(results)
        out.exit_code = run.exit_code
        out.timings = {
            "image_build_or_lookup_s": round(build_s, 1),
            "vm_wall_s": round(run.seconds, 1),
            "guest_boot_s": run.boot_seconds,
            "guest_pytest_s": run.script_seconds,
        }
        out.diagnostics = (
            f"\n--- guest exit code {run.exit_code}"
            f"{' (timed out)' if run.timed_out else ''}, timings {out.timings}"
            f"\n--- guest pytest output (tail)\n{_tail(run.output)}"
            f"\n--- serial console (tail)\n{_tail(run.console, 30)}"
        )
        print(f"\nvm tier timings: {out.timings}\nvm tier measurements: {out.measurements}")
        yield out
    finally:
        shutil.rmtree(results, ignore_errors=True)
