"""Value types of the etcd client and their protobuf conversions.

Callers build transactions from :class:`Compare` and the op classes and read results
as these frozen types; only the client touches protobuf messages.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Compare",
    "Delete",
    "DeleteResult",
    "EventKind",
    "Get",
    "KeyValue",
    "LeaseInfo",
    "Op",
    "OpResult",
    "Put",
    "PutResult",
    "RangeResult",
    "TxnResult",
    "WatchEvent",
    "prefix_end",
]


def prefix_end(prefix: bytes) -> bytes:
    """The range end that makes ``[prefix, end)`` every key starting with ``prefix``."""
    data = bytearray(prefix)
    while data:
        if data[-1] < 0xFF:
            data[-1] += 1
            return bytes(data)
        data.pop()
    return b"\0"  # all keys


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def of(cls, kv: Any) -> KeyValue:
        return cls(
            bytes(kv.key),
            bytes(kv.value),
            int(kv.create_revision),
            int(kv.mod_revision),
            int(kv.version),
            int(kv.lease),
        )


@dataclass(frozen=True, slots=True)
class RangeResult:
    revision: int  # the store's revision when read (also when nothing matched)
    kvs: tuple[KeyValue, ...]

    def __iter__(self) -> Any:
        return iter(self.kvs)

    def __len__(self) -> int:
        return len(self.kvs)

    def first(self) -> KeyValue | None:
        return self.kvs[0] if self.kvs else None

    @classmethod
    def of(cls, resp: Any) -> RangeResult:
        return cls(int(resp.header.revision), tuple(KeyValue.of(kv) for kv in resp.kvs))


@dataclass(frozen=True, slots=True)
class PutResult:
    revision: int


@dataclass(frozen=True, slots=True)
class DeleteResult:
    revision: int
    deleted: int


OpResult = RangeResult | PutResult | DeleteResult


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: tuple[OpResult, ...]


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    id: int
    ttl: int  # seconds left; -1 when the lease does not exist
    granted_ttl: int


class EventKind(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: EventKind
    kv: KeyValue  # for a DELETE: key and mod_revision (the deletion's revision)

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


_TARGETS = {"version": 0, "create": 1, "mod": 2, "value": 3, "lease": 4}
_RESULTS = {"==": 0, ">": 1, "<": 2, "!=": 3}
Target = Literal["version", "create", "mod", "value", "lease"]
Result = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True, slots=True)
class Compare:
    """``target(key) <result> value``; e.g. ``Compare.create(k) == 0`` is "absent"."""

    key: bytes
    target: Target
    result: Result = "=="
    value: int | bytes = 0

    @classmethod
    def create(cls, key: bytes, result: Result = "==", value: int = 0) -> Compare:
        return cls(key, "create", result, value)

    @classmethod
    def lease(cls, key: bytes, result: Result = "==", value: int = 0) -> Compare:
        return cls(key, "lease", result, value)

    @classmethod
    def mod(cls, key: bytes, result: Result = "==", value: int = 0) -> Compare:
        return cls(key, "mod", result, value)

    def to_pb(self, rpc: Any) -> Any:
        msg = rpc.Compare(key=self.key, target=_TARGETS[self.target], result=_RESULTS[self.result])
        if self.target == "value":
            if not isinstance(self.value, bytes):
                raise TypeError(f"value compare of {self.key!r} needs bytes")
            msg.value = self.value
        else:
            if not isinstance(self.value, int):
                raise TypeError(f"{self.target} compare of {self.key!r} needs an int")
            setattr(
                msg,
                {"create": "create_revision", "mod": "mod_revision"}.get(self.target, self.target),
                self.value,
            )
        return msg


@dataclass(frozen=True, slots=True)
class Get:
    key: bytes
    prefix: bool = False

    def request(self, rpc: Any) -> Any:
        return rpc.RangeRequest(
            key=self.key, range_end=prefix_end(self.key) if self.prefix else b""
        )


@dataclass(frozen=True, slots=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0

    def request(self, rpc: Any) -> Any:
        return rpc.PutRequest(key=self.key, value=self.value, lease=self.lease)


@dataclass(frozen=True, slots=True)
class Delete:
    key: bytes
    prefix: bool = False

    def request(self, rpc: Any) -> Any:
        return rpc.DeleteRangeRequest(
            key=self.key, range_end=prefix_end(self.key) if self.prefix else b""
        )


Op = Get | Put | Delete


def op_to_pb(op: Op, rpc: Any) -> Any:
    req = op.request(rpc)
    if isinstance(op, Get):
        return rpc.RequestOp(request_range=req)
    if isinstance(op, Put):
        return rpc.RequestOp(request_put=req)
    return rpc.RequestOp(request_delete_range=req)


def op_result(resp: Any) -> OpResult:
    which = resp.WhichOneof("response")
    if which == "response_range":
        return RangeResult.of(resp.response_range)
    if which == "response_put":
        return PutResult(int(resp.response_put.header.revision))
    if which == "response_delete_range":
        r = resp.response_delete_range
        return DeleteResult(int(r.header.revision), int(r.deleted))
    raise ValueError(f"unexpected txn response {which!r}")
