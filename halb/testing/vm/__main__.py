"""``python -m halb.testing.vm build [--force]`` builds (or finds) the cached image;
``python -m halb.testing.vm run [--timeout S] -- CMD...`` boots it and runs CMD in the
guest (cwd: the project root), printing its output. Used by scripts/setup and by hand."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

from halb.testing.vm.image import build_image
from halb.testing.vm.qemu import run_in_vm

PROJECT = Path(__file__).resolve().parents[3]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="vm: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m halb.testing.vm")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the cached VM image if missing")
    b.add_argument("--force", action="store_true")
    r = sub.add_parser("run", help="boot the VM and run a command in it")
    r.add_argument("--timeout", type=float, default=600.0)
    r.add_argument("--console", action="store_true", help="also print the serial console")
    r.add_argument("command", nargs="+")
    args = parser.parse_args(argv)

    started = time.monotonic()
    image = build_image(force=args.cmd == "build" and args.force)
    if args.cmd == "build":
        print(f"{image.directory} ({time.monotonic() - started:.1f} s)")
        return 0
    with tempfile.TemporaryDirectory(prefix="halb-vm-") as tmp:
        script = f"cd {shlex.quote(str(PROJECT))}\n{shlex.join(args.command)}\n"
        run = run_in_vm(image, script, Path(tmp), timeout=args.timeout)
    if args.console or run.exit_code is None:
        sys.stdout.write(run.console)
    sys.stdout.write(run.output)
    print(
        f"vm: exit {run.exit_code}, {run.seconds:.1f} s total, boot {run.boot_seconds} s, "
        f"script {run.script_seconds} s",
        file=sys.stderr,
    )
    return 125 if run.exit_code is None else run.exit_code


if __name__ == "__main__":
    sys.exit(main())
