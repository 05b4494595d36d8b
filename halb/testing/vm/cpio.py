"""Pure: an initramfs archive in the kernel's "newc" cpio format.

The host has no cpio(1); the format is small (a 110-byte ASCII header per entry, name
and data each padded to 4 bytes, a ``TRAILER!!!`` entry), so it is written here.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

__all__ = ["CpioEntry", "directory", "regular", "symlink", "write_newc"]

_MAGIC = b"070701"


@dataclass(frozen=True, slots=True)
class CpioEntry:
    name: str  # relative path inside the archive, no leading "/"
    mode: int  # file type bits and permissions, as in st_mode
    data: bytes = b""


def directory(name: str, perm: int = 0o755) -> CpioEntry:
    return CpioEntry(name, stat.S_IFDIR | perm)


def regular(name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
    return CpioEntry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> CpioEntry:
    return CpioEntry(name, stat.S_IFLNK | 0o777, target.encode())


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, mode: int, nlink: int, size: int, namesize: int) -> bytes:
    # Fields: ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor
    # rdevminor namesize check; mtime 0 keeps the archive reproducible.
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, namesize, 0)
    return _MAGIC + b"".join(b"%08X" % f for f in fields)


def write_newc(entries: list[CpioEntry]) -> bytes:
    """The archive bytes; parents must come before their children (the kernel does not
    create missing directories)."""
    out = bytearray()
    for ino, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = entry.name.lstrip("/").encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        head = _header(
            0 if entry.name == "TRAILER!!!" else ino, entry.mode, nlink, len(entry.data), len(name)
        )
        out += head + name
        out += _pad(len(head) + len(name))
        out += entry.data + _pad(len(entry.data))
    return bytes(out)
