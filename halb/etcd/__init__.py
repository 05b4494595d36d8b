"""halb's own etcd v3 client (grpc.aio on stubs generated from etcd's protos).

Every endpoint is dialled, TLS and auth are supported, hung or dead members are left
within about 0.3 s, and watches resume without losing or repeating an event.
PLATFORM.md "etcd client" has the measured reasons for each rule.
"""

from __future__ import annotations

from halb.etcd.channel import TlsFiles
from halb.etcd.client import ClientSettings, EtcdClient
from halb.etcd.errors import (
    AuthFailed,
    Compacted,
    EtcdError,
    EtcdUnavailable,
    LeaseNotFound,
    PermissionDenied,
    TlsError,
)
from halb.etcd.kv import (
    Compare,
    Delete,
    DeleteResult,
    EventKind,
    Get,
    KeyValue,
    LeaseInfo,
    Put,
    PutResult,
    RangeResult,
    TxnResult,
    WatchEvent,
)
from halb.etcd.watch import Snapshot, read_then_watch

__all__ = [
    "AuthFailed",
    "ClientSettings",
    "Compacted",
    "Compare",
    "Delete",
    "DeleteResult",
    "EtcdClient",
    "EtcdError",
    "EtcdUnavailable",
    "EventKind",
    "Get",
    "KeyValue",
    "LeaseInfo",
    "LeaseNotFound",
    "PermissionDenied",
    "Put",
    "PutResult",
    "RangeResult",
    "Snapshot",
    "TlsError",
    "TlsFiles",
    "TxnResult",
    "WatchEvent",
    "read_then_watch",
]
