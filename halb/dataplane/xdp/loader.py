"""Load the XDP object, attach / detach it, pin its maps, and access maps by fd.

Thin over libbpf (ctypes); the map access is typed with the ctypes structures of
halb.dataplane.xdp.layout. Pinned maps live on a bpffs that halb mounts itself when
needed (``ip netns exec`` remounts /sys and hides /sys/fs/bpf).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from halb.dataplane.xdp import libbpf as lb
from halb.dataplane.xdp.layout import MAP_TYPES, RINGBUF_MAPS
from halb.dataplane.xdp.netns import in_netns

__all__ = [
    "DEFAULT_BPFFS",
    "BpfMap",
    "BpfObject",
    "TestRunResult",
    "ensure_bpffs",
    "open_pinned_maps",
    "xdp_prog_id",
]

log = logging.getLogger(__name__)

DEFAULT_BPFFS = Path("/run/halb/bpffs")
XdpMode = Literal["native", "generic"]
_BATCH = 4096


def _roundup8(n: int) -> int:
    return (n + 7) & ~7


class BpfMap:
    """One map by fd. Per-CPU values are read and written as a list, one per CPU."""

    def __init__(
        self,
        fd: int,
        name: str,
        key_type: Any,
        value_type: Any,
        max_entries: int,
        percpu: bool = False,
        owns_fd: bool = False,
    ) -> None:
        self.fd = fd
        self.name = name
        self.key_type = key_type
        self.value_type = value_type
        self.max_entries = max_entries
        self.percpu = percpu
        self.ncpus = lb.lib.libbpf_num_possible_cpus() if percpu else 1
        self._stride = _roundup8(ctypes.sizeof(value_type)) if percpu else 0
        self._owns_fd = owns_fd

    # -- buffers ------------------------------------------------------------------------

    def _value_buf(self) -> ctypes.Array[ctypes.c_char]:
        size = self._stride * self.ncpus if self.percpu else ctypes.sizeof(self.value_type)
        return ctypes.create_string_buffer(size)

    def _decode(self, raw: bytes) -> Any:
        if not self.percpu:
            return self.value_type.from_buffer_copy(raw)
        return [self.value_type.from_buffer_copy(raw, i * self._stride) for i in range(self.ncpus)]

    def _encode(self, value: Any) -> bytes:
        if not self.percpu:
            return bytes(value)
        values = value if isinstance(value, list) else [value] * self.ncpus
        return b"".join(bytes(v).ljust(self._stride, b"\0") for v in values)

    # -- single elements ---------------------------------------------------------------

    def lookup(self, key: Any) -> Any | None:
        k = self.key_type(key) if isinstance(key, int) else key
        buf = self._value_buf()
        ret = lb.lib.bpf_map_lookup_elem(self.fd, ctypes.byref(k), buf)
        if ret == -2:  # ENOENT
            return None
        lb.check(ret, f"lookup in {self.name}")
        return self._decode(buf.raw)

    def update(self, key: Any, value: Any, flags: int = lb.BPF_ANY) -> None:
        k = self.key_type(key) if isinstance(key, int) else key
        v = self.value_type(value) if isinstance(value, int) else value
        raw = self._encode(v)
        lb.check(
            lb.lib.bpf_map_update_elem(self.fd, ctypes.byref(k), raw, flags), f"update {self.name}"
        )

    def delete(self, key: Any) -> bool:
        k = self.key_type(key) if isinstance(key, int) else key
        ret = lb.lib.bpf_map_delete_elem(self.fd, ctypes.byref(k))
        if ret == -2:
            return False
        lb.check(ret, f"delete from {self.name}")
        return True

    def keys(self) -> Iterator[Any]:
        prev: Any = None
        nxt = self.key_type()
        while True:
            ret = lb.lib.bpf_map_get_next_key(
                self.fd, None if prev is None else ctypes.byref(prev), ctypes.byref(nxt)
            )
            if ret == -2:
                return
            lb.check(ret, f"next key of {self.name}")
            yield self.key_type.from_buffer_copy(nxt)
            prev = self.key_type.from_buffer_copy(nxt)

    # -- batches -------------------------------------------------------------------------

    def update_batch(self, keys: Sequence[Any], values: Sequence[Any]) -> int:
        """Write all pairs in as few syscalls as the kernel allows; returns the count."""
        if len(keys) != len(values):
            raise ValueError("keys and values differ in length")
        opts = lb.BpfMapBatchOpts(sz=ctypes.sizeof(lb.BpfMapBatchOpts))
        done = 0
        for start in range(0, len(keys), _BATCH):
            ks = keys[start : start + _BATCH]
            vs = values[start : start + _BATCH]
            kbuf = b"".join(bytes(self.key_type(k) if isinstance(k, int) else k) for k in ks)
            vbuf = b"".join(
                self._encode(self.value_type(v) if isinstance(v, int) else v) for v in vs
            )
            count = ctypes.c_uint32(len(ks))
            ret = lb.lib.bpf_map_update_batch(
                self.fd, kbuf, vbuf, ctypes.byref(count), ctypes.byref(opts)
            )
            lb.check(ret, f"batch update of {self.name}")
            done += count.value
        return done

    def delete_batch(self, keys: Sequence[Any]) -> int:
        """Delete the keys that exist; returns how many were deleted."""
        deleted = 0
        # The kernel stops a batch at the first missing key, so go one by one after it.
        for k in keys:
            if self.delete(k):
                deleted += 1
        return deleted

    def raw_batches(self, chunk: int = _BATCH) -> Iterator[tuple[bytes, bytes, int]]:
        """(keys, values, n) of each batch lookup from the first entry to the last, as
        raw bytes: per-CPU values are ``ncpus`` slots of the value's stride each."""
        ksize = ctypes.sizeof(self.key_type)
        vsize = self._stride * self.ncpus if self.percpu else ctypes.sizeof(self.value_type)
        chunk = min(max(self.max_entries, 1), chunk)
        kbuf = ctypes.create_string_buffer(ksize * chunk)
        vbuf = ctypes.create_string_buffer(vsize * chunk)
        # A token names the last key already read; NULL starts from the first.
        token_in = ctypes.create_string_buffer(max(ksize, 8))
        token_out = ctypes.create_string_buffer(max(ksize, 8))
        opts = lb.BpfMapBatchOpts(sz=ctypes.sizeof(lb.BpfMapBatchOpts))
        first = True
        while True:
            count = ctypes.c_uint32(chunk)
            ret = lb.lib.bpf_map_lookup_batch(
                self.fd,
                None if first else token_in,
                token_out,
                kbuf,
                vbuf,
                ctypes.byref(count),
                ctypes.byref(opts),
            )
            if ret < 0 and ret != -2:  # -ENOENT: this was the last batch
                lb.check(ret, f"batch lookup of {self.name}")
            n = count.value
            yield ctypes.string_at(kbuf, n * ksize), ctypes.string_at(vbuf, n * vsize), n
            if ret == -2 or n == 0:
                return
            ctypes.memmove(token_in, token_out, len(token_out.raw))
            first = False

    def items(self) -> Iterator[tuple[Any, Any]]:
        """Every (key, value), by batch lookup; hash-map iteration order."""
        ksize = ctypes.sizeof(self.key_type)
        vsize = self._stride * self.ncpus if self.percpu else ctypes.sizeof(self.value_type)
        for raw_k, raw_v, n in self.raw_batches():
            for i in range(n):
                key = self.key_type.from_buffer_copy(raw_k, i * ksize)
                yield key, self._decode(raw_v[i * vsize : (i + 1) * vsize])

    def read_array(self, start: int, count: int) -> bytes:
        """Raw values of array-map entries start .. start+count-1 (batched, no decoding):
        for reading a service's ring region without one Python object per slot."""
        if self.percpu:
            raise ValueError("read_array is for plain array maps")
        vsize = ctypes.sizeof(self.value_type)
        chunk = min(max(count, 1), _BATCH * 4)
        kbuf = ctypes.create_string_buffer(4 * chunk)
        vbuf = ctypes.create_string_buffer(vsize * chunk)
        # The kernel resumes a batch *after* the key in in_batch (map_get_next_key), so
        # to start at `start` pass start - 1, or no token at all for index 0.
        token_in = ctypes.c_uint32(max(start - 1, 0))
        token_out = ctypes.c_uint32(0)
        first = start > 0
        opts = lb.BpfMapBatchOpts(sz=ctypes.sizeof(lb.BpfMapBatchOpts))
        parts: list[bytes] = []
        left = count
        while left > 0:
            n = ctypes.c_uint32(min(chunk, left))
            ret = lb.lib.bpf_map_lookup_batch(
                self.fd,
                ctypes.byref(token_in) if first else None,
                ctypes.byref(token_out),
                kbuf,
                vbuf,
                ctypes.byref(n),
                ctypes.byref(opts),
            )
            if ret < 0 and ret != -2:
                lb.check(ret, f"batch lookup of {self.name}")
            parts.append(vbuf.raw[: n.value * vsize])
            left -= n.value
            if ret == -2 or n.value == 0:
                break
            token_in.value = token_out.value
            first = True
        return b"".join(parts)

    def close(self) -> None:
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True, slots=True)
class TestRunResult:
    retval: int
    data: bytes
    duration_ns: int


def _mountpoint_fstype(path: Path) -> tuple[str, str]:
    """(mount point, fs type) of the mount that holds path."""
    best = ("/", "")
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mnt = left.split()[4].replace("\\040", " ")
            fstype = right.split()[0]
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best[0]):
                best = (mnt, fstype)
    return best


def ensure_bpffs(pin_dir: Path) -> Path:
    """Make ``pin_dir`` a directory on a bpffs, mounting one at DEFAULT_BPFFS or at
    ``pin_dir`` itself when no bpffs holds it yet."""
    pin_dir = pin_dir.resolve()
    _, fstype = _mountpoint_fstype(pin_dir)
    if fstype != "bpf":
        mount_at = DEFAULT_BPFFS if pin_dir.is_relative_to(DEFAULT_BPFFS) else pin_dir
        mount_at.mkdir(parents=True, exist_ok=True)
        if _mountpoint_fstype(mount_at)[1] != "bpf":
            log.info("mounting a bpffs at %s", mount_at)
            subprocess.run(["mount", "-t", "bpf", "bpffs", str(mount_at)], check=True)
    pin_dir.mkdir(parents=True, exist_ok=True)
    return pin_dir


def _prog_id(fd: int) -> int:
    info = lb.BpfProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    lb.check(lb.lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "prog info")
    return int(info.id)


def xdp_prog_id(ifname: str, netns: str | None = None) -> int:
    """Id of the XDP program attached to ifname (0 if none), in any mode."""

    def query() -> int:
        pid = ctypes.c_uint32(0)
        lb.check(
            lb.lib.bpf_xdp_query_id(socket.if_nametoindex(ifname), 0, ctypes.byref(pid)),
            f"query XDP on {ifname}",
        )
        return int(pid.value)

    return in_netns(netns, query)


class BpfObject:
    """A loaded BPF object: its programs and typed maps. Close it to release the fds.

    ``map_types`` names the maps to type (default: the XDP object's); other objects (the
    PROXY protocol programs) pass their own layout's table."""

    def __init__(
        self,
        path: Path,
        map_types: Mapping[str, tuple[Any, Any, bool]] = MAP_TYPES,
    ) -> None:
        self.path = path
        obj = lb.lib.bpf_object__open_file(str(path).encode(), None)
        if not obj:
            err = ctypes.get_errno() or 22
            raise lb.LibbpfError(err, f"open {path}: {os.strerror(err)}")
        self._obj: int | None = obj
        lb.check(lb.lib.bpf_object__load(obj), f"load {path} (see the verifier log above)")
        self.maps: dict[str, BpfMap] = {}
        self.ring_fds: dict[str, int] = {}  # ring buffer maps (RINGBUF_MAPS) by name
        m = lb.lib.bpf_object__next_map(obj, None)
        while m:
            name = lb.lib.bpf_map__name(m).decode()
            if name in RINGBUF_MAPS:
                self.ring_fds[name] = int(lb.lib.bpf_map__fd(m))
            if name in map_types:
                key_t, val_t, percpu = map_types[name]
                self.maps[name] = BpfMap(
                    lb.lib.bpf_map__fd(m),
                    name,
                    key_t,
                    val_t,
                    lb.lib.bpf_map__max_entries(m),
                    percpu,
                )
            m = lb.lib.bpf_object__next_map(obj, m)
        # (ifindex, ifname, netns, XDP flags) and our program id while attached
        self._attached: tuple[int, str, str | None, int] | None = None
        self._attached_prog_id = 0
        self.pinned: list[Path] = []

    def prog_fd(self, name: str) -> int:
        if self._obj is None:
            raise ValueError("object is closed")
        prog = lb.lib.bpf_object__find_program_by_name(self._obj, name.encode())
        if not prog:
            raise KeyError(f"no program {name!r} in {self.path}")
        return int(lb.lib.bpf_program__fd(prog))

    def test_run(
        self, prog: str, frame: bytes, repeat: int = 1, ctx: bytes | None = None
    ) -> TestRunResult:
        """BPF_PROG_TEST_RUN: the verdict, the frame as the program left it, ns/run.
        ``ctx`` is the program's context in (for SCHED_CLS a ``struct __sk_buff``)."""
        out = ctypes.create_string_buffer(len(frame) + 512)
        data_in = ctypes.create_string_buffer(frame, len(frame))
        ctx_in = None if ctx is None else ctypes.create_string_buffer(ctx, len(ctx))
        opts = lb.BpfTestRunOpts(
            sz=ctypes.sizeof(lb.BpfTestRunOpts),
            data_in=ctypes.cast(data_in, ctypes.c_void_p),
            data_out=ctypes.cast(out, ctypes.c_void_p),
            data_size_in=len(frame),
            data_size_out=len(out),
            ctx_in=None if ctx_in is None else ctypes.cast(ctx_in, ctypes.c_void_p),
            ctx_size_in=0 if ctx is None else len(ctx),
            repeat=repeat,
        )
        lb.check(lb.lib.bpf_prog_test_run_opts(self.prog_fd(prog), ctypes.byref(opts)), "test run")
        return TestRunResult(int(opts.retval), out.raw[: opts.data_size_out], int(opts.duration))

    # -- XDP attachment ------------------------------------------------------------------

    def attach(
        self, prog: str, ifname: str, mode: XdpMode = "native", netns: str | None = None
    ) -> str:
        """Attach to ifname; native falls back to generic (logged). Returns the mode used."""
        fd = self.prog_fd(prog)

        def do() -> tuple[int, str, int]:
            ifindex = socket.if_nametoindex(ifname)
            if mode == "native":
                ret = lb.lib.bpf_xdp_attach(ifindex, fd, lb.XDP_FLAGS_DRV_MODE, None)
                if ret == 0:
                    return ifindex, "native", lb.XDP_FLAGS_DRV_MODE
                log.warning(
                    "native XDP on %s failed (%s); falling back to generic",
                    ifname,
                    os.strerror(-ret),
                )
            ret = lb.lib.bpf_xdp_attach(ifindex, fd, lb.XDP_FLAGS_SKB_MODE, None)
            lb.check(ret, f"attach XDP (generic) to {ifname}")
            return ifindex, "generic", lb.XDP_FLAGS_SKB_MODE

        ifindex, used, flags = in_netns(netns, do)
        self._attached = (ifindex, ifname, netns, flags)
        self._attached_prog_id = _prog_id(fd)
        return used

    def detach(self) -> None:
        """Detach our program, and only ours (a newer instance may have replaced it)."""
        if self._attached is None:
            return
        _, ifname, netns, flags = self._attached

        def do() -> None:
            pid = ctypes.c_uint32(0)
            try:
                idx = socket.if_nametoindex(ifname)
            except OSError:
                return  # the interface is gone, and the attachment with it
            ret = lb.lib.bpf_xdp_query_id(idx, flags, ctypes.byref(pid))
            if ret == 0 and pid.value == self._attached_prog_id:
                lb.check(lb.lib.bpf_xdp_detach(idx, flags, None), f"detach XDP from {ifname}")

        in_netns(netns, do)
        self._attached = None

    # -- pinning ---------------------------------------------------------------------------

    def pin_maps(self, pin_dir: Path) -> None:
        pin_dir = ensure_bpffs(pin_dir)
        for name, m in self.maps.items():
            path = pin_dir / name
            path.unlink(missing_ok=True)  # a stale pin of a dead instance
            lb.check(lb.lib.bpf_obj_pin(m.fd, str(path).encode()), f"pin {path}")
            self.pinned.append(path)

    def unpin_maps(self) -> None:
        for path in self.pinned:
            path.unlink(missing_ok=True)
        dirs = {p.parent for p in self.pinned}
        self.pinned.clear()
        for d in dirs:
            with contextlib.suppress(OSError):  # not empty: someone else's pins
                d.rmdir()

    def close(self) -> None:
        if self._obj is not None:
            lb.lib.bpf_object__close(self._obj)
            self._obj = None
            self.maps.clear()
            self.ring_fds.clear()


def open_pinned_maps(pin_dir: Path) -> dict[str, BpfMap]:
    """The maps an adapter pinned in pin_dir, typed; the caller closes them."""
    out: dict[str, BpfMap] = {}
    for name, (key_t, val_t, percpu) in MAP_TYPES.items():
        path = pin_dir / name
        if not path.exists():
            continue
        fd = lb.check(lb.lib.bpf_obj_get(str(path).encode()), f"open {path}")
        info = lb.BpfMapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        lb.check(
            lb.lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info"
        )
        out[name] = BpfMap(fd, name, key_t, val_t, int(info.max_entries), percpu, owns_fd=True)
    return out
