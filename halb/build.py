"""Build step run by scripts/setup and CI: the BPF object and the gRPC stubs.

`python -m halb.build` is idempotent: each part skips work that is already fresh.
"""

from __future__ import annotations

import importlib
import logging
import sys

log = logging.getLogger("halb.build")

# (module, function) pairs; each builds one generated artefact.
STEPS = (
    ("halb.dataplane.xdp.build", "build_bpf"),
    ("halb.dataplane.proxyproto.build", "build_proxy_bpf"),
    ("halb.sync.protogen", "generate"),
    ("halb.etcd.proto", "generate"),
)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="build: %(message)s")
    for module, func in STEPS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                log.info("skip %s (not present)", module)
                continue
            raise
        out = getattr(mod, func)()
        log.info("%s.%s -> %s", module, func, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
