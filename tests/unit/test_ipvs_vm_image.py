"""The VM image builder's pure parts: newc cpio, module metadata and load order."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from halb.testing.vm.cpio import directory, regular, symlink, write_newc
from halb.testing.vm.kmod import ModuleError, load_order, modinfo, module_name, requires
from halb.testing.vm.results import GuestResults


def read_newc(data: bytes) -> list[tuple[str, int, bytes]]:
    out = []
    at = 0
    while True:
        assert data[at : at + 6] == b"070701"
        fields = [int(data[at + 6 + 8 * i : at + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        at += 110
        name = data[at : at + namesize - 1].decode()
        at = (at + namesize + 3) & ~3
        body = data[at : at + size]
        at = (at + size + 3) & ~3
        if name == "TRAILER!!!":
            assert at == len(data)
            return out
        out.append((name, mode, body))


def test_newc_roundtrip_with_padding() -> None:
    entries = [directory("bin"), regular("bin/x", b"abcde", 0o755), symlink("bin/sh", "x")]
    parsed = read_newc(write_newc(entries))
    assert [(n, oct(m)) for n, m, _ in parsed] == [
        ("bin", "0o40755"),
        ("bin/x", "0o100755"),
        ("bin/sh", "0o120777"),
    ]
    assert parsed[1][2] == b"abcde" and parsed[2][2] == b"x"


def elf_with_modinfo(info: bytes) -> bytes:
    """A minimal ELF64 with sections: null, .shstrtab, .modinfo."""
    shstr = b"\0.shstrtab\0.modinfo\0"
    body = shstr + info
    shoff = 64 + len(body)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 1)

    def sh(name: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, 1, 0, 0, offset, size, 0, 0, 1, 0)

    return (
        bytes(header)
        + body
        + sh(0, 0, 0)
        + sh(1, 64, len(shstr))
        + sh(11, 64 + len(shstr), len(info))
    )


def test_modinfo_reads_depends_and_soft_dependencies() -> None:
    info = modinfo(elf_with_modinfo(b"name=libcrc32c\0depends=a,b-c\0softdep=pre: crc32c\0"))
    assert info["name"] == ["libcrc32c"]
    assert [module_name(m) for m in requires(info)] == ["a", "b_c", "crc32c"]


def test_modinfo_rejects_non_elf() -> None:
    with pytest.raises(ModuleError):
        modinfo(b"not an elf file at all" * 4)


def test_load_order_puts_dependencies_first_once() -> None:
    deps = {"ip_vs_rr": ["ip_vs"], "ip_vs": ["nf_conntrack"], "nf_conntrack": [], "ipip": []}
    assert load_order(["ip_vs_rr", "ipip", "ip_vs"], deps.__getitem__) == [
        "nf_conntrack",
        "ip_vs",
        "ip_vs_rr",
        "ipip",
    ]


def test_load_order_reports_cycles() -> None:
    with pytest.raises(ModuleError, match="cycle"):
        load_order(["a"], {"a": ["b"], "b": ["a"]}.__getitem__)


def test_module_name_normalises() -> None:
    assert module_name("kernel/net/9p/9pnet-virtio.ko") == "9pnet_virtio"


def test_guest_results_match_parametrized_ids(tmp_path: Path) -> None:
    (tmp_path / "reports.jsonl").write_text(
        '{"nodeid": "t.py::test_a[x]", "outcome": "passed", "when": "call"}\n'
        '{"nodeid": "t.py::test_a[x]", "outcome": "error", "when": "teardown"}\n'
        '{"nodeid": "t.py::test_ab", "outcome": "passed", "when": "call"}\n'
    )
    results = GuestResults.read(tmp_path)
    assert list(results.matching("t.py::test_a")) == ["t.py::test_a[x]"]
    assert results.matching("t.py::test_a")["t.py::test_a[x]"]["outcome"] == "error"
