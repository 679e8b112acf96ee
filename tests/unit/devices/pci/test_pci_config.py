"""PciConfiguration: masks, W1C, BAR sizing, capability list, all-ones for malformed accesses (PCI LB 3.0 §6)."""

from __future__ import annotations

import pytest

from devices.pci import config as c
from devices.pci.config import BarSpec, BarType, PciConfigError, PciConfiguration


def make(**kw: int) -> PciConfiguration:
    args = dict(vendor_id=0x1234, device_id=0x5678, class_code=0x02, subclass=0x00, revision=3, interrupt_pin=1)
    args.update(kw)
    return PciConfiguration(**args)


def w(cfg: PciConfiguration, off: int, size: int, value: int) -> bool:
    return cfg.write(off, value.to_bytes(size, "little"))


def test_identity_registers_read_back_and_ignore_guest_writes() -> None:
    cfg = make()
    assert cfg.read(c.VENDOR_ID, 2) == 0x1234
    assert cfg.read(c.DEVICE_ID, 2) == 0x5678
    assert cfg.read(0, 4) == 0x5678_1234
    assert cfg.read(c.CLASS_CODE, 1) == 0x02
    assert cfg.read(c.REVISION_ID, 1) == 3
    w(cfg, 0, 4, 0xFFFF_FFFF)
    w(cfg, 8, 4, 0)
    assert cfg.read(0, 4) == 0x5678_1234
    assert cfg.read(c.REVISION_ID, 1) == 3


@pytest.mark.parametrize(
    "offset,size",
    [(256, 4), (255, 2), (0x40, 3), (3, 2), (2, 4), (-1, 1), (0, 8), (0, 0), (1000, 1)],
)
def test_malformed_or_out_of_range_reads_are_all_ones_and_counted(offset: int, size: int) -> None:
    cfg = make()
    before = cfg.stats.bad_accesses
    buf = bytearray(size)
    cfg.read_into(offset, memoryview(buf))
    assert buf == b"\xff" * size
    assert cfg.stats.bad_accesses == before + 1


@pytest.mark.parametrize("offset,size", [(256, 4), (0x3, 2), (0x4, 3), (0x6, 4), (-4, 4)])
def test_malformed_writes_change_nothing_and_are_counted(offset: int, size: int) -> None:
    cfg = make()
    snapshot = [cfg.read(o, 4) for o in range(0, 256, 4)]
    assert cfg.write(offset, b"\xff" * size) is False
    assert cfg.stats.bad_accesses == 1
    assert [cfg.read(o, 4) for o in range(0, 256, 4)] == snapshot


def test_command_register_keeps_only_defined_writable_bits() -> None:
    cfg = make()
    w(cfg, c.COMMAND, 2, 0xFFFF)
    assert cfg.command == c.COMMAND_WRITABLE
    assert cfg.memory_enabled() and cfg.io_enabled() and cfg.intx_disabled()
    w(cfg, c.COMMAND, 2, 0)
    assert cfg.command == 0


def test_status_error_bits_are_write_one_to_clear() -> None:
    cfg = make()
    cfg.set_status_error_bits(c.STATUS_W1C)
    w(cfg, c.STATUS, 2, 0)  # writing 0 clears nothing
    assert cfg.status & c.STATUS_W1C == c.STATUS_W1C
    w(cfg, c.STATUS, 2, 1 << 13)  # clear only "received master abort"
    assert cfg.status & c.STATUS_W1C == c.STATUS_W1C & ~(1 << 13)
    # A dword write to command also hits status: command bits set, status bits cleared.
    w(cfg, c.COMMAND, 4, (c.STATUS_W1C << 16) | c.CMD_MEMORY_SPACE)
    assert cfg.status & c.STATUS_W1C == 0
    assert cfg.memory_enabled()


def test_status_cap_list_and_interrupt_bits_are_read_only() -> None:
    cfg = make()
    cfg.add_capability(bytes([0x09, 0, 4, 0]))
    cfg.set_interrupt_status(True)
    w(cfg, c.STATUS, 2, 0xFFFF)
    assert cfg.status & c.STATUS_CAP_LIST
    assert cfg.status & c.STATUS_INTERRUPT
    cfg.set_interrupt_status(False)
    assert not cfg.status & c.STATUS_INTERRUPT


def test_mem32_bar_sizing_reads_back_size_mask_with_type_bits() -> None:
    cfg = make()
    cfg.add_bar(BarSpec(1, 0x4000, BarType.MEM32, prefetchable=True))
    off = c.BAR0 + 4
    assert cfg.read(off, 4) == c.BAR_MEM_PREFETCHABLE
    w(cfg, off, 4, 0xFFFF_FFFF)
    assert cfg.read(off, 4) == 0xFFFF_C000 | c.BAR_MEM_PREFETCHABLE
    w(cfg, off, 4, 0xC000_1234)  # low address bits below the size are not writable
    assert cfg.bar_address(1) == 0xC000_0000
    assert cfg.read(off, 4) == 0xC000_0000 | c.BAR_MEM_PREFETCHABLE


def test_mem64_bar_sizing_spans_two_dwords() -> None:
    cfg = make()
    cfg.add_bar(BarSpec(0, 0x8000, BarType.MEM64))
    w(cfg, c.BAR0, 4, 0xFFFF_FFFF)
    w(cfg, c.BAR0 + 4, 4, 0xFFFF_FFFF)
    assert cfg.read(c.BAR0, 4) == 0xFFFF_8000 | c.BAR_MEM_TYPE_64
    assert cfg.read(c.BAR0 + 4, 4) == 0xFFFF_FFFF
    w(cfg, c.BAR0, 4, 0x0001_0000)
    w(cfg, c.BAR0 + 4, 4, 0x10)
    assert cfg.bar_address(0) == 0x10_0001_0000


def test_huge_mem64_bar_masks_the_high_dword_too() -> None:
    cfg = make()
    cfg.add_bar(BarSpec(2, 1 << 33, BarType.MEM64))
    w(cfg, c.BAR0 + 8, 4, 0xFFFF_FFFF)
    w(cfg, c.BAR0 + 12, 4, 0xFFFF_FFFF)
    assert cfg.read(c.BAR0 + 8, 4) == c.BAR_MEM_TYPE_64  # no writable address bits below 8 GiB
    assert cfg.read(c.BAR0 + 12, 4) == 0xFFFF_FFFE


def test_io_bar_sizing_keeps_io_space_bit() -> None:
    cfg = make()
    cfg.add_bar(BarSpec(4, 0x20, BarType.IO))
    off = c.BAR0 + 16
    assert cfg.read(off, 4) == c.BAR_IO_SPACE
    w(cfg, off, 4, 0xFFFF_FFFF)
    assert cfg.read(off, 4) == 0xFFFF_FFE0 | c.BAR_IO_SPACE
    w(cfg, off, 4, 0xC040)
    assert cfg.bar_address(4) == 0xC040


def test_unimplemented_bar_and_expansion_rom_read_zero_after_all_ones() -> None:
    cfg = make()
    w(cfg, c.BAR0 + 20, 4, 0xFFFF_FFFF)
    w(cfg, c.EXPANSION_ROM, 4, 0xFFFF_FFFF)
    assert cfg.read(c.BAR0 + 20, 4) == 0
    assert cfg.read(c.EXPANSION_ROM, 4) == 0


@pytest.mark.parametrize(
    "spec",
    [
        BarSpec(0, 0x3000, BarType.MEM32),  # not a power of two
        BarSpec(0, 8, BarType.MEM32),  # below the 16-byte minimum
        BarSpec(0, 2, BarType.IO),
        BarSpec(0, 512, BarType.IO),
        BarSpec(5, 0x1000, BarType.MEM64),  # needs two slots
        BarSpec(6, 0x1000, BarType.MEM32),
        BarSpec(0, 0x100, BarType.IO, prefetchable=True),
    ],
)
def test_add_bar_rejects_invalid_host_layouts(spec: BarSpec) -> None:
    with pytest.raises(PciConfigError):
        make().add_bar(spec)


def test_add_bar_rejects_slot_taken_by_upper_half_of_64bit_bar() -> None:
    cfg = make()
    cfg.add_bar(BarSpec(0, 0x1000, BarType.MEM64))
    with pytest.raises(PciConfigError):
        cfg.add_bar(BarSpec(1, 0x1000, BarType.MEM32))
    with pytest.raises(PciConfigError):
        cfg.add_bar(BarSpec(0, 0x1000, BarType.MEM32))


def test_set_bar_address_rejects_unaligned_or_out_of_range() -> None:
    cfg = make()
    cfg.add_bar(BarSpec(0, 0x1000, BarType.MEM32))
    with pytest.raises(PciConfigError):
        cfg.set_bar_address(0, 0x1800)
    with pytest.raises(PciConfigError):
        cfg.set_bar_address(0, 1 << 32)
    with pytest.raises(PciConfigError):
        cfg.set_bar_address(3, 0)
    cfg.set_bar_address(0, 0xC000_0000)
    assert cfg.bar_address(0) == 0xC000_0000


def test_capability_list_is_linked_from_pointer_and_sets_cap_list_status() -> None:
    cfg = make()
    assert not cfg.status & c.STATUS_CAP_LIST
    assert cfg.read(c.CAPABILITIES_POINTER, 1) == 0
    a = cfg.add_capability(bytes([0x09, 0x77, 6, 1, 2, 3]))
    b = cfg.add_capability(bytes([0x11, 0, 0, 0]))
    assert cfg.status & c.STATUS_CAP_LIST
    assert cfg.read(c.CAPABILITIES_POINTER, 1) == a == c.FIRST_CAPABILITY
    assert b == a + 8  # 6 bytes rounded to a dword
    assert cfg.read(a, 1) == 0x09
    assert cfg.read(a + 1, 1) == b  # the caller's next byte is replaced by the link
    assert cfg.read(b + 1, 1) == 0
    assert cfg.read(a + 2, 2) == 0x0106
    assert cfg.read(a + 4, 2) == 0x0302


def test_capability_bytes_are_read_only_unless_masked_writable() -> None:
    cfg = make()
    off = cfg.add_capability(bytes([0x09, 0, 0xAA, 0xBB]), writable=bytes([0xFF, 0xFF, 0x0F, 0]))
    w(cfg, off, 4, 0xFFFF_FFFF)
    assert cfg.read(off, 1) == 0x09  # ID stays, whatever the mask says
    assert cfg.read(off + 1, 1) == 0  # so does the link
    assert cfg.read(off + 2, 1) == 0xAF
    assert cfg.read(off + 3, 1) == 0xBB


def test_capability_space_overflow_is_a_host_error() -> None:
    cfg = make()
    with pytest.raises(PciConfigError):
        for _ in range(100):
            cfg.add_capability(bytes(16))
    with pytest.raises(PciConfigError):
        cfg.add_capability(bytes([1]))
    with pytest.raises(PciConfigError):
        cfg.add_capability(bytes(4), writable=bytes(3))


def test_interrupt_line_is_writable_and_pin_is_not() -> None:
    cfg = make()
    w(cfg, c.INTERRUPT_LINE, 4, 0xFFFF_FF0B)
    assert cfg.interrupt_line == 0x0B
    assert cfg.interrupt_pin == 1
    assert cfg.read(c.INTERRUPT_LINE + 2, 2) == 0
