"""Compile the XDP programs with clang; skipped when the object matches its sources.

Freshness is by content: a stamp beside the object (``<object>.stamp``) holds the
digest of the sources and defines it was built from. File times do not survive a wheel
install, and a balancer installed from the wheel has no clang: its shipped object and
stamp must count as fresh there.

Run as ``python -m halb.dataplane.xdp.build`` (scripts/setup does) or let the loader
build on demand.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BPF_DIR", "BuildError", "build_bpf", "source_digest"]

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parent / "bpf"


class BuildError(RuntimeError):
    pass


def _multiarch_include() -> list[str]:
    # Without it: "asm/types.h file not found" (Debian keeps asm/ under the triplet).
    gcc = shutil.which("gcc")
    if gcc is None:
        return []
    out = subprocess.run([gcc, "-dumpmachine"], capture_output=True, text=True, check=False)
    triplet = out.stdout.strip()
    return [f"-I/usr/include/{triplet}"] if out.returncode == 0 and triplet else []


def _source_path(source: str | Path, bpf_dir: Path = BPF_DIR) -> Path:
    """A name in ``bpf_dir``, or the path of a source elsewhere (bench/bpf/: programs
    that include the XDP headers; bpf/ is on their include path)."""
    return source if isinstance(source, Path) else bpf_dir / source


def source_digest(source: str | Path, defines: Sequence[str] = (), bpf_dir: Path = BPF_DIR) -> str:
    """sha256 over the program's source, every header of ``bpf_dir`` and of the
    source's own directory, and the defines."""
    src = _source_path(source, bpf_dir)
    headers = sorted(bpf_dir.glob("*.h"))
    if src.parent != bpf_dir:
        headers += sorted(src.parent.glob("*.h"))
    h = hashlib.sha256()
    for path in [src, *headers]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update("\0".join(defines).encode())
    return h.hexdigest()


def build_bpf(
    out_dir: Path | None = None,
    source: str | Path = "balancer.bpf.c",
    defines: Sequence[str] = (),
    force: bool = False,
    bpf_dir: Path = BPF_DIR,
) -> Path:
    """Compile ``<bpf_dir>/<source>`` (or the path ``source``) to ``<out_dir or the
    source's directory>/<stem>.o`` and return its path. ``bpf_dir`` defaults to the XDP
    programs; other objects (the PROXY protocol programs) pass their own directory and
    share this build and its stamp.

    ``defines`` are ``NAME=VALUE`` overrides of constants.h (they change the object name
    so differently sized objects do not overwrite each other).
    """
    src = _source_path(source, bpf_dir)
    stem = src.name.removesuffix(".c")
    if defines:
        stem += "-" + "-".join(d.replace("=", "_") for d in defines)
    out = (out_dir or src.parent) / f"{stem}.o"
    stamp = out.with_name(out.name + ".stamp")
    digest = source_digest(source, defines, bpf_dir)
    if not force and out.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return out
    clang = shutil.which("clang")
    if clang is None:
        raise BuildError(
            "clang not found: run scripts/setup (checkout) or reinstall the halb wheel; "
            f"{out} is missing or does not match {src.name} and its headers"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".o.tmp")
    cmd = [
        clang,
        "-O2",
        "-g",
        "-Wall",
        "-Werror",
        "-target",
        "bpf",
        *_multiarch_include(),
        f"-I{BPF_DIR}",
        *(f"-D{d}" for d in defines),
        "-c",
        str(src),
        "-o",
        str(tmp),
    ]
    log.info("building %s", out)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"clang failed on {src}:\n{proc.stderr}")
    tmp.replace(out)  # atomic: a concurrent loader never sees half an object
    stamp.write_text(digest + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    force = "--force" in args
    try:
        for source in ("balancer.bpf.c", "minimal.bpf.c"):
            print(build_bpf(source=source, force=force))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
