"""Pure: kernel module metadata without kmod.

The host has no modinfo/depmod, and the Debian kernel package ships no modules.dep
(its postinst generates it). A module's dependencies are in its ``.modinfo`` ELF
section as ``depends=a,b``; reading that is enough to order ``insmod`` calls.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

__all__ = ["ModuleError", "load_order", "modinfo", "module_name", "requires"]


class ModuleError(ValueError):
    pass


def module_name(filename: str) -> str:
    """``ip_vs_rr.ko`` -> ``ip_vs_rr``; the kernel treats '-' and '_' alike."""
    base = filename.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def _section(elf: bytes, wanted: bytes) -> bytes:
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ModuleError("not a little-endian ELF64 object")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize
        )
        return name, offset, size

    _, str_off, str_size = header(shstrndx)
    names = elf[str_off : str_off + str_size]
    for i in range(shnum):
        name_at, offset, size = header(i)
        end = names.index(b"\0", name_at)
        if names[name_at:end] == wanted:
            return elf[offset : offset + size]
    raise ModuleError(f"no {wanted.decode()} section")


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """Every key=value of the .modinfo section; keys may repeat (alias, parm...)."""
    out: dict[str, list[str]] = {}
    for item in _section(elf, b".modinfo").split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            out.setdefault(key, []).append(value)
    return out


def requires(info: dict[str, list[str]]) -> list[str]:
    """What must be loaded first: ``depends=`` (symbols) and the ``pre:`` soft
    dependencies (e.g. libcrc32c needs the crc32c algorithm, named by alias)."""
    out = [d for item in info.get("depends", []) for d in item.split(",") if d]
    for soft in info.get("softdep", []):
        words = soft.split()
        pre = False
        for word in words:
            if word.endswith(":"):
                pre = word == "pre:"
            elif pre:
                out.append(word)
    return out


def load_order(wanted: Iterable[str], depends: Callable[[str], list[str]]) -> list[str]:
    """Module names in an order insmod accepts: every dependency before its users.

    ``depends(name)`` returns a module's direct dependencies (raise ModuleError for an
    unknown module)."""
    order: list[str] = []
    state: dict[str, bool] = {}  # False: being visited, True: done

    def visit(name: str, path: tuple[str, ...]) -> None:
        done = state.get(name)
        if done:
            return
        if done is False:
            raise ModuleError(f"dependency cycle: {' -> '.join((*path, name))}")
        state[name] = False
        for dep in depends(name):
            visit(dep, (*path, name))
        state[name] = True
        order.append(name)

    for name in wanted:
        visit(module_name(name), ())
    return order
