"""Compile the PROXY protocol programs with the XDP object's content-stamped build
(halb.dataplane.xdp.build): same clang flags, same freshness rule, own directory.

Run as ``python -m halb.dataplane.proxyproto.build``; scripts/setup runs it through
``python -m halb.build``, and ProxyProgram builds on demand.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from halb.dataplane.xdp.build import BuildError, build_bpf

__all__ = ["BPF_DIR", "SOURCE", "build_proxy_bpf"]

BPF_DIR = Path(__file__).resolve().parent / "bpf"
SOURCE = "proxy.bpf.c"


def build_proxy_bpf(
    out_dir: Path | None = None, defines: Sequence[str] = (), force: bool = False
) -> Path:
    """The compiled object's path (built only when its sources or defines changed)."""
    return build_bpf(out_dir, source=SOURCE, defines=defines, force=force, bpf_dir=BPF_DIR)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        print(build_proxy_bpf(force="--force" in args))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
