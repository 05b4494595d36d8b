"""libnftables in process: the dead-man switch refreshes a set every heartbeat, and
spawning `nft` for that costs ~5 ms of a core each time (20 times a second).

The context's netlink socket is opened when the context is created, so creating it
inside a namespace (on a throwaway thread, halb.net.netns.in_netns) binds every later
command to that namespace, whichever thread runs it.
"""

from __future__ import annotations

import ctypes
import threading

from halb.dataplane.nft.netns import in_netns
from halb.dataplane.nft.nftcmd import NftError

__all__ = ["Nft"]

_LIB: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        try:
            lib = ctypes.CDLL("libnftables.so.1")
        except OSError as exc:
            raise NftError("libnftables", f"{exc} (Debian package libnftables1)") from exc
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.restype = ctypes.c_int
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.restype = ctypes.c_int
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        _LIB = lib
    return _LIB


class Nft:
    """One libnftables context; ``run`` applies a script as one transaction."""

    def __init__(self, netns: str | None = None) -> None:
        lib = _lib()
        self._lib = lib
        ctx = in_netns(netns, lambda: lib.nft_ctx_new(0))
        if not ctx:
            raise NftError("libnftables", "nft_ctx_new failed")
        self._ctx: int | None = ctx
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        self._lock = threading.Lock()

    def run(self, script: str) -> None:
        with self._lock:
            if self._ctx is None:
                raise NftError("libnftables", "context closed")
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
            if rc != 0:
                err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
                raise NftError("nft script refused", err.decode(errors="replace"))

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None
