"""devices.fw_cfg: QEMU's fw_cfg as SeaBIOS (src/fw/paravirt.c) drives it, through the bus as a guest would."""

from __future__ import annotations

import random
import struct

import pytest

from devices import fw_cfg as f
from devices.bus import pio_bus
from kvmcore.acpi import AcpiPlatform, build_tables
from kvmcore.loader.e820 import E820_RAM, E820_RESERVED, firmware_e820_map
from kvmcore.memory import GuestMemory

RAM = 1 << 20
DESC = 0x1000  # where the tests put their FWCfgDmaAccess
BUF = 0x2000


@pytest.fixture
def mem():
    m = GuestMemory.create([(0, RAM)])
    yield m
    m.close()


def machine(fw: f.FwCfg):
    bus = pio_bus()
    bus.insert(fw.io, f.IO_PORT, f.IO_LENGTH)
    bus.insert(fw.dma, f.DMA_PORT, f.DMA_LENGTH)
    return bus


def select(bus, key: int) -> None:
    bus.write(f.IO_PORT, struct.pack("<H", key))  # SeaBIOS: outw(f, PORT_QEMU_CFG_CTL)


def insb(bus, n: int) -> bytes:
    out = bytearray()
    for _ in range(n):
        b = memoryview(bytearray(1))
        bus.read(f.IO_PORT + 1, b)
        out += b
    return bytes(out)


def dma(bus, mem: GuestMemory, control: int, length: int, address: int, desc: int = DESC) -> int:
    """SeaBIOS qemu_cfg_dma_transfer: descriptor in RAM, outl(cpu_to_be32(&access), 0x518); returns control."""
    mem.write(desc, f.DMA_ACCESS.pack(control, length, address))
    bus.write(f.DMA_PORT, struct.pack(">I", desc >> 32))
    bus.write(f.DMA_PORT + 4, struct.pack(">I", desc & 0xFFFF_FFFF))
    return mem.unpack_from(struct.Struct(">I"), desc)[0]


def file_dir(bus) -> dict[str, tuple[int, int]]:
    select(bus, f.FW_CFG_FILE_DIR)
    (count,) = struct.unpack(">I", insb(bus, 4))
    out = {}
    for _ in range(count):
        size, sel, _res, name = f.FILE_ENTRY.unpack(insb(bus, f.FILE_ENTRY.size))
        out[name.rstrip(b"\0").decode()] = (sel, size)
    return out


def test_signature_is_qemu_at_reset_and_after_select(mem):
    bus = machine(f.FwCfg(mem))
    assert insb(bus, 4) == b"QEMU"  # QEMU fw_cfg_reset selects the signature
    select(bus, f.FW_CFG_SIGNATURE)
    assert insb(bus, 6) == b"QEMU\0\0"  # reads past the end see 0


def test_id_advertises_dma_only_with_guest_memory(mem):
    bus = machine(f.FwCfg(mem))
    select(bus, f.FW_CFG_ID)
    assert struct.unpack("<I", insb(bus, 4))[0] == f.ID_TRADITIONAL | f.ID_DMA
    bus = machine(f.FwCfg(None))
    select(bus, f.FW_CFG_ID)
    assert struct.unpack("<I", insb(bus, 4))[0] == f.ID_TRADITIONAL


def test_dma_register_reads_the_qemu_cfg_signature(mem):
    bus = machine(f.FwCfg(mem))
    buf = memoryview(bytearray(4))
    bus.read(f.DMA_PORT, buf)
    assert bytes(buf) == b"QEMU"
    bus.read(f.DMA_PORT + 4, buf)
    assert bytes(buf) == b" CFG"


def test_file_dir_is_sorted_by_name_with_selectors_from_0x20(mem):
    fw = f.FwCfg(mem)
    fw.add_file("zz/last", b"1")
    fw.add_file("bootorder", b"abc")
    fw.add_file("etc/e820", bytes(40))
    bus = machine(fw)
    d = file_dir(bus)
    assert list(d) == ["bootorder", "etc/e820", "zz/last"]
    assert d == {"bootorder": (0x20, 3), "etc/e820": (0x21, 40), "zz/last": (0x22, 1)}
    select(bus, d["bootorder"][0])
    assert insb(bus, 3) == b"abc"


def test_unknown_key_reads_zero(mem):
    bus = machine(f.FwCfg(mem))
    select(bus, 0x1234)
    assert insb(bus, 3) == b"\0\0\0"
    assert dma(bus, mem, f.DMA_CTL_SELECT | f.DMA_CTL_READ | (0x1234 << 16), 4, BUF) == 0
    assert mem.read(BUF, 4) == bytes(4)


def test_dma_select_read_copies_the_item_and_clears_control(mem):
    fw = f.FwCfg(mem)
    fw.add_file("etc/x", bytes(range(200)))
    bus = machine(fw)
    mem.fill(BUF, 300, 0xAA)
    key = fw.file_key("etc/x")
    assert dma(bus, mem, (key << 16) | f.DMA_CTL_SELECT | f.DMA_CTL_READ, 100, BUF) == 0
    assert mem.read(BUF, 101) == bytes(range(100)) + b"\xaa"
    # The offset moved on: the next read continues, and past the end it zero-fills (QEMU behaviour).
    assert dma(bus, mem, f.DMA_CTL_READ, 150, BUF) == 0
    assert mem.read(BUF, 151) == bytes(range(100, 200)) + bytes(50) + b"\xaa"
    assert fw.metrics.dma_errors == 0


def test_dma_skip_then_read_like_seabios_qemu_cfg_read_file_with_skip(mem):
    fw = f.FwCfg(mem)
    fw.add_file("etc/y", b"0123456789")
    bus = machine(fw)
    select(bus, fw.file_key("etc/y"))
    assert dma(bus, mem, f.DMA_CTL_SKIP, 4, 0) == 0
    assert dma(bus, mem, f.DMA_CTL_READ, 3, BUF) == 0
    assert mem.read(BUF, 3) == b"456"


def test_dma_write_to_read_only_item_is_an_error_and_changes_nothing(mem):
    fw = f.FwCfg(mem)
    fw.add_file("etc/ro", b"keep")
    bus = machine(fw)
    mem.write(BUF, b"evil")
    ctl = dma(bus, mem, (fw.file_key("etc/ro") << 16) | f.DMA_CTL_SELECT | f.DMA_CTL_WRITE, 4, BUF)
    assert ctl == f.DMA_CTL_ERROR
    assert fw.file_data("etc/ro") == b"keep"


def test_dma_write_to_writable_item_updates_it_and_reports(mem):
    seen = []
    fw = f.FwCfg(mem)
    fw.add_file("etc/rw", bytes(8), writable=True, on_write=lambda off, data: seen.append((off, data)))
    bus = machine(fw)
    select(bus, fw.file_key("etc/rw"))
    assert dma(bus, mem, f.DMA_CTL_SKIP, 2, 0) == 0
    mem.write(BUF, b"hi")
    assert dma(bus, mem, f.DMA_CTL_WRITE, 2, BUF) == 0
    assert fw.file_data("etc/rw") == b"\0\0hi\0\0\0\0"
    assert seen == [(2, b"hi")]
    # A write that would grow the item is refused whole (QEMU: len != dma.length).
    mem.write(BUF, b"toolong")
    assert dma(bus, mem, f.DMA_CTL_WRITE, 7, BUF) == f.DMA_CTL_ERROR
    assert fw.file_data("etc/rw") == b"\0\0hi\0\0\0\0"


# ---- hostile descriptors: the error bit, never a host exception, never a write outside the buffer ----------
def test_dma_buffer_outside_ram_sets_error_and_writes_nothing(mem):
    fw = f.FwCfg(mem)
    fw.add_file("etc/z", bytes(range(16)))
    bus = machine(fw)
    ctl = dma(bus, mem, (fw.file_key("etc/z") << 16) | f.DMA_CTL_SELECT | f.DMA_CTL_READ, 16, RAM - 8)
    assert ctl == f.DMA_CTL_ERROR
    assert mem.read(RAM - 8, 8) == bytes(8)  # not even the part that was inside RAM
    assert fw.metrics.dma_errors == 1


def test_dma_huge_length_past_an_item_is_refused_without_allocating(mem):
    bus = machine(f.FwCfg(mem))
    # 4 GiB - 1 of zero-fill past the end of the signature: the range is checked first, so it fails at once.
    ctl = dma(bus, mem, f.DMA_CTL_READ, 0xFFFF_FFFF, BUF)
    assert ctl == f.DMA_CTL_ERROR


def test_dma_large_zero_fill_inside_ram_is_done_in_pieces(mem):
    bus = machine(f.FwCfg(mem))
    mem.fill(BUF, 300_001, 0x55)
    select(bus, 0x7777)  # nothing: all zero
    assert dma(bus, mem, f.DMA_CTL_READ, 300_000, BUF) == 0
    assert mem.read(BUF, 300_000) == bytes(300_000)
    assert mem.read_u8(BUF + 300_000) == 0x55


def test_dma_address_overflowing_64_bits_is_an_error(mem):
    bus = machine(f.FwCfg(mem))
    assert dma(bus, mem, f.DMA_CTL_READ, 16, (1 << 64) - 8) == f.DMA_CTL_ERROR


def test_dma_descriptor_outside_ram_is_counted_and_ignored(mem):
    fw = f.FwCfg(mem)
    bus = machine(fw)
    bus.write(f.DMA_PORT, struct.pack(">I", 0xFFFF_FFFF))
    bus.write(f.DMA_PORT + 4, struct.pack(">I", 0xFFFF_FFF8))
    assert fw.metrics.dma_lost == 1
    # Straddling the end of RAM: unreadable, and its control word cannot be written back either.
    bus.write(f.DMA_PORT, bytes(4))
    bus.write(f.DMA_PORT + 4, struct.pack(">I", RAM - 2))
    assert fw.metrics.dma_lost == 2
    assert fw.dma_address == 0  # the register resets after every transfer


def test_dma_descriptor_straddling_ram_end_but_control_inside_gets_error(mem):
    fw = f.FwCfg(mem)
    bus = machine(fw)
    desc = RAM - 8  # control and length inside RAM, address field outside
    bus.write(f.DMA_PORT, bytes(4))
    bus.write(f.DMA_PORT + 4, struct.pack(">I", desc))
    assert mem.read(desc, 4) == struct.pack(">I", f.DMA_CTL_ERROR)
    assert fw.metrics.dma_errors == 1


def test_eight_byte_dma_write_and_bad_widths(mem):
    fw = f.FwCfg(mem)
    fw.add_file("etc/q", b"xyz")
    mem.write(DESC, f.DMA_ACCESS.pack((fw.file_key("etc/q") << 16) | f.DMA_CTL_SELECT | f.DMA_CTL_READ, 3, BUF))
    fw.dma.write(0, struct.pack(">Q", DESC))  # the MMIO flavour's single 8-byte write
    assert mem.read(BUF, 3) == b"xyz"
    before = fw.metrics.invalid_access
    fw.dma.write(2, b"\0\0")
    fw.io.write(1, b"\x01")  # data-port write: ignored
    fw.io.write(0, b"\x01")  # 1-byte selector write: ignored
    buf = memoryview(bytearray(2))
    fw.io.read(1, buf)  # 2-byte data read
    assert bytes(buf) == b"\0\0"
    assert fw.metrics.invalid_access == before + 4


def test_random_descriptors_never_raise(mem):
    fw = f.FwCfg(mem)
    fw.add_file("etc/a", bytes(range(256)) * 4)
    fw.add_file("etc/b", b"b", writable=True)
    bus = machine(fw)
    rng = random.Random(10)
    edges = [0, 1, RAM - 16, RAM - 1, RAM, 1 << 32, (1 << 64) - 1]
    for _ in range(3000):
        control = rng.getrandbits(32)
        length = rng.choice([0, 1, 7, 4096, rng.getrandbits(32)])
        address = rng.choice(edges + [rng.getrandbits(64), rng.randrange(RAM)])
        desc = rng.choice([DESC, RAM - 12, RAM - 16, rng.getrandbits(64) & ~0x7])
        if mem.check_range(desc, 16) and not (DESC <= desc < DESC + 16):
            desc = DESC
        if mem.check_range(desc, 16):
            mem.write(desc, f.DMA_ACCESS.pack(control, length, address))
        bus.write(f.DMA_PORT, struct.pack(">I", desc >> 32))
        bus.write(f.DMA_PORT + 4, struct.pack(">I", desc & 0xFFFF_FFFF))
    assert fw.metrics.dma_transfers == 3000


# ---- host-side configuration errors -------------------------------------------------------------------------
def test_configuration_errors(mem):
    fw = f.FwCfg(mem)
    with pytest.raises(f.FwCfgConfigError):
        fw.add_i16(f.FW_CFG_SIGNATURE, 1)  # taken
    with pytest.raises(f.FwCfgConfigError):
        fw.add_i16(0x20, 1)  # a file selector
    with pytest.raises(f.FwCfgConfigError):
        fw.add_file("x" * 56, b"")
    fw.add_file("etc/dup", b"")
    with pytest.raises(f.FwCfgConfigError):
        fw.add_file("etc/dup", b"")
    with pytest.raises(f.FwCfgConfigError):
        f.pc_fw_cfg(mem, vcpus=1, e820=[], acpi_files=None, bootorder=["a\nb"])


# ---- what SeaBIOS reads from kvmdm's PC items ---------------------------------------------------------------
def test_pc_items_as_seabios_reads_them():
    big = GuestMemory.create([(0, 64 << 20), (1 << 32, 1 << 20)])
    try:
        tables = build_tables(AcpiPlatform(vcpus=2)).table_loader()
        fw = f.pc_fw_cfg(big, vcpus=2, e820=firmware_e820_map(big), acpi_files=tables,
                         bootorder=[f.virtio_blk_boot_path(1)], boot_fail_wait_ms=5000,
                         option_roms={"efi-virtio.rom": b"\x55\xaa"}, pci_roms={(0x1AF4, 0x1041): b"\x55\xaaROM"})
        bus = machine(fw)
        d = file_dir(bus)
        for name in ("etc/e820", "etc/table-loader", "etc/acpi/tables", "etc/acpi/rsdp", "bootorder",
                     "etc/boot-fail-wait", "etc/sercon-port", "genroms/efi-virtio.rom", "pci1af4,1041.rom"):
            assert name in d
        # qemu_early_e820: 20-byte entries; RAM below and above 4 GiB and KVM's pages reserved.
        sel, size = d["etc/e820"]
        select(bus, sel)
        raw = insb(bus, size)
        entries = [f.E820_ENTRY.unpack_from(raw, i) for i in range(0, size, f.E820_ENTRY.size)]
        assert (0, 64 << 20, E820_RAM) in entries
        assert (1 << 32, 1 << 20, E820_RAM) in entries
        assert (0xFEFF_C000, 0x4000, E820_RESERVED) in entries
        # romfile_loadint: little-endian integers.
        select(bus, d["etc/sercon-port"][0])
        assert struct.unpack("<H", insb(bus, 2))[0] == 0x3F8
        select(bus, d["etc/boot-fail-wait"][0])
        assert struct.unpack("<I", insb(bus, 4))[0] == 5000
        select(bus, d["bootorder"][0])
        assert insb(bus, d["bootorder"][1]) == b"/pci@i0cf8/scsi@1/disk@0,0\n\0"
        select(bus, f.FW_CFG_NB_CPUS)
        assert struct.unpack("<H", insb(bus, 2))[0] == 2
        select(bus, f.FW_CFG_MAX_CPUS)
        assert struct.unpack("<H", insb(bus, 2))[0] == 2
        # The table loader's files are what the linker produced, byte for byte.
        sel, size = d["etc/table-loader"]
        assert dma(bus, big, (sel << 16) | f.DMA_CTL_SELECT | f.DMA_CTL_READ, size, BUF) == 0
        assert big.read(BUF, size) == tables["etc/table-loader"]
    finally:
        big.close()
