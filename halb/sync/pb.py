"""The generated FlowSync modules (built by ``python -m halb.build``; a missing or
stale tree raises StaleProtoError saying so, it is not regenerated at import time).

Import ``sync_pb2`` / ``sync_pb2_grpc`` from here, never from halb._proto directly.
They are loaded with importlib and typed ``Any`` for now: the build writes .pyi stubs
beside them, but checking against those needs protobuf's own stubs (types-protobuf),
and mypy must not depend on a tree that exists only after generation.
"""

from __future__ import annotations

import importlib
from typing import Any

from halb.sync import protogen

__all__ = ["SERVICE", "SYNC_METHOD", "sync_pb2", "sync_pb2_grpc"]


def _load() -> tuple[Any, Any]:
    protogen.check_fresh()
    pb2 = importlib.import_module("halb._proto.halb.v1.sync_pb2")
    grpc_mod = importlib.import_module("halb._proto.halb.v1.sync_pb2_grpc")
    return pb2, grpc_mod


sync_pb2, sync_pb2_grpc = _load()

SERVICE = "halb.v1.FlowSync"
SYNC_METHOD = f"/{SERVICE}/Sync"
