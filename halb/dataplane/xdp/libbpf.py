"""Raw ctypes bindings to libbpf.so.1 (1.x: functions return -errno) and to setns(2).

Only what halb uses. Callers go through halb.dataplane.xdp.loader; this module knows
nothing about halb's maps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_NOEXIST",
    "XDP_FLAGS_DRV_MODE",
    "XDP_FLAGS_SKB_MODE",
    "BpfMapBatchOpts",
    "BpfMapInfo",
    "BpfProgInfo",
    "BpfTcHook",
    "BpfTcOpts",
    "BpfTestRunOpts",
    "LibbpfError",
    "RingBufferSampleFn",
    "check",
    "lib",
    "libc",
]

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2


class LibbpfError(OSError):
    pass


def check(ret: int, what: str) -> int:
    """Raise LibbpfError for a negative (-errno) return; pass the value through."""
    if ret < 0:
        raise LibbpfError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


class BpfTestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class BpfMapBatchOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class BpfMapInfo(ctypes.Structure):
    """Leading fields of struct bpf_map_info (the kernel fills what fits)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class BpfProgInfo(ctypes.Structure):
    """Leading fields of struct bpf_prog_info."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32)]


class BpfTcHook(ctypes.Structure):
    """struct bpf_tc_hook (libbpf.h): a clsact hook point of an interface."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("ifindex", ctypes.c_int),
        ("attach_point", ctypes.c_int),  # BPF_TC_INGRESS 1, BPF_TC_EGRESS 2
        ("parent", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class BpfTcOpts(ctypes.Structure):
    """struct bpf_tc_opts (libbpf.h): one cls_bpf filter on a hook."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("prog_fd", ctypes.c_int),
        ("flags", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("handle", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size): libbpf calls it for
# each record during ring_buffer__consume/__poll; a non-zero return stops the call.
RingBufferSampleFn = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t
)

_P = ctypes.c_void_p
_I = ctypes.c_int
_U32 = ctypes.c_uint32
_S = ctypes.c_char_p

_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "bpf_object__open_file": (_P, [_S, _P]),
    "bpf_object__load": (_I, [_P]),
    "bpf_object__close": (None, [_P]),
    "bpf_object__find_program_by_name": (_P, [_P, _S]),
    "bpf_object__find_map_by_name": (_P, [_P, _S]),
    "bpf_object__next_map": (_P, [_P, _P]),
    "bpf_program__fd": (_I, [_P]),
    "bpf_map__fd": (_I, [_P]),
    "bpf_map__name": (_S, [_P]),
    "bpf_map__max_entries": (_U32, [_P]),
    "bpf_map__set_max_entries": (_I, [_P, _U32]),
    "bpf_map_update_elem": (_I, [_I, _P, _P, ctypes.c_uint64]),
    "bpf_map_lookup_elem": (_I, [_I, _P, _P]),
    "bpf_map_delete_elem": (_I, [_I, _P]),
    "bpf_map_get_next_key": (_I, [_I, _P, _P]),
    "bpf_map_update_batch": (_I, [_I, _P, _P, ctypes.POINTER(_U32), _P]),
    "bpf_map_lookup_batch": (_I, [_I, _P, _P, _P, _P, ctypes.POINTER(_U32), _P]),
    "bpf_map_delete_batch": (_I, [_I, _P, ctypes.POINTER(_U32), _P]),
    "bpf_obj_pin": (_I, [_I, _S]),
    "bpf_obj_get": (_I, [_S]),
    "bpf_obj_get_info_by_fd": (_I, [_I, _P, ctypes.POINTER(_U32)]),
    "bpf_prog_test_run_opts": (_I, [_I, ctypes.POINTER(BpfTestRunOpts)]),
    "bpf_xdp_attach": (_I, [_I, _I, _U32, _P]),
    "bpf_xdp_detach": (_I, [_I, _U32, _P]),
    "bpf_xdp_query_id": (_I, [_I, _I, ctypes.POINTER(_U32)]),
    "libbpf_num_possible_cpus": (_I, []),
    "bpf_tc_hook_create": (_I, [ctypes.POINTER(BpfTcHook)]),
    "bpf_tc_hook_destroy": (_I, [ctypes.POINTER(BpfTcHook)]),
    "bpf_tc_attach": (_I, [ctypes.POINTER(BpfTcHook), ctypes.POINTER(BpfTcOpts)]),
    "bpf_tc_detach": (_I, [ctypes.POINTER(BpfTcHook), ctypes.POINTER(BpfTcOpts)]),
    "bpf_tc_query": (_I, [ctypes.POINTER(BpfTcHook), ctypes.POINTER(BpfTcOpts)]),
    # struct ring_buffer *ring_buffer__new(int map_fd, ring_buffer_sample_fn sample_cb,
    #     void *ctx, const struct ring_buffer_opts *opts): NULL and errno on failure.
    "ring_buffer__new": (_P, [_I, RingBufferSampleFn, _P, _P]),
    # int ring_buffer__consume(struct ring_buffer *rb): records consumed, or -errno.
    "ring_buffer__consume": (_I, [_P]),
    "ring_buffer__poll": (_I, [_P, _I]),
    "ring_buffer__epoll_fd": (_I, [_P]),
    "ring_buffer__free": (None, [_P]),
}


def _load() -> ctypes.CDLL:
    try:
        handle = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as exc:
        raise LibbpfError(
            2, f"libbpf.so.1 not found ({exc}): run scripts/setup or apt-get install libbpf1"
        ) from None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(handle, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return handle


lib = _load()

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
libc.setns.restype = ctypes.c_int
