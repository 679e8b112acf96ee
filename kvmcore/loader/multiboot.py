"""Multiboot v1 loader (Multiboot Specification 0.6.96), matching what QEMU's -kernel gives the same image.

The kernel is an ELF whose PT_LOAD segments go to their physical addresses; the multiboot header (§3.1) must sit
4-byte aligned in the first 8192 bytes. The information structure (§3.3) is built in low RAM with the same values
QEMU computes (hw/i386/multiboot.c), so a guest that prints them prints the same text under both.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmcore.layout import LOW_RAM_END
from kvmcore.loader.e820 import e820_map
from kvmcore.loader.elf import parse_elf
from kvmcore.loader.errors import BadElf, ImageTooLarge, LoaderError, NoMultibootHeader
from kvmcore.memory import GuestMemory, GuestMemoryError

MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MB_FLAG_AOUT_KLUDGE = 1 << 16
MB_FLAGS_REQUIRED_UNSUPPORTED = 1 << 2  # video mode request

MBI_ADDR = 0x9000
MBI_CMDLINE_ADDR = 0x9100
MBI_CMDLINE_MAX = 0x0E00  # up to 0x9F00
MBI_LOADER_NAME_ADDR = 0x9F00
MBI_MMAP_ADDR = 0xA000
MODULE_BASE = 0x0100_0000  # modules are placed from 16 MiB up, after the kernel

MBI_FLAG_MEM = 1 << 0
MBI_FLAG_CMDLINE = 1 << 2
MBI_FLAG_MODS = 1 << 3
MBI_FLAG_MMAP = 1 << 6
MBI_FLAG_LOADER_NAME = 1 << 9

LOADER_NAME = b"kvmdm\0"


@dataclass(frozen=True)
class MultibootHeader:
    offset: int
    flags: int


@dataclass(frozen=True)
class LoadedKernel:
    entry: int
    mbi_addr: int
    kernel_end: int


_MAGIC_BYTES = struct.pack("<I", MULTIBOOT_MAGIC)


def find_header(image: bytes) -> MultibootHeader:
    """The first 4-aligned header with a valid checksum in the first 8 KiB (multiboot 0.6.96 §3.1.1). Candidates
    are found with ``bytes.find`` (a DM's startup budget is a few ms; unpacking every word cost ~0.3 ms)."""
    limit = min(len(image), 8192) - 12
    off = image.find(_MAGIC_BYTES, 0, limit + 4)
    while 0 <= off <= limit:
        if off % 4 == 0:
            magic, flags, checksum = struct.unpack_from("<III", image, off)
            if (magic + flags + checksum) & 0xFFFF_FFFF == 0:
                return MultibootHeader(off, flags)
        off = image.find(_MAGIC_BYTES, off + 1, limit + 4)
    raise NoMultibootHeader("no multiboot header in the first 8 KiB of the image")


def load_multiboot(mem: GuestMemory, image: bytes, cmdline: str = "",
                   modules: list[tuple[bytes, str]] | None = None) -> LoadedKernel:
    hdr = find_header(image)
    if hdr.flags & MB_FLAGS_REQUIRED_UNSUPPORTED and hdr.flags & 0xFFFF & MB_FLAGS_REQUIRED_UNSUPPORTED:
        # Bit 2 asks for a video mode; we have no framebuffer, which the spec lets a loader refuse (§3.1.2).
        raise LoaderError("the kernel requires a video mode; kvmdm has no framebuffer")
    if hdr.flags & MB_FLAG_AOUT_KLUDGE:
        raise LoaderError("multiboot a.out address fields are not supported; link the kernel as ELF")
    elf = parse_elf(image)
    end = 0
    try:
        for seg in elf.segments:
            if seg.paddr < 0x1000:
                raise BadElf(f"segment at 0x{seg.paddr:x} would overwrite the real-mode IVT")
            mem.write(seg.paddr, image[seg.offset : seg.offset + seg.filesz])
            if seg.memsz > seg.filesz:
                mem.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz)
            end = max(end, seg.paddr + seg.memsz)
    except GuestMemoryError as e:
        raise ImageTooLarge(f"kernel segment does not fit in guest RAM: {e}") from None

    raw_cmdline = cmdline.encode() + b"\0"
    if len(raw_cmdline) > MBI_CMDLINE_MAX:
        raise ImageTooLarge(f"command line longer than {MBI_CMDLINE_MAX - 1} bytes")
    mem.write(MBI_CMDLINE_ADDR, raw_cmdline)
    mem.write(MBI_LOADER_NAME_ADDR, LOADER_NAME)

    e820 = e820_map(mem)
    mmap_blob = b"".join(struct.pack("<IQQI", 20, base, size, typ) for base, size, typ in e820)
    mem.write(MBI_MMAP_ADDR, mmap_blob)

    below_4g = min(sum(s for g, s in mem.regions() if g < (1 << 32)), LOW_RAM_END)
    flags = MBI_FLAG_MEM | MBI_FLAG_CMDLINE | MBI_FLAG_MMAP | MBI_FLAG_LOADER_NAME
    mods_count, mods_addr = 0, 0
    if modules:
        flags |= MBI_FLAG_MODS
        mods_addr = MBI_MMAP_ADDR + 0x800
        cursor = max(MODULE_BASE, (end + 0xFFF) & ~0xFFF)
        name_addr = mods_addr + 16 * len(modules)
        table = b""
        for data, name in modules:
            try:
                mem.write(cursor, data)
            except GuestMemoryError:
                raise ImageTooLarge("multiboot module does not fit in guest RAM") from None
            raw_name = name.encode()[:255] + b"\0"
            mem.write(name_addr, raw_name)
            table += struct.pack("<IIII", cursor, cursor + len(data), name_addr, 0)
            name_addr += len(raw_name)
            cursor = (cursor + len(data) + 0xFFF) & ~0xFFF
        mem.write(mods_addr, table)
        mods_count = len(modules)

    # §3.3 boot information: same mem_lower/mem_upper formula as QEMU's multiboot loader.
    mbi = struct.pack(
        "<IIIIIIIIIIIIII",
        flags,
        640,
        below_4g // 1024 - 1024,
        0,  # boot_device
        MBI_CMDLINE_ADDR,
        mods_count,
        mods_addr,
        0, 0, 0, 0,  # syms
        len(mmap_blob),
        MBI_MMAP_ADDR,
        0,  # drives_length
    )
    mem.write(MBI_ADDR, mbi)
    mem.write_u32(MBI_ADDR + 64, MBI_LOADER_NAME_ADDR)  # boot_loader_name
    return LoadedKernel(elf.entry_physical(), MBI_ADDR, end)
