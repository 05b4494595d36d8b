"""Build (once, cached) the test VM: Debian's kernel and an initramfs with busybox.

Nothing is installed on the host: the kernel package is fetched with
``apt-get download`` and unpacked with ``dpkg-deb -x`` into a temp dir, from which the
kernel and the modules the tests need are copied into a gzipped newc cpio together with
busybox-static and the init script (halb.testing.vm.guest_init). The result lives in
``<cache>/<kernel version>-<hash>/`` (default cache /var/cache/halb-vm, or
$HALB_VM_CACHE); the hash covers everything that goes into the image, so a change to the
module list or the init script builds a new one and an unchanged one is reused.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from halb.testing.vm.cpio import CpioEntry, directory, regular, symlink, write_newc
from halb.testing.vm.guest_init import INIT_SCRIPT
from halb.testing.vm.kmod import ModuleError, load_order, modinfo, module_name, requires

__all__ = [
    "BUSYBOX",
    "MODULES",
    "VmImage",
    "VmImageError",
    "build_image",
    "cache_dir",
    "find_image",
    "kernel_package",
]

log = logging.getLogger(__name__)

BUSYBOX = Path("/bin/busybox")
# Loaded in this order by the guest's init (dependencies are added before each).
MODULES = (
    # virtio PCI and 9p: the host root and the results dir.
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    # The dataplane under test and what its tests build around it.
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_lc",
    "ip_vs_wlc",
    "ip_vs_sh",
    "ip_vs_mh",
    "nf_conntrack",
    "ipip",
    "dummy",
    "veth",
    "bridge",
    # A NIC, for tests that join VMs on a network.
    "virtio_net",
)


class VmImageError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class VmImage:
    directory: Path
    kernel: Path
    initrd: Path
    kernel_version: str
    package: str

    @classmethod
    def load(cls, directory: Path) -> VmImage:
        meta = json.loads((directory / "manifest.json").read_text())
        return cls(
            directory,
            directory / "vmlinuz",
            directory / "initrd.img",
            str(meta["kernel_version"]),
            str(meta["package"]),
        )


def cache_dir() -> Path:
    return Path(os.environ.get("HALB_VM_CACHE", "/var/cache/halb-vm"))


def _run(*argv: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise VmImageError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def kernel_package() -> str:
    """The versioned image package linux-image-amd64 points at (linux-image-6.1.0-N-amd64)."""
    out = _run("apt-cache", "depends", "linux-image-amd64")
    m = re.search(r"Depends:\s*(linux-image-[0-9][\w.+-]*)", out)
    if not m:
        raise VmImageError("apt-cache knows no linux-image-amd64 dependency (run apt-get update)")
    return m.group(1)


def _recipe_hash(package: str) -> str:
    h = hashlib.sha256()
    h.update(f"{package}\n{','.join(MODULES)}\n".encode())
    h.update(INIT_SCRIPT.encode())
    for source in ("image.py", "kmod.py", "cpio.py"):  # the recipe itself
        h.update((Path(__file__).parent / source).read_bytes())
    h.update(BUSYBOX.read_bytes() if BUSYBOX.exists() else b"no busybox")
    return h.hexdigest()[:12]


def find_image(package: str | None = None) -> VmImage | None:
    """The cached image for the current recipe, if it was built."""
    package = package or kernel_package()
    if not BUSYBOX.exists():
        return None
    path = cache_dir() / f"{package}-{_recipe_hash(package)}"
    return VmImage.load(path) if (path / "manifest.json").exists() else None


def build_image(*, force: bool = False) -> VmImage:
    """Return the cached image, building it first if needed."""
    if not BUSYBOX.exists():
        raise VmImageError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    package = kernel_package()
    if not force and (image := find_image(package)) is not None:
        return image
    out = cache_dir() / f"{package}-{_recipe_hash(package)}"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="halb-vm-build-") as tmp:
        work = Path(tmp)
        deb = _download(package, work)
        root = work / "root"
        _run("dpkg-deb", "-x", str(deb), str(root))
        (version,) = [p.name for p in (root / "lib/modules").iterdir()]
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=_mkdir(cache_dir())))
        try:
            shutil.copyfile(root / f"boot/vmlinuz-{version}", staging / "vmlinuz")
            order, entries = _module_entries(root / "lib/modules" / version)
            initrd = write_newc(_base_entries(order) + entries)
            (staging / "initrd.img").write_bytes(gzip.compress(initrd, compresslevel=6, mtime=0))
            manifest = {
                "package": package,
                "kernel_version": version,
                "modules": order,
                "build_seconds": round(time.monotonic() - started, 1),
            }
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            staging.rename(out)
            for old in cache_dir().glob("linux-image-*"):
                if old != out and old.is_dir():  # images of an older recipe or kernel
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log.info("built %s in %.1f s", out, time.monotonic() - started)
    return VmImage.load(out)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _download(package: str, into: Path) -> Path:
    local = os.environ.get("HALB_VM_KERNEL_DEB")
    if local:
        return Path(local)
    try:
        _run("apt-get", "download", package, cwd=into)
    except VmImageError:
        # The lists may name a version the mirror no longer has.
        _run("apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-q")
        _run("apt-get", "download", package, cwd=into)
    (deb,) = into.glob("*.deb")
    return deb


def _module_entries(moddir: Path) -> tuple[list[str], list[CpioEntry]]:
    files = {module_name(p.name): p for p in (moddir / "kernel").rglob("*.ko*")}
    builtin = {module_name(line) for line in (moddir / "modules.builtin").read_text().splitlines()}
    infos: dict[str, dict[str, list[str]]] = {}
    aliases: dict[str, list[str]] = {}

    def info(name: str) -> dict[str, list[str]]:
        if files[name].suffix != ".ko":
            raise ModuleError(f"{files[name].name}: compressed modules are not supported")
        if name not in infos:
            infos[name] = modinfo(files[name].read_bytes())
        return infos[name]

    def resolve(name: str) -> str:
        if name in files or name in builtin:
            return name
        if not aliases:  # a soft dependency names an alias: index them once (~0.5 s)
            for mod in files:
                for alias in info(mod).get("alias", []):
                    aliases.setdefault(alias, []).append(mod)
        # Prefer the portable implementation (crc32c_generic over crc32c_intel).
        found = sorted(aliases.get(name, []), key=lambda m: (not m.endswith("_generic"), m))
        if not found:
            raise ModuleError(f"module {name} is neither in the package nor built in")
        return found[0]

    def depends(name: str) -> list[str]:
        name = resolve(name)
        if name in builtin:
            return []
        return [resolve(module_name(d)) for d in requires(info(name))]

    order = [m for m in load_order(MODULES, depends) if m not in builtin]
    entries = [directory("lib/modules")]
    entries += [regular(f"lib/modules/{m}.ko", files[m].read_bytes()) for m in order]
    return order, entries


def _base_entries(order: list[str]) -> list[CpioEntry]:
    entries = [directory(d) for d in ("bin", "sbin", "dev", "proc", "sys", "host", "lib", "tmp")]
    entries += [
        regular("bin/busybox", BUSYBOX.read_bytes(), 0o755),
        symlink("bin/sh", "busybox"),
        regular("init", INIT_SCRIPT.encode(), 0o755),
        regular("modules.order", ("\n".join(order) + "\n").encode()),
    ]
    return entries
