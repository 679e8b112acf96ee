"""The relocatable table set: place() at any base, and QEMU's fw_cfg table-loader form executed the way SeaBIOS
does (src/fw/romfile_loader.c), both giving valid tables."""

from __future__ import annotations

import struct

import pytest

from kvmcore import layout
from kvmcore.acpi import AcpiLinkError, AcpiPlacementError, AcpiPlatform, build_tables
from kvmcore.acpi import linker as lk
from kvmcore.acpi.linker import AcpiTables, Blob, ChecksumFixup, PointerFixup
from kvmcore.acpi.testing import Found, reader_for, walk


@pytest.fixture(scope="module")
def tables() -> AcpiTables:
    return build_tables(AcpiPlatform(vcpus=4))


# ------------------------------------------------------------------------------------------- place()
@pytest.mark.parametrize("base", [layout.ACPI_TABLES_ADDR, 0x7FF0_0000, 0x40])
def test_place_gives_valid_tables_at_any_aligned_base(tables: AcpiTables, base: int) -> None:
    blob = tables.place(base)
    found = walk(reader_for(blob, base), base)
    assert found["RSDP"].addr == base


def test_two_bases_differ_only_by_the_relocation(tables: AcpiTables) -> None:
    a, b = 0xE0000, 0x1234_5000
    fa, fb = walk(reader_for(tables.place(a), a), a), walk(reader_for(tables.place(b), b), b)
    for sig in fa:
        assert fb[sig].addr - fa[sig].addr == b - a, sig
    # Every pointer field moved by exactly the base difference; everything else is identical but checksums.
    addr_a, addr_b = tables.addresses(a), tables.addresses(b)
    for p in tables.pointers:
        va = int.from_bytes(tables.place(a)[addr_a[p.blob] - a + p.offset :][: p.size], "little")
        vb = int.from_bytes(tables.place(b)[addr_b[p.blob] - b + p.offset :][: p.size], "little")
        assert vb - va == b - a, p
    skip = {(c.blob, c.offset) for c in tables.checksums} | {(p.blob, p.offset + i) for p in tables.pointers
                                                              for i in range(p.size)}
    for blob in tables.blobs:
        ra = tables.place(a)[addr_a[blob.name] - a :][: len(blob.data)]
        rb = tables.place(b)[addr_b[blob.name] - b :][: len(blob.data)]
        assert all(ra[i] == rb[i] for i in range(len(blob.data)) if (blob.name, i) not in skip), blob.name


def test_place_puts_the_facs_on_a_64_byte_boundary_even_from_a_16_byte_base(tables: AcpiTables) -> None:
    base = 0xE0010
    found = walk(reader_for(tables.place(base), base), base)
    assert found["FACS"].addr % 64 == 0


def test_place_rejects_a_misaligned_base(tables: AcpiTables) -> None:
    with pytest.raises(AcpiPlacementError):
        tables.place(0xE0008)  # the RSDP must be 16-byte aligned (§5.2.5.1)


def test_place_rejects_addresses_that_do_not_fit_32_bit_pointers(tables: AcpiTables) -> None:
    with pytest.raises(AcpiPlacementError):
        tables.place(0xFFFF_FF00)  # the RSDT and FADT.DSDT are 32-bit pointers


def test_tables_fit_the_bios_area_with_the_most_vcpus() -> None:
    blob = build_tables(AcpiPlatform(vcpus=255)).place(layout.ACPI_TABLES_ADDR)
    assert layout.ACPI_TABLES_ADDR + len(blob) <= layout.ACPI_TABLES_END


# ------------------------------------------------------------------------------------------- validation
def _one(**kw: object) -> AcpiTables:
    args: dict[str, object] = {"blobs": (Blob("a", bytes(16), 16), Blob("b", bytes(8))), "pointers": (),
                               "checksums": ()} | kw
    return AcpiTables(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw", [
    {"blobs": ()},
    {"blobs": (Blob("a", b""), Blob("a", b""))},
    {"blobs": (Blob("a", b"", 3),)},
    {"blobs": (Blob("a", b"", 8, "low"),)},  # type: ignore[arg-type]
    {"pointers": (PointerFixup("a", 0, 4, "zz"),)},
    {"pointers": (PointerFixup("zz", 0, 4, "a"),)},
    {"pointers": (PointerFixup("a", 0, 3, "b"),)},
    {"pointers": (PointerFixup("a", 13, 4, "b"),)},
    {"pointers": (PointerFixup("a", -1, 1, "b"),)},
    {"checksums": (ChecksumFixup("zz", 0, 0, 1),)},
    {"checksums": (ChecksumFixup("a", 0, 0, 17),)},
    {"checksums": (ChecksumFixup("a", 8, 0, 8),)},  # the checksum byte outside its own range
])
def test_inconsistent_table_sets_are_rejected(kw: dict[str, object]) -> None:
    with pytest.raises(AcpiLinkError):
        _one(**kw)


def test_pointer_addend_is_kept() -> None:
    data = (5).to_bytes(4, "little") + bytes(12)
    ts = AcpiTables((Blob("a", data, 16), Blob("b", bytes(8))), (PointerFixup("a", 0, 4, "b"),), ())
    out = ts.place(0x1000)
    assert int.from_bytes(out[:4], "little") == ts.addresses(0x1000)["b"] + 5


def test_long_fw_cfg_names_are_rejected() -> None:
    with pytest.raises(AcpiLinkError):
        lk._fname("etc/" + "x" * 60)


# ------------------------------------------------------------------------------------------- table loader
def _cstr(raw: bytes) -> str:
    assert raw[-1] == 0, "SeaBIOS rejects names without a NUL inside the 56 bytes"
    return raw.split(b"\0", 1)[0].decode()


def decode_loader(blob: bytes) -> list[tuple[object, ...]]:
    """BiosLinkerLoaderEntry (QEMU hw/acpi/bios-linker-loader.c) back into tuples."""
    assert len(blob) % lk.LOADER_ENTRY_SIZE == 0
    out: list[tuple[object, ...]] = []
    for off in range(0, len(blob), lk.LOADER_ENTRY_SIZE):
        e = blob[off : off + lk.LOADER_ENTRY_SIZE]
        cmd = struct.unpack_from("<I", e)[0]
        if cmd == lk.COMMAND_ALLOCATE:
            _, f, align, zone = lk.ALLOCATE_ENTRY.unpack_from(e)
            out.append(("ALLOCATE", _cstr(f), align, zone))
            tail = lk.ALLOCATE_ENTRY.size
        elif cmd == lk.COMMAND_ADD_POINTER:
            _, d, s, offset, size = lk.ADD_POINTER_ENTRY.unpack_from(e)
            out.append(("ADD_POINTER", _cstr(d), _cstr(s), offset, size))
            tail = lk.ADD_POINTER_ENTRY.size
        else:
            assert cmd == lk.COMMAND_ADD_CHECKSUM
            _, f, offset, start, length = lk.ADD_CHECKSUM_ENTRY.unpack_from(e)
            out.append(("ADD_CHECKSUM", _cstr(f), offset, start, length))
            tail = lk.ADD_CHECKSUM_ENTRY.size
        assert e[tail:] == bytes(lk.LOADER_ENTRY_SIZE - tail), "padding must be zero"
    return out


def test_loader_entry_layout_is_qemus() -> None:
    # command le32 at 0; alloc.file at 4 (56 bytes), alloc.align at 60, alloc.zone at 64;
    # pointer.dest_file at 4, src_file at 60, offset at 116, size at 120; cksum.file at 4, offset 60, start 64,
    # length 68.
    assert lk.ALLOCATE_ENTRY.size == 65 and lk.ADD_POINTER_ENTRY.size == 121 and lk.ADD_CHECKSUM_ENTRY.size == 72
    e = lk._entry(lk.ADD_POINTER_ENTRY.pack(2, b"etc/acpi/tables", b"etc/acpi/rsdp", 0x1234, 8))
    assert len(e) == 128 and e[60:73] == b"etc/acpi/rsdp" and e[116:120] == b"\x34\x12\0\0" and e[120] == 8


def test_table_loader_files_and_commands(tables: AcpiTables) -> None:
    files = tables.table_loader()
    assert set(files) == {"etc/acpi/rsdp", "etc/acpi/tables", "etc/table-loader"}
    assert len(files["etc/acpi/rsdp"]) == 36
    cmds = decode_loader(files["etc/table-loader"])
    assert cmds[:2] == [("ALLOCATE", "etc/acpi/rsdp", 16, lk.ALLOC_ZONE_FSEG),
                        ("ALLOCATE", "etc/acpi/tables", 64, lk.ALLOC_ZONE_HIGH)]
    pointers = [c for c in cmds if c[0] == "ADD_POINTER"]
    checksums = [c for c in cmds if c[0] == "ADD_CHECKSUM"]
    assert len(pointers) == len(tables.pointers) == 9 and len(checksums) == len(tables.checksums) == 7
    assert cmds == cmds[:2] + pointers + checksums  # every pointer before any checksum
    # The RSDP's two pointers point into the tables file; its checksums come last, legacy then extended.
    assert [c for c in pointers if c[1] == "etc/acpi/rsdp"] == [
        ("ADD_POINTER", "etc/acpi/rsdp", "etc/acpi/tables", 16, 4),
        ("ADD_POINTER", "etc/acpi/rsdp", "etc/acpi/tables", 24, 8)]
    assert checksums[-2:] == [("ADD_CHECKSUM", "etc/acpi/rsdp", 8, 0, 20), ("ADD_CHECKSUM", "etc/acpi/rsdp", 32, 0, 36)]


class SeaBiosLoader:
    """romfile_loader_execute in Python: allocate each file from a zone (FSEG below 1 MiB, HIGH near the top of
    RAM), copy it in, then patch pointers and checksums in place."""

    def __init__(self, files: dict[str, bytes], fseg: int, high: int) -> None:
        self.files = files
        self.mem: dict[int, bytearray] = {}
        self.where: dict[str, int] = {}
        self.next = {lk.ALLOC_ZONE_FSEG: fseg, lk.ALLOC_ZONE_HIGH: high}

    def run(self) -> None:
        for cmd in decode_loader(self.files["etc/table-loader"]):
            if cmd[0] == "ALLOCATE":
                _, name, align, zone = cmd
                assert isinstance(name, str) and isinstance(align, int) and isinstance(zone, int)
                assert align & (align - 1) == 0
                addr = (self.next[zone] + max(align, 16) - 1) & ~(max(align, 16) - 1)  # MALLOC_MIN_ALIGN 16
                self.where[name] = addr
                self.mem[addr] = bytearray(self.files[name])
                self.next[zone] = addr + len(self.files[name])
            elif cmd[0] == "ADD_POINTER":
                _, dest, src, offset, size = cmd
                assert isinstance(dest, str) and isinstance(src, str) and isinstance(offset, int)
                assert isinstance(size, int) and size in (1, 2, 4, 8)
                data = self.mem[self.where[dest]]
                assert offset + size <= len(data)
                value = int.from_bytes(data[offset : offset + size], "little") + self.where[src]
                data[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            else:
                _, name, offset, start, length = cmd
                assert isinstance(name, str) and isinstance(offset, int)
                assert isinstance(start, int) and isinstance(length, int)
                data = self.mem[self.where[name]]
                assert offset < len(data) and start + length <= len(data)
                data[offset] = (data[offset] - sum(data[start : start + length])) & 0xFF

    def read(self, addr: int, length: int) -> bytes:
        for base, data in self.mem.items():
            if base <= addr and addr + length <= base + len(data):
                return bytes(data[addr - base : addr - base + length])
        raise AssertionError(f"read {addr:#x}+{length} outside allocated files")


def test_seabios_executing_the_loader_gets_valid_tables(tables: AcpiTables) -> None:
    fw = SeaBiosLoader(tables.table_loader(), fseg=0xF5A40, high=0x7FFD_0004)
    fw.run()
    rsdp = fw.where["etc/acpi/rsdp"]
    assert rsdp < 0x10_0000 and rsdp % 16 == 0  # where the OS scans for it
    found = walk(fw.read, rsdp)
    assert found["FACS"].addr % 64 == 0
    # Same tables as a direct placement, apart from where they are.
    direct: dict[str, Found] = walk(reader_for(tables.place(0xE0000), 0xE0000), 0xE0000)
    for sig in ("FACP", "APIC", "DSDT", "FACS", "XSDT", "RSDT"):
        assert len(found[sig].data) == len(direct[sig].data)
    assert found["DSDT"].data[10:] == direct["DSDT"].data[10:]  # no pointers inside; header checksum aside
    assert found["APIC"].data == direct["APIC"].data


def test_loader_form_leaves_checksums_for_the_firmware(tables: AcpiTables) -> None:
    files = tables.table_loader()
    # The tables file holds the FACS first (64-aligned), then the rest; their checksum bytes are still 0.
    assert files["etc/acpi/tables"][:4] == b"FACS"
    for c in tables.checksums:
        if c.blob != "rsdp":
            assert files["etc/acpi/tables"][tables._files()[2][c.blob][1] + c.offset] == 0


def test_the_walker_notices_a_corrupted_table(tables: AcpiTables) -> None:
    from kvmcore.acpi.testing import AcpiWalkError

    blob = bytearray(tables.place(0xE0000))
    dsdt = tables.addresses(0xE0000)["dsdt"] - 0xE0000
    blob[dsdt + 40] ^= 0xFF
    with pytest.raises(AcpiWalkError, match="DSDT"):
        walk(reader_for(bytes(blob), 0xE0000), 0xE0000)
