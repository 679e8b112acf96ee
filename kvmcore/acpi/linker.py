"""ACPI tables in relocatable form, and the two ways kvmdm hands them to a guest.

The builder produces named blobs (one per table) whose pointer fields hold an offset into the table they point
at, plus a list of pointer fix-ups and checksum ranges: the model of QEMU's BIOS linker/loader
(hw/acpi/bios-linker-loader.c). Two consumers resolve them:

* :meth:`AcpiTables.place` lays everything out at a fixed guest-physical address (RSDP first) and resolves the
  fix-ups itself; used when kvmdm boots a kernel directly, with no firmware.
* :meth:`AcpiTables.table_loader` returns the fw_cfg files QEMU gives firmware: ``etc/acpi/rsdp`` (the RSDP,
  allocated in the F-segment so the BIOS-area scan finds it), ``etc/acpi/tables`` (everything else) and
  ``etc/table-loader``, the list of 128-byte commands SeaBIOS (src/fw/romfile_loader.c) executes: ALLOCATE each
  file, ADD_POINTER (add the source file's address to a pointer field), ADD_CHECKSUM (subtract the byte sum of a
  range from a checksum byte).

Both consumers apply the fix-ups in the same order: every pointer first, then the checksums in list order (so a
checksum covering another checksum byte, like the RSDP's extended checksum, comes after it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

Zone = Literal["fseg", "high"]

# fw_cfg file names (QEMU include/hw/acpi/aml-build.h ACPI_BUILD_RSDP_FILE / ACPI_BUILD_TABLE_FILE,
# hw/acpi/bios-linker-loader.c BIOS_LINKER_LOADER_FILE).
RSDP_FILE = "etc/acpi/rsdp"
TABLES_FILE = "etc/acpi/tables"
LOADER_FILE = "etc/table-loader"
ZONE_FILES: dict[Zone, str] = {"fseg": RSDP_FILE, "high": TABLES_FILE}

# BiosLinkerLoaderEntry (QEMU hw/acpi/bios-linker-loader.c): a le32 command and a 124-byte union, 128 bytes in all.
LOADER_ENTRY_SIZE = 128
LOADER_FILESZ = 56  # FW_CFG_MAX_FILE_PATH: names are NUL-terminated inside 56 bytes
COMMAND_ALLOCATE = 1
COMMAND_ADD_POINTER = 2
COMMAND_ADD_CHECKSUM = 3
ALLOC_ZONE_HIGH = 1
ALLOC_ZONE_FSEG = 2
_ZONE_CODES: dict[Zone, int] = {"high": ALLOC_ZONE_HIGH, "fseg": ALLOC_ZONE_FSEG}
# command, then: alloc {file[56], align le32, zone u8}; pointer {dest[56], src[56], offset le32, size u8};
# cksum {file[56], offset le32, start le32, length le32}. Little-endian, packed, zero-padded to 128 bytes.
ALLOCATE_ENTRY = struct.Struct(f"<I{LOADER_FILESZ}sIB")
ADD_POINTER_ENTRY = struct.Struct(f"<I{LOADER_FILESZ}s{LOADER_FILESZ}sIB")
ADD_CHECKSUM_ENTRY = struct.Struct(f"<I{LOADER_FILESZ}sIII")

POINTER_SIZES = (1, 2, 4, 8)


class AcpiLinkError(ValueError):
    """The relocatable table set is inconsistent: a duplicate blob, a fix-up naming a missing blob or reaching past
    one, a bad pointer size or alignment (a host-side programming error)."""


class AcpiPlacementError(ValueError):
    """The tables cannot be placed there: a misaligned base, or an address that does not fit its pointer field."""


@dataclass(frozen=True)
class Blob:
    """One table. ``align`` is its required address alignment; ``zone`` says which firmware file it goes in."""

    name: str
    data: bytes
    align: int = 8
    zone: Zone = "high"


@dataclass(frozen=True)
class PointerFixup:
    """The ``size``-byte little-endian field at ``offset`` in ``blob`` holds an offset into ``target``; resolving
    adds the address of ``target`` to it."""

    blob: str
    offset: int
    size: int
    target: str


@dataclass(frozen=True)
class ChecksumFixup:
    """Byte ``offset`` of ``blob`` is set so that bytes [start, start + length) of ``blob`` sum to 0 (mod 256)."""

    blob: str
    offset: int
    start: int
    length: int


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def apply_pointer(buf: bytearray, at: int, size: int, address: int) -> None:
    """Add ``address`` to the little-endian ``size``-byte field at ``at`` (SeaBIOS romfile_loader_add_pointer)."""
    value = int.from_bytes(buf[at : at + size], "little") + address
    if value >= 1 << (8 * size):
        raise AcpiPlacementError(f"address {value:#x} does not fit a {size}-byte pointer field")
    buf[at : at + size] = value.to_bytes(size, "little")


def apply_checksum(buf: bytearray, at: int, start: int, length: int) -> None:
    """``*at -= sum(buf[start:start+length])`` in 8-bit arithmetic (SeaBIOS romfile_loader_add_checksum): the
    range then sums to 0 whatever the checksum byte held before, as long as it lies inside the range."""
    buf[at] = (buf[at] - sum(buf[start : start + length])) & 0xFF


@dataclass(frozen=True)
class AcpiTables:
    blobs: tuple[Blob, ...]
    pointers: tuple[PointerFixup, ...]
    checksums: tuple[ChecksumFixup, ...]

    def __post_init__(self) -> None:
        names = [b.name for b in self.blobs]
        if len(set(names)) != len(names):
            raise AcpiLinkError(f"duplicate blob names in {names}")
        if not self.blobs:
            raise AcpiLinkError("an ACPI table set needs at least one blob (the RSDP)")
        sizes = {b.name: len(b.data) for b in self.blobs}
        for b in self.blobs:
            if b.align <= 0 or b.align & (b.align - 1):
                raise AcpiLinkError(f"blob {b.name}: alignment {b.align} is not a power of two")
            if b.zone not in ZONE_FILES:
                raise AcpiLinkError(f"blob {b.name}: unknown zone {b.zone!r}")
        for p in self.pointers:
            if p.blob not in sizes or p.target not in sizes:
                raise AcpiLinkError(f"pointer fix-up {p} names a blob that does not exist")
            if p.size not in POINTER_SIZES:
                raise AcpiLinkError(f"pointer fix-up {p}: size must be one of {POINTER_SIZES}")
            if not 0 <= p.offset <= sizes[p.blob] - p.size:
                raise AcpiLinkError(f"pointer fix-up {p} reaches past the end of {p.blob}")
        for c in self.checksums:
            if c.blob not in sizes:
                raise AcpiLinkError(f"checksum fix-up {c} names a blob that does not exist")
            if not (0 <= c.start and c.length >= 0 and c.start + c.length <= sizes[c.blob]
                    and c.start <= c.offset < c.start + c.length):
                raise AcpiLinkError(f"checksum fix-up {c}: the checksum byte and range must lie inside {c.blob}")

    def blob(self, name: str) -> Blob:
        for b in self.blobs:
            if b.name == name:
                return b
        raise KeyError(name)

    # ------------------------------------------------------------------------------------ direct kernel boot
    def addresses(self, base_gpa: int) -> dict[str, int]:
        """Where place(base_gpa) puts each blob: in order, each at the next address its alignment allows."""
        first = self.blobs[0]
        if base_gpa < 0 or base_gpa % first.align:
            raise AcpiPlacementError(f"base {base_gpa:#x} is not {first.align}-byte aligned as {first.name} needs")
        out: dict[str, int] = {}
        cursor = base_gpa
        for b in self.blobs:
            cursor = _align_up(cursor, b.align)
            out[b.name] = cursor
            cursor += len(b.data)
        return out

    def place(self, base_gpa: int) -> bytes:
        """The bytes to write at ``base_gpa`` (blobs in order, the first, the RSDP, at ``base_gpa``), with every
        pointer and checksum resolved."""
        addr = self.addresses(base_gpa)
        end = max(addr[b.name] + len(b.data) for b in self.blobs)
        buf = bytearray(end - base_gpa)
        for b in self.blobs:
            off = addr[b.name] - base_gpa
            buf[off : off + len(b.data)] = b.data
        for p in self.pointers:
            apply_pointer(buf, addr[p.blob] - base_gpa + p.offset, p.size, addr[p.target])
        for c in self.checksums:
            off = addr[c.blob] - base_gpa
            apply_checksum(buf, off + c.offset, off + c.start, c.length)
        return bytes(buf)

    # ---------------------------------------------------------------------------- firmware (fw_cfg) form
    def _files(self) -> tuple[dict[str, bytearray], dict[str, int], dict[str, tuple[str, int]]]:
        """Pack blobs into their zone's file: (file contents, file alignment, blob -> (file, offset))."""
        files: dict[str, bytearray] = {}
        aligns: dict[str, int] = {}
        where: dict[str, tuple[str, int]] = {}
        for b in self.blobs:
            fname = ZONE_FILES[b.zone]
            data = files.setdefault(fname, bytearray())
            off = _align_up(len(data), b.align)
            data.extend(bytes(off - len(data)))
            data.extend(b.data)
            aligns[fname] = max(aligns.get(fname, 1), b.align)
            where[b.name] = (fname, off)
        return files, aligns, where

    def table_loader(self) -> dict[str, bytes]:
        """{"etc/acpi/rsdp": ..., "etc/acpi/tables": ..., "etc/table-loader": ...} as QEMU's fw_cfg serves them:
        pointer fields hold offsets into their source file and checksum bytes are left for the firmware."""
        files, aligns, where = self._files()
        loader = bytearray()
        # ALLOCATE must precede any command naming the file (QEMU prepends them): the F-segment RSDP first.
        for fname in sorted(files, key=lambda f: f != RSDP_FILE):
            zone = next(z for z, f in ZONE_FILES.items() if f == fname)
            loader += _entry(ALLOCATE_ENTRY.pack(COMMAND_ALLOCATE, _fname(fname), aligns[fname], _ZONE_CODES[zone]))
        for p in self.pointers:
            dfile, doff = where[p.blob]
            sfile, soff = where[p.target]
            # The field holds an offset into the source *file*; the firmware adds the file's address.
            apply_pointer(files[dfile], doff + p.offset, p.size, soff)
            loader += _entry(ADD_POINTER_ENTRY.pack(COMMAND_ADD_POINTER, _fname(dfile), _fname(sfile),
                                                    doff + p.offset, p.size))
        for c in self.checksums:
            cfile, coff = where[c.blob]
            loader += _entry(ADD_CHECKSUM_ENTRY.pack(COMMAND_ADD_CHECKSUM, _fname(cfile), coff + c.offset,
                                                     coff + c.start, c.length))
        out = {name: bytes(data) for name, data in files.items()}
        out[LOADER_FILE] = bytes(loader)
        return out


def _fname(name: str) -> bytes:
    raw = name.encode("ascii")
    if len(raw) >= LOADER_FILESZ:
        raise AcpiLinkError(f"fw_cfg file name {name!r} does not fit {LOADER_FILESZ - 1} bytes")
    return raw  # struct's "56s" pads with NULs


def _entry(packed: bytes) -> bytes:
    return packed.ljust(LOADER_ENTRY_SIZE, b"\0")
