"""Linux x86 boot protocol loader (Documentation/arch/x86/boot.rst): bzImage + initrd + cmdline, 64-bit entry.

Low-memory map we use (all below the EBDA at 0x9FC00):
    0x00500  boot GDT (kvmcore.x86)            0x07000  boot_params ("zero page", 4 KiB)
    0x09000  PML4, 0x0A000 PDPT, 0x0B000..0x0EFFF PDs (identity map of 4 GiB)
    0x20000  command line (up to cmdline_size)  0x100000 protected-mode kernel (code32_start)
    initrd   page-aligned, as high as possible below min(initrd_addr_max, end of low RAM)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Re-exported: callers read the e820 map through this module too.
from kvmcore.loader.e820 import E820_RAM as E820_RAM
from kvmcore.loader.e820 import E820_RESERVED as E820_RESERVED
from kvmcore.loader.e820 import e820_map as e820_map
from kvmcore.loader.errors import BadBzImage, ImageTooLarge
from kvmcore.memory import GuestMemory, GuestMemoryError

BOOT_PARAMS_ADDR = 0x7000
CMDLINE_ADDR = 0x20000
KERNEL_ADDR = 0x100000

# boot_params / setup_header offsets (boot.rst "THE REAL-MODE KERNEL HEADER", zero-page.rst)
OFF_ACPI_RSDP_ADDR = 0x070  # zero-page.rst: u64 acpi_rsdp_addr, read from boot protocol 2.14
OFF_E820_ENTRIES = 0x1E8
OFF_SETUP_SECTS = 0x1F1
OFF_BOOT_FLAG = 0x1FE
OFF_JUMP = 0x200
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_CODE32_START = 0x214
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_HEAP_END_PTR = 0x224
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE = 0x234
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260
OFF_E820_TABLE = 0x2D0
E820_MAX = 128

LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01

ACPI_RSDP_MIN_VERSION = 0x020E


@dataclass(frozen=True)
class SetupHeader:
    setup_sects: int
    version: int
    loadflags: int
    xloadflags: int
    initrd_addr_max: int
    cmdline_size: int
    header_end: int


@dataclass(frozen=True)
class LoadedLinux:
    entry64: int
    boot_params: int
    kernel_end: int
    initrd: tuple[int, int] | None


def parse_setup_header(image: bytes) -> SetupHeader:
    if len(image) < 0x250:
        raise BadBzImage("file too small to be a bzImage")
    if struct.unpack_from("<H", image, OFF_BOOT_FLAG)[0] != 0xAA55:
        raise BadBzImage("missing 0xAA55 boot flag: not a Linux kernel image")
    if image[OFF_HEADER : OFF_HEADER + 4] != b"HdrS":
        raise BadBzImage("missing HdrS signature: boot protocol too old")
    version = struct.unpack_from("<H", image, OFF_VERSION)[0]
    if version < 0x0206:
        raise BadBzImage(f"boot protocol {version >> 8}.{version & 0xFF:02} < 2.06 is not supported")
    setup_sects = image[OFF_SETUP_SECTS] or 4
    loadflags = image[OFF_LOADFLAGS]
    if not loadflags & LOADED_HIGH:
        raise BadBzImage("zImage (loaded low) kernels are not supported")
    xloadflags = struct.unpack_from("<H", image, OFF_XLOADFLAGS)[0] if version >= 0x020C else 0
    if version >= 0x020C and not xloadflags & XLF_KERNEL_64:
        raise BadBzImage("kernel has no 64-bit entry point (XLF_KERNEL_64 clear)")
    initrd_addr_max = struct.unpack_from("<I", image, OFF_INITRD_ADDR_MAX)[0]
    cmdline_size = struct.unpack_from("<I", image, OFF_CMDLINE_SIZE)[0]
    header_end = OFF_JUMP + 2 + image[OFF_JUMP + 1]  # the jump's offset byte gives the header's length
    if (setup_sects + 1) * 512 > len(image):
        raise BadBzImage("setup sectors extend past the end of the file")
    return SetupHeader(setup_sects, version, loadflags, xloadflags, initrd_addr_max, cmdline_size, header_end)


def _runtime_end(image: bytes, hdr: SetupHeader) -> int:
    """End of the memory the kernel uses before it reads its memory map (boot.rst, protocol 2.10 init_size).

    It counts from the runtime start address: a relocatable 64-bit kernel loaded below pref_address
    (LOAD_PHYSICAL_ADDR) moves up to it (arch/x86/boot/compressed/head_64.S) and decompresses in place there, so
    an initrd inside [max(load address, pref_address), + init_size) would be overwritten before it is read.
    """
    if hdr.version < 0x020A or len(image) < OFF_INIT_SIZE + 4:
        return 0
    pref_address = struct.unpack_from("<Q", image, OFF_PREF_ADDRESS)[0]
    init_size = struct.unpack_from("<I", image, OFF_INIT_SIZE)[0]
    return max(KERNEL_ADDR, pref_address) + init_size


def load_linux(mem: GuestMemory, image: bytes, cmdline: str = "", initrd: bytes | None = None, *,
               acpi_rsdp: int | None = None) -> LoadedLinux:
    """Load the kernel, initrd and command line and write boot_params. ``acpi_rsdp``: where the caller put the
    ACPI RSDP; kernels of boot protocol 2.14+ read it from boot_params, older ones find it by scanning the BIOS
    area (so it should be there, 16-byte aligned, as kvmcore.layout.ACPI_TABLES_ADDR is)."""
    hdr = parse_setup_header(image)
    kernel = image[(hdr.setup_sects + 1) * 512 :]
    try:
        mem.write(KERNEL_ADDR, kernel)
    except GuestMemoryError:
        raise ImageTooLarge(f"kernel ({len(kernel)} bytes) does not fit in guest RAM at 1 MiB") from None
    kernel_end = KERNEL_ADDR + len(kernel)

    raw_cmdline = cmdline.encode() + b"\0"
    max_cmdline = hdr.cmdline_size if hdr.version >= 0x0206 and hdr.cmdline_size else 255
    if len(raw_cmdline) - 1 > max_cmdline:
        raise ImageTooLarge(f"command line is {len(raw_cmdline) - 1} bytes; this kernel takes {max_cmdline}")

    bp = bytearray(4096)
    bp[OFF_SETUP_SECTS : hdr.header_end] = image[OFF_SETUP_SECTS : hdr.header_end]
    bp[OFF_TYPE_OF_LOADER] = 0xFF  # undefined loader id (boot.rst: "0xFF if no ID assigned")
    bp[OFF_LOADFLAGS] = hdr.loadflags | CAN_USE_HEAP
    struct.pack_into("<H", bp, OFF_HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", bp, OFF_CMD_LINE_PTR, CMDLINE_ADDR)

    initrd_span = None
    if initrd:
        low_ram_end = next((gpa + size for gpa, size in mem.regions() if gpa == 0), 0)
        top = min(hdr.initrd_addr_max + 1, low_ram_end)
        addr = (top - len(initrd)) & ~0xFFF
        if addr < max(kernel_end, _runtime_end(image, hdr)):
            raise ImageTooLarge("initrd does not fit between the kernel (up to its init_size) and initrd_addr_max")
        mem.write(addr, initrd)
        struct.pack_into("<II", bp, OFF_RAMDISK_IMAGE, addr, len(initrd))
        initrd_span = (addr, len(initrd))

    if acpi_rsdp is not None and hdr.version >= ACPI_RSDP_MIN_VERSION:
        struct.pack_into("<Q", bp, OFF_ACPI_RSDP_ADDR, acpi_rsdp)

    e820 = e820_map(mem)[:E820_MAX]
    bp[OFF_E820_ENTRIES] = len(e820)
    for i, (base, size, typ) in enumerate(e820):
        struct.pack_into("<QQI", bp, OFF_E820_TABLE + 20 * i, base, size, typ)

    mem.write(CMDLINE_ADDR, raw_cmdline)
    mem.write(BOOT_PARAMS_ADDR, bytes(bp))
    # boot.rst "64-bit BOOT PROTOCOL": the 64-bit entry is 0x200 past the protected-mode kernel's start.
    return LoadedLinux(KERNEL_ADDR + 0x200, BOOT_PARAMS_ADDR, kernel_end, initrd_span)
