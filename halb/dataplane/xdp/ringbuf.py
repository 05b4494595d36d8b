"""A BPF ring buffer map read through libbpf's ring_buffer (ctypes), for asyncio.

libbpf calls a C callback per record during ``ring_buffer__consume``; here that callback
only copies the record's bytes (a Python callback costs ~1.5 µs, so it must do no
more), and ``consume()`` hands back all of them at once for a vectorised conversion.
``epoll_fd()`` becomes readable when records are waiting (level-triggered: the map fd
polls readable while it holds unread data), for ``loop.add_reader``.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from halb.dataplane.xdp import libbpf as lb

__all__ = ["RingBuffer"]


class RingBuffer:
    """One ring buffer map (by fd, which must stay open while this lives) whose
    records are all ``record_size`` bytes; records of another size are counted in
    ``malformed`` and dropped."""

    def __init__(self, map_fd: int, record_size: int) -> None:
        self.record_size = record_size
        self.malformed = 0
        self._chunks: list[bytes] = []
        append = self._chunks.append
        string_at = ctypes.string_at

        def sample(_ctx: Any, data: Any, size: int) -> int:
            if size == record_size:
                append(string_at(data, size))
            else:
                self.malformed += 1
            return 0

        # Kept referenced: libbpf holds the raw function pointer.
        self._callback = lb.RingBufferSampleFn(sample)
        rb = lb.lib.ring_buffer__new(map_fd, self._callback, None, None)
        if not rb:
            err = ctypes.get_errno() or 22
            raise lb.LibbpfError(err, f"ring_buffer__new: {os.strerror(err)}")
        self._rb: int | None = rb

    def epoll_fd(self) -> int:
        if self._rb is None:
            raise ValueError("ring buffer is closed")
        return lb.check(lb.lib.ring_buffer__epoll_fd(self._rb), "ring_buffer__epoll_fd")

    def consume(self) -> bytes:
        """Every record waiting, concatenated (len is a multiple of record_size)."""
        if self._rb is None:
            raise ValueError("ring buffer is closed")
        lb.check(lb.lib.ring_buffer__consume(self._rb), "ring_buffer__consume")
        out = b"".join(self._chunks)
        self._chunks.clear()
        return out

    def close(self) -> None:
        if self._rb is not None:
            lb.lib.ring_buffer__free(self._rb)
            self._rb = None
