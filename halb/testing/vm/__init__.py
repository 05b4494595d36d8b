"""A QEMU VM for the tests that need kernel features this host lacks (IPVS).

    image = build_image()                       # cached under /var/cache/halb-vm
    run = run_in_vm(image, "python3 -c 'print(1)'", results_dir, timeout=300)
    run.exit_code, run.output, run.console

The guest is Debian's kernel with a busybox initramfs; it runs the host's own root
(read-only, over 9p) so the project's .venv and code run inside unchanged.
"""

from __future__ import annotations

from halb.testing.vm.image import VmImage, VmImageError, build_image, cache_dir, find_image
from halb.testing.vm.qemu import GUEST_RESULTS, GuestRun, VmError, qemu_binary, run_in_vm

__all__ = [
    "GUEST_RESULTS",
    "GuestRun",
    "VmError",
    "VmImage",
    "VmImageError",
    "build_image",
    "cache_dir",
    "find_image",
    "qemu_binary",
    "run_in_vm",
]
