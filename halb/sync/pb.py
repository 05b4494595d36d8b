"""The generated FlowSync modules, generated first if missing or stale.

Import ``sync_pb2`` / ``sync_pb2_grpc`` from here, never from halb._proto directly.
They are loaded with importlib and typed ``Any`` on purpose: the generated code has
no type information that strict mypy accepts, and mypy must not depend on a tree that
exists only after generation.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from halb.sync import protogen

__all__ = ["SERVICE", "SYNC_METHOD", "sync_pb2", "sync_pb2_grpc"]

log = logging.getLogger(__name__)


def _load() -> tuple[Any, Any]:
    if not protogen.is_fresh():
        log.info(
            "generating protobuf modules into %s (missing or stale)", protogen.default_out_dir()
        )
        protogen.generate()
        importlib.invalidate_caches()
    pb2 = importlib.import_module("halb._proto.halb.v1.sync_pb2")
    grpc_mod = importlib.import_module("halb._proto.halb.v1.sync_pb2_grpc")
    return pb2, grpc_mod


sync_pb2, sync_pb2_grpc = _load()

SERVICE = "halb.v1.FlowSync"
SYNC_METHOD = f"/{SERVICE}/Sync"
