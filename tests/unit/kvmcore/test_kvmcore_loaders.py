"""Multiboot v1 ELF and Linux bzImage loaders against images synthesized here, written into real GuestMemory.

Specs: Multiboot Specification 0.6.96 §3.1 (header), §3.3 (boot information); Linux
Documentation/arch/x86/boot.rst (setup header, 64-bit boot protocol) and zero-page.rst (e820 table).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from kvmcore import layout
from kvmcore.layout import MIB
from kvmcore.loader import elf, linux, multiboot
from kvmcore.loader.errors import BadBzImage, BadElf, ImageTooLarge, LoaderError, NoMultibootHeader, NotAnElf
from kvmcore.memory import GuestMemory

# ================================================================================================ multiboot / ELF
MB_MAGIC = 0x1BADB002
CODE = bytes.fromhex("b042e610e611ebfe")  # mov $0x42,%al; out %al,$0x10; out %al,$0x11; jmp .


def mb_header(flags: int = 0x3, checksum: int | None = None) -> bytes:
    if checksum is None:
        checksum = -(MB_MAGIC + flags) & 0xFFFF_FFFF
    return struct.pack("<III", MB_MAGIC, flags, checksum)


def make_elf(
    segments: list[tuple[int, int, bytes, int]] | None = None,
    *,
    entry: int = 0xC010_0000,
    mb: bytes | None = None,
    mb_offset: int = 0x80,
    machine: int = elf.EM_386,
    ei_class: int = 1,
    data_offset: int = 0x2000,
) -> bytes:
    """ELF32 executable: header, program headers, a multiboot header at mb_offset, segment data from data_offset.

    segments: (paddr, vaddr, file bytes, memsz).
    """
    if segments is None:
        segments = [(0x10_0000, 0xC010_0000, CODE, 0x1000)]
    if mb is None:
        mb = mb_header()
    size = max(data_offset + sum(len(s[2]) for s in segments), mb_offset + len(mb), 52 + 32 * len(segments))
    img = bytearray(size)
    ident = b"\x7fELF" + bytes([ei_class, 1, 1]) + bytes(9)
    img[0:16] = ident
    struct.pack_into("<HHIIIIIHHHHHH", img, 16, 2, machine, 1, entry, 52, 0, 0, 52, 32, len(segments), 0, 0, 0)
    off = data_offset
    for i, (paddr, vaddr, data, memsz) in enumerate(segments):
        struct.pack_into("<IIIIIIII", img, 52 + 32 * i, elf.PT_LOAD, off, vaddr, paddr, len(data), memsz, 7, 0x1000)
        img[off : off + len(data)] = data
        off += len(data)
    img[mb_offset : mb_offset + len(mb)] = mb
    return bytes(img)


@pytest.fixture
def mem128() -> Iterator[GuestMemory]:
    m = GuestMemory.create(layout.ram_layout(128 * MIB))
    yield m
    m.close()


def _mbi(mem: GuestMemory) -> dict[str, int]:
    names = ["flags", "mem_lower", "mem_upper", "boot_device", "cmdline", "mods_count", "mods_addr",
             "syms0", "syms1", "syms2", "syms3", "mmap_length", "mmap_addr", "drives_length", "drives_addr",
             "config_table", "boot_loader_name"]
    return dict(zip(names, struct.unpack_from("<17I", mem.read(multiboot.MBI_ADDR, 68)), strict=True))


def _cstr(mem: GuestMemory, gpa: int, limit: int = 4096) -> bytes:
    raw = mem.read(gpa, limit)
    assert b"\0" in raw, "string is not NUL-terminated"
    return raw[: raw.index(b"\0")]


def test_multiboot_loads_segment_at_paddr_zeroes_bss_and_translates_entry(mem128: GuestMemory) -> None:
    mem128.fill(0x10_0000, 0x2000, 0xCC)  # stale bytes where the bss goes must be cleared
    k = multiboot.load_multiboot(mem128, make_elf(entry=0xC010_0002))
    assert mem128.read(0x10_0000, len(CODE)) == CODE
    assert mem128.read(0x10_0000 + len(CODE), 0x1000 - len(CODE)) == bytes(0x1000 - len(CODE))
    assert mem128.read_u8(0x10_1000) == 0xCC  # nothing past memsz touched
    assert k.entry == 0x10_0002  # virtual 0xC0100002 through the segment's vaddr->paddr offset
    assert k.mbi_addr == multiboot.MBI_ADDR
    assert k.kernel_end == 0x10_1000


def test_multiboot_information_fields_match_qemu_for_128mib(mem128: GuestMemory) -> None:
    multiboot.load_multiboot(mem128, make_elf(), cmdline="console=ttyS0 quiet")
    mbi = _mbi(mem128)
    want_flags = (multiboot.MBI_FLAG_MEM | multiboot.MBI_FLAG_CMDLINE | multiboot.MBI_FLAG_MMAP
                  | multiboot.MBI_FLAG_LOADER_NAME)
    assert mbi["flags"] == want_flags
    assert mbi["mem_lower"] == 640
    assert mbi["mem_upper"] == 128 * 1024 - 1024 == 130048  # KiB above 1 MiB (QEMU: below_4g/1024 - 1024)
    assert _cstr(mem128, mbi["cmdline"]) == b"console=ttyS0 quiet"
    assert _cstr(mem128, mbi["boot_loader_name"]) == b"kvmdm"
    assert mbi["mods_count"] == 0


def test_multiboot_mmap_entries_describe_ram_and_reserved_ranges(mem128: GuestMemory) -> None:
    multiboot.load_multiboot(mem128, make_elf())
    mbi = _mbi(mem128)
    blob = mem128.read(mbi["mmap_addr"], mbi["mmap_length"])
    entries = [struct.unpack_from("<IQQI", blob, o) for o in range(0, len(blob), 24)]
    assert all(size == 20 for size, *_ in entries)  # §3.3: size excludes the size field itself
    assert [e[1:] for e in entries] == [
        (0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xE0000, 0x20000, 2), (0x10_0000, 127 * MIB, 1)]


def test_multiboot_mem_upper_and_mmap_with_ram_above_4g() -> None:
    with GuestMemory.create([(0, 16 * MIB), (layout.HIGH_RAM_START, 8 * MIB)]) as m:
        multiboot.load_multiboot(m, make_elf())
        mbi = _mbi(m)
        assert mbi["mem_upper"] == 16 * 1024 - 1024  # only RAM below 4 GiB counts
        blob = m.read(mbi["mmap_addr"], mbi["mmap_length"])
        assert struct.unpack_from("<IQQI", blob, len(blob) - 24)[1:] == (layout.HIGH_RAM_START, 8 * MIB, 1)


def test_multiboot_modules_are_placed_page_aligned_after_the_kernel(mem128: GuestMemory) -> None:
    k = multiboot.load_multiboot(mem128, make_elf(), modules=[(b"first", "mod1 arg"), (b"x" * 5000, "two")])
    mbi = _mbi(mem128)
    assert mbi["flags"] & multiboot.MBI_FLAG_MODS and mbi["mods_count"] == 2
    (s1, e1, n1, _), (s2, e2, n2, _) = (struct.unpack_from("<IIII", mem128.read(mbi["mods_addr"] + 16 * i, 16))
                                        for i in range(2))
    assert s1 >= k.kernel_end and s1 % 4096 == 0 and s2 % 4096 == 0 and s2 >= e1
    assert mem128.read(s1, e1 - s1) == b"first" and e2 - s2 == 5000
    assert _cstr(mem128, n1) == b"mod1 arg" and _cstr(mem128, n2) == b"two"


def test_multiboot_header_at_the_last_aligned_slot_of_8kib_is_found() -> None:
    img = make_elf(mb_offset=8192 - 12, data_offset=0x3000)
    assert multiboot.find_header(img).offset == 8192 - 12


# --- negatives ----------------------------------------------------------------------------------------------------
def test_image_without_multiboot_header_is_rejected(mem128: GuestMemory) -> None:
    with pytest.raises(NoMultibootHeader):
        multiboot.load_multiboot(mem128, make_elf(mb=bytes(12)))


def test_multiboot_header_with_bad_checksum_is_rejected(mem128: GuestMemory) -> None:
    with pytest.raises(NoMultibootHeader):
        multiboot.load_multiboot(mem128, make_elf(mb=mb_header(checksum=0x1234)))


def test_multiboot_header_past_the_first_8kib_is_not_found(mem128: GuestMemory) -> None:
    with pytest.raises(NoMultibootHeader):
        multiboot.load_multiboot(mem128, make_elf(mb_offset=8192, data_offset=0x3000))
    with pytest.raises(NoMultibootHeader):  # straddling the 8 KiB boundary does not count either (§3.1)
        multiboot.load_multiboot(mem128, make_elf(mb_offset=8192 - 8, data_offset=0x3000))


def test_multiboot_header_must_be_4_byte_aligned(mem128: GuestMemory) -> None:
    with pytest.raises(NoMultibootHeader):
        multiboot.load_multiboot(mem128, make_elf(mb_offset=0x82))


def test_multiboot_aout_kludge_is_refused(mem128: GuestMemory) -> None:
    with pytest.raises(LoaderError, match="a.out"):
        multiboot.load_multiboot(mem128, make_elf(mb=mb_header(flags=0x3 | multiboot.MB_FLAG_AOUT_KLUDGE)))


def test_multiboot_video_mode_request_is_refused(mem128: GuestMemory) -> None:
    with pytest.raises(LoaderError, match="video mode"):
        multiboot.load_multiboot(mem128, make_elf(mb=mb_header(flags=0x3 | 0x4)))


@pytest.mark.parametrize("paddr", [128 * MIB, 128 * MIB - 0x800, layout.PCI_MMIO32_START, 0xFFFF_F000])
def test_segment_outside_ram_is_image_too_large(mem128: GuestMemory, paddr: int) -> None:
    img = make_elf([(paddr, paddr, CODE, 0x1000)], entry=paddr)
    with pytest.raises(ImageTooLarge):
        multiboot.load_multiboot(mem128, img)


def test_bss_running_past_ram_is_image_too_large(mem128: GuestMemory) -> None:
    img = make_elf([(128 * MIB - 0x1000, 128 * MIB - 0x1000, CODE, 0x2000)], entry=128 * MIB - 0x1000)
    with pytest.raises(ImageTooLarge):
        multiboot.load_multiboot(mem128, img)


def test_segment_below_0x1000_is_refused(mem128: GuestMemory) -> None:
    with pytest.raises(BadElf, match="IVT"):
        multiboot.load_multiboot(mem128, make_elf([(0x800, 0x800, CODE, 0x10)], entry=0x800))
    assert mem128.read(0x800, len(CODE)) == bytes(len(CODE))


def test_truncated_elf_header_is_rejected() -> None:
    with pytest.raises(BadElf, match="truncated"):
        elf.parse_elf(make_elf()[:40])


def test_program_headers_past_eof_are_rejected(mem128: GuestMemory) -> None:
    img = make_elf()
    with pytest.raises(BadElf, match="past the end"):
        elf.parse_elf(img[:52 + 16])
    bad = bytearray(img)
    struct.pack_into("<I", bad, 28, len(img) - 16)  # e_phoff: the table's 32 bytes run 16 past EOF
    with pytest.raises(BadElf, match="past the end"):
        multiboot.load_multiboot(mem128, bytes(bad))


def test_segment_data_past_eof_is_rejected() -> None:
    img = make_elf(data_offset=0x2000)
    with pytest.raises(BadElf, match="past the end"):
        elf.parse_elf(img[: 0x2000 + 2])


def test_filesz_greater_than_memsz_is_rejected(mem128: GuestMemory) -> None:
    with pytest.raises(BadElf, match="exceeds memory size"):
        multiboot.load_multiboot(mem128, make_elf([(0x10_0000, 0x10_0000, CODE, 4)]))


@pytest.mark.parametrize("machine", [0, 40, 183])  # none, ARM, AArch64
def test_non_x86_machine_is_rejected(mem128: GuestMemory, machine: int) -> None:
    with pytest.raises(BadElf, match="not x86"):
        multiboot.load_multiboot(mem128, make_elf(machine=machine))


@pytest.mark.parametrize("blob", [b"", b"\x7fEL", b"MZ" + bytes(100), bytes(8192)], ids=["empty", "3-bytes", "pe",
                                                                                       "zeros"])
def test_not_an_elf_is_rejected(blob: bytes) -> None:
    with pytest.raises(NotAnElf):
        elf.parse_elf(blob)


def test_multiboot_header_in_a_non_elf_image_gives_not_an_elf(mem128: GuestMemory) -> None:
    blob = bytearray(4096)
    blob[0x40:0x4C] = mb_header()
    with pytest.raises(NotAnElf):
        multiboot.load_multiboot(mem128, bytes(blob))


@pytest.mark.parametrize("ei_class", [0, 3])
def test_unknown_elf_class_is_rejected(ei_class: int) -> None:
    with pytest.raises(BadElf, match="class"):
        elf.parse_elf(make_elf(ei_class=ei_class))


def test_big_endian_elf_is_rejected() -> None:
    img = bytearray(make_elf())
    img[5] = 2
    with pytest.raises(BadElf, match="little-endian"):
        elf.parse_elf(bytes(img))


def test_elf_without_load_segments_is_rejected() -> None:
    img = bytearray(make_elf())
    struct.pack_into("<I", img, 52, 4)  # PT_NOTE
    with pytest.raises(BadElf, match="no loadable"):
        elf.parse_elf(bytes(img))


def test_command_line_longer_than_the_mbi_area_is_too_large(mem128: GuestMemory) -> None:
    with pytest.raises(ImageTooLarge):
        multiboot.load_multiboot(mem128, make_elf(), cmdline="x" * multiboot.MBI_CMDLINE_MAX)
    multiboot.load_multiboot(mem128, make_elf(), cmdline="x" * (multiboot.MBI_CMDLINE_MAX - 1))


# ================================================================================================ Linux bzImage
SETUP_SECTS = 4
KERNEL = bytes((i * 7) & 0xFF for i in range(0x3000))


def make_bzimage(
    *,
    version: int = 0x020F,
    setup_sects: int = SETUP_SECTS,
    loadflags: int = linux.LOADED_HIGH,
    xloadflags: int = linux.XLF_KERNEL_64,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFF_FFFF,
    jump: int = 0x66,
    boot_flag: int = 0xAA55,
    magic: bytes = b"HdrS",
    kernel: bytes = KERNEL,
) -> bytes:
    setup = bytearray((max(setup_sects, 1) if setup_sects else 4) * 512 + 512)
    setup[linux.OFF_SETUP_SECTS] = setup_sects
    struct.pack_into("<H", setup, linux.OFF_BOOT_FLAG, boot_flag)
    setup[linux.OFF_JUMP : linux.OFF_JUMP + 2] = bytes([0xEB, jump])
    setup[linux.OFF_HEADER : linux.OFF_HEADER + 4] = magic
    struct.pack_into("<H", setup, linux.OFF_VERSION, version)
    setup[linux.OFF_LOADFLAGS] = loadflags
    struct.pack_into("<I", setup, linux.OFF_CODE32_START, 0x10_0000)
    struct.pack_into("<I", setup, linux.OFF_INITRD_ADDR_MAX, initrd_addr_max)
    struct.pack_into("<I", setup, linux.OFF_KERNEL_ALIGNMENT, 0x20_0000)
    setup[linux.OFF_RELOCATABLE] = 1
    struct.pack_into("<H", setup, linux.OFF_XLOADFLAGS, xloadflags)
    struct.pack_into("<I", setup, linux.OFF_CMDLINE_SIZE, cmdline_size)
    setup[linux.OFF_JUMP + 2 + jump] = 0xEE  # first byte past the header: must not be copied
    return bytes(setup) + kernel


def _bp(mem: GuestMemory) -> bytes:
    return mem.read(linux.BOOT_PARAMS_ADDR, 4096)


def test_linux_setup_header_is_parsed() -> None:
    h = linux.parse_setup_header(make_bzimage(initrd_addr_max=0x37FF_FFFF))
    assert h == linux.SetupHeader(SETUP_SECTS, 0x020F, linux.LOADED_HIGH, linux.XLF_KERNEL_64, 0x37FF_FFFF, 2047,
                                  0x202 + 0x66)


def test_linux_setup_sects_zero_means_four() -> None:
    assert linux.parse_setup_header(make_bzimage(setup_sects=0)).setup_sects == 4


def test_linux_boot_params_copy_the_setup_header_and_set_loader_fields(mem128: GuestMemory) -> None:
    img = make_bzimage()
    lk = linux.load_linux(mem128, img, "console=ttyS0")
    bp = _bp(mem128)
    end = 0x202 + 0x66
    # Copied verbatim from 0x1F1 to the end given by the jump, except the fields the loader owns.
    owned = {linux.OFF_TYPE_OF_LOADER, linux.OFF_LOADFLAGS} | set(range(linux.OFF_HEAP_END_PTR,
                                                                        linux.OFF_CMD_LINE_PTR + 4))
    for off in range(linux.OFF_SETUP_SECTS, end):
        if off not in owned:
            assert bp[off] == img[off], f"setup header byte 0x{off:x} not copied"
    assert bp[end] == 0  # nothing past the header
    assert bp[linux.OFF_TYPE_OF_LOADER] == 0xFF
    assert bp[linux.OFF_LOADFLAGS] == linux.LOADED_HIGH | linux.CAN_USE_HEAP
    assert struct.unpack_from("<H", bp, linux.OFF_HEAP_END_PTR)[0] == 0xFE00
    cmd_ptr = struct.unpack_from("<I", bp, linux.OFF_CMD_LINE_PTR)[0]
    assert _cstr(mem128, cmd_ptr) == b"console=ttyS0"
    assert struct.unpack_from("<II", bp, linux.OFF_RAMDISK_IMAGE) == (0, 0)
    assert lk == linux.LoadedLinux(0x10_0200, linux.BOOT_PARAMS_ADDR, 0x10_0000 + len(KERNEL), None)


def test_linux_kernel_bytes_land_at_1mib(mem128: GuestMemory) -> None:
    linux.load_linux(mem128, make_bzimage())
    assert mem128.read(linux.KERNEL_ADDR, len(KERNEL)) == KERNEL


def test_linux_initrd_is_page_aligned_below_initrd_addr_max_and_above_the_kernel(mem128: GuestMemory) -> None:
    initrd = bytes(range(256)) * 20 + b"tail"
    max_addr = 64 * MIB - 1
    lk = linux.load_linux(mem128, make_bzimage(initrd_addr_max=max_addr), initrd=initrd)
    assert lk.initrd is not None
    addr, size = lk.initrd
    assert size == len(initrd) and addr % 4096 == 0
    assert lk.kernel_end <= addr and addr + size <= max_addr + 1
    assert max_addr + 1 - (addr + size) < 4096  # as high as possible
    assert struct.unpack_from("<II", _bp(mem128), linux.OFF_RAMDISK_IMAGE) == (addr, size)
    assert mem128.read(addr, size) == initrd


def test_linux_initrd_stays_inside_ram_when_initrd_addr_max_is_above_it(mem128: GuestMemory) -> None:
    lk = linux.load_linux(mem128, make_bzimage(initrd_addr_max=0xFFFF_FFFF), initrd=b"r" * 10000)
    assert lk.initrd is not None
    addr, size = lk.initrd
    assert addr + size <= 128 * MIB and 128 * MIB - (addr + size) < 4096


def test_linux_e820_table_for_128mib(mem128: GuestMemory) -> None:
    linux.load_linux(mem128, make_bzimage())
    bp = _bp(mem128)
    n = bp[linux.OFF_E820_ENTRIES]
    table = [struct.unpack_from("<QQI", bp, linux.OFF_E820_TABLE + 20 * i) for i in range(n)]
    assert table == [(0, 0x9FC00, linux.E820_RAM), (0x9FC00, 0x400, linux.E820_RESERVED),
                     (0xE0000, 0x20000, linux.E820_RESERVED), (0x10_0000, 127 * MIB, linux.E820_RAM)]
    assert bp[linux.OFF_E820_TABLE + 20 * n : linux.OFF_E820_TABLE + 20 * n + 20] == bytes(20)


def test_linux_e820_table_includes_ram_above_4g() -> None:
    with GuestMemory.create([(0, 16 * MIB), (layout.HIGH_RAM_START, 8 * MIB)]) as m:
        linux.load_linux(m, make_bzimage())
        bp = _bp(m)
        n = bp[linux.OFF_E820_ENTRIES]
        assert n == 5
        assert struct.unpack_from("<QQI", bp, linux.OFF_E820_TABLE + 20 * 4) == (
            layout.HIGH_RAM_START, 8 * MIB, linux.E820_RAM)


def test_linux_cmdline_of_exactly_cmdline_size_fits(mem128: GuestMemory) -> None:
    linux.load_linux(mem128, make_bzimage(cmdline_size=16), "a" * 16)
    assert _cstr(mem128, linux.CMDLINE_ADDR) == b"a" * 16


# --- negatives ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"boot_flag": 0}, "0xAA55"),
        ({"magic": b"HdrX"}, "HdrS"),
        ({"version": 0x0205}, "2.05 < 2.06"),
        ({"version": 0x0200}, "2.00"),
        ({"xloadflags": 0}, "XLF_KERNEL_64"),
        ({"loadflags": 0}, "zImage"),
    ],
    ids=["no-aa55", "no-hdrs", "v2.05", "v2.00", "no-xlf-kernel-64", "loaded-low"],
)
def test_linux_unsupported_images_are_rejected(mem128: GuestMemory, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(BadBzImage, match=match):
        linux.load_linux(mem128, make_bzimage(**kwargs))  # type: ignore[arg-type]


def test_linux_image_smaller_than_a_setup_header_is_rejected() -> None:
    with pytest.raises(BadBzImage, match="too small"):
        linux.parse_setup_header(make_bzimage()[:0x200])


def test_linux_setup_sectors_past_eof_are_rejected() -> None:
    img = bytearray(make_bzimage(kernel=b""))
    img[linux.OFF_SETUP_SECTS] = 60
    with pytest.raises(BadBzImage, match="past the end"):
        linux.parse_setup_header(bytes(img))


def test_linux_cmdline_longer_than_cmdline_size_is_too_large(mem128: GuestMemory) -> None:
    with pytest.raises(ImageTooLarge, match="command line"):
        linux.load_linux(mem128, make_bzimage(cmdline_size=16), "a" * 17)


def test_linux_initrd_that_does_not_fit_below_initrd_addr_max_is_too_large(mem128: GuestMemory) -> None:
    img = make_bzimage(initrd_addr_max=0x10_0000 + len(KERNEL) + 0x2000 - 1)
    with pytest.raises(ImageTooLarge, match="initrd"):
        linux.load_linux(mem128, img, initrd=b"i" * 0x3000)
    with pytest.raises(ImageTooLarge, match="initrd"):  # bigger than all of RAM
        linux.load_linux(mem128, make_bzimage(), initrd=b"i" * (129 * MIB))


def test_linux_kernel_larger_than_ram_is_too_large() -> None:
    with GuestMemory.create([(0, 2 * MIB)]) as m, pytest.raises(ImageTooLarge, match="kernel"):
        linux.load_linux(m, make_bzimage(kernel=bytes(MIB + 1)))

# A real Debian bzImage is parsed and loaded by tests/integration/test_linux_boot.py (fetched by the fixture).


def _find_header_word_by_word(image: bytes) -> int | None:
    """The multiboot header search as the spec words it (§3.1.1): every 4-aligned slot of the first 8 KiB."""
    limit = min(len(image), 8192) - 12
    for off in range(0, max(limit + 1, 0), 4):
        magic, flags, checksum = struct.unpack_from("<III", image, off)
        if magic == multiboot.MULTIBOOT_MAGIC and (magic + flags + checksum) & 0xFFFF_FFFF == 0:
            return off
    return None


def test_multiboot_header_search_agrees_with_the_word_by_word_scan_on_tricky_images() -> None:
    import random

    rng = random.Random(11)
    magic = struct.pack("<I", multiboot.MULTIBOOT_MAGIC)
    for _ in range(400):
        img = bytearray(rng.randbytes(rng.choice([8, 13, 64, 4096, 8192, 8200, 9000])))
        for _k in range(rng.randint(0, 4)):  # magics at any alignment, some with a valid checksum
            off = rng.randrange(0, max(1, len(img) - 12))
            flags = rng.getrandbits(32)
            good = (-(multiboot.MULTIBOOT_MAGIC + flags)) & 0xFFFF_FFFF
            img[off:off + 12] = magic + struct.pack("<II", flags, good if rng.random() < 0.6 else good ^ 1)
        want = _find_header_word_by_word(bytes(img))
        if want is None:
            with pytest.raises(NoMultibootHeader):
                multiboot.find_header(bytes(img))
        else:
            assert multiboot.find_header(bytes(img)).offset == want
