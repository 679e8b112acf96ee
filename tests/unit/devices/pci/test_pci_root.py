"""Bus 0, the i440FX host bridge, config mechanism #1 / ECAM, BAR decoding and placement."""

from __future__ import annotations

import struct

import pytest

from devices.bus import BusDevice, pio_bus
from devices.pci import config as c
from devices.pci.config import BarSpec, BarType, PciConfigError, PciConfiguration
from devices.pci.device import PciDevice
from devices.pci.root import (
    CONFIG_IO_PORT,
    CONFIG_IO_SIZE,
    ECAM_SIZE_BUS0,
    PciConfigIo,
    PciConfigMmio,
    PciRoot,
    assign_bars,
)
from devices.pci.testing import FakePlatform
from kvmcore import layout


class Dummy(PciDevice):
    """A function with a 32-bit MEM BAR 0, a 64-bit MEM BAR 2 and an I/O BAR 4 that records BAR traffic."""

    def __init__(self, platform: FakePlatform | None) -> None:
        cfg = PciConfiguration(vendor_id=0xABCD, device_id=0x0001, class_code=0xFF, subclass=0, interrupt_pin=1)
        cfg.add_bar(BarSpec(0, 0x1000, BarType.MEM32))
        cfg.add_bar(BarSpec(2, 0x10000, BarType.MEM64))
        cfg.add_bar(BarSpec(4, 0x20, BarType.IO))
        super().__init__(cfg, platform)
        self.moves: list[tuple[int, int | None, int | None]] = []
        self.writes: list[tuple[int, int, bytes]] = []

    def bar_read(self, bar: int, offset: int, data: memoryview) -> None:
        data[:] = struct.pack("<Q", 0x1122_3344_5566_7788 + bar)[: len(data)]

    def bar_write(self, bar: int, offset: int, data: bytes | memoryview) -> None:
        self.writes.append((bar, offset, bytes(data)))

    def on_bar_moved(self, bar: int, old: int | None, new: int | None) -> None:
        self.moves.append((bar, old, new))


class CfgPorts:
    """Driver-side access through ports 0xCF8/0xCFC, exactly as a guest would do it."""

    def __init__(self, root: PciRoot, on_reset=None) -> None:  # type: ignore[no-untyped-def]
        self.io = PciConfigIo(root, on_reset)
        self.bus = pio_bus()
        self.bus.insert(self.io, CONFIG_IO_PORT, CONFIG_IO_SIZE)

    def outl(self, port: int, v: int) -> None:
        self.bus.write(port, v.to_bytes(4, "little"))

    def inx(self, port: int, size: int) -> int:
        buf = bytearray(size)
        self.bus.read(port, memoryview(buf))
        return int.from_bytes(buf, "little")

    def read(self, slot: int, reg: int, size: int = 4, bus: int = 0, fn: int = 0) -> int:
        self.outl(0xCF8, (1 << 31) | (bus << 16) | (slot << 11) | (fn << 8) | (reg & 0xFC))
        return self.inx(0xCFC + (reg & 3), size)

    def write(self, slot: int, reg: int, value: int, size: int = 4) -> None:
        self.outl(0xCF8, (1 << 31) | (slot << 11) | (reg & 0xFC))
        self.bus.write(0xCFC + (reg & 3), value.to_bytes(size, "little"))


def test_host_bridge_at_00_0_is_an_i440fx() -> None:
    ports = CfgPorts(PciRoot())
    assert ports.read(0, 0) == 0x1237_8086
    assert ports.read(0, c.CLASS_CODE, 1) == 0x06
    assert ports.read(0, c.SUBCLASS, 1) == 0x00
    assert ports.read(0, c.HEADER_TYPE, 1) == 0x00
    assert ports.read(0, c.REVISION_ID, 1) == 0x02


def test_host_bridge_pam_registers_read_back_what_firmware_wrote() -> None:
    ports = CfgPorts(PciRoot())
    ports.write(0, 0x59, 0x30, size=1)
    ports.write(0, 0x5C, 0x3333_3333)
    assert ports.read(0, 0x59, 1) == 0x30
    assert ports.read(0, 0x5C) == 0x3333_3333
    assert ports.read(0, 0x58, 1) == 0  # 0x58 is not a PAM register


def test_config_address_latch_reads_back_without_reserved_low_bits() -> None:
    ports = CfgPorts(PciRoot())
    ports.outl(0xCF8, 0x8000_0003)
    assert ports.inx(0xCF8, 4) == 0x8000_0000  # Linux's pci_check_type1 probes exactly this


def test_data_port_reads_all_ones_and_ignores_writes_while_enable_bit_clear() -> None:
    root = PciRoot()
    ports = CfgPorts(root)
    ports.outl(0xCF8, 0x0000_0000)  # device 0, reg 0, enable clear
    assert ports.inx(0xCFC, 4) == 0xFFFF_FFFF
    ports.outl(0xCF8, 0x0000_003C)
    ports.bus.write(0xCFC, b"\x05\x00\x00\x00")
    assert ports.read(0, 0x3C, 1) == 0


@pytest.mark.parametrize("slot,fn,bus", [(7, 0, 0), (0, 1, 0), (0, 0, 1), (31, 7, 255)])
def test_absent_functions_read_all_ones_and_swallow_writes(slot: int, fn: int, bus: int) -> None:
    root = PciRoot()
    ports = CfgPorts(root)
    assert ports.read(slot, 0, bus=bus, fn=fn) == 0xFFFF_FFFF
    ports.outl(0xCF8, (1 << 31) | (bus << 16) | (slot << 11) | (fn << 8) | 4)
    ports.bus.write(0xCFC, b"\x07\x00")
    assert root.stats.absent_writes == 1
    assert root.stats.absent_reads == 1


def test_byte_and_word_data_accesses_address_the_register_of_their_lane() -> None:
    ports = CfgPorts(PciRoot())
    assert ports.read(0, 2, 2) == 0x1237  # word at 0xCFE = device ID
    assert ports.read(0, 1, 1) == 0x80  # byte at 0xCFD = vendor ID high byte
    assert ports.read(0, 0x0B, 1) == 0x06  # 0xCFF = class code
    assert ports.read(0, 1, 2) == 0x3780  # word at 0xCFD straddles vendor/device inside one dword


def test_non_dword_accesses_to_the_address_port_are_ignored() -> None:
    ports = CfgPorts(PciRoot())
    ports.outl(0xCF8, 0x8000_0800)
    ports.bus.write(0xCFB, b"\x01")  # Linux's type-1 probe pokes this byte
    ports.bus.write(0xCF8, b"\x00\x00")
    assert ports.inx(0xCF8, 4) == 0x8000_0800
    assert ports.inx(0xCF8, 2) == 0xFFFF
    assert ports.io.bad_accesses == 3


def test_reset_control_register_cf9_requests_a_reset_only_with_rst_cpu() -> None:
    resets: list[int] = []
    ports = CfgPorts(PciRoot(), on_reset=lambda: resets.append(1))
    ports.bus.write(0xCF9, b"\x02")
    assert resets == []
    ports.bus.write(0xCF9, b"\x06")
    assert resets == [1]
    assert ports.inx(0xCF9, 1) == 0


def test_ecam_decodes_device_function_register_like_mechanism_one() -> None:
    root = PciRoot()
    plat = FakePlatform()
    slot = root.add_device(Dummy(plat))
    ecam = PciConfigMmio(root)
    buf = bytearray(4)
    ecam.read((slot << 15) | 0, memoryview(buf))
    assert int.from_bytes(buf, "little") == 0x0001_ABCD
    ecam.read((slot << 15) | 0x100, memoryview(buf))  # extended config space: absent
    assert buf == b"\xff" * 4
    ecam.read((1 << 20) | (slot << 15), memoryview(buf))  # bus 1
    assert buf == b"\xff" * 4
    ecam.write((slot << 15) | c.INTERRUPT_LINE, b"\x0a")
    assert root.device(slot).config.interrupt_line == 0x0A  # type: ignore[union-attr]
    assert ECAM_SIZE_BUS0 == 1 << 20


def test_add_device_rejects_taken_and_invalid_slots() -> None:
    root = PciRoot()
    assert root.add_device(Dummy(None)) == 1
    with pytest.raises(PciConfigError):
        root.add_device(Dummy(None), slot=1)
    with pytest.raises(PciConfigError):
        root.add_device(Dummy(None), slot=32)
    with pytest.raises(PciConfigError):
        root.remove_device(0)  # the host bridge stays


def test_assign_bars_places_naturally_aligned_bars_and_enables_decoding() -> None:
    root = PciRoot()
    plat = FakePlatform()
    dev = Dummy(plat)
    slot = root.add_device(dev)
    placed = assign_bars(root)
    a0, a2, a4 = placed[(slot, 0)], placed[(slot, 2)], placed[(slot, 4)]
    assert layout.PCI_MMIO32_START <= a0 < layout.PCI_MMIO32_END and a0 % 0x1000 == 0
    assert layout.PCI_MMIO32_START <= a2 < layout.PCI_MMIO32_END and a2 % 0x10000 == 0
    assert a4 % 0x20 == 0 and 0xC000 <= a4 < 0x10000
    assert a0 + 0x1000 <= a2 or a2 + 0x10000 <= a0
    assert dev.config.memory_enabled() and dev.config.io_enabled()
    assert dev.bar_mapping(0) == a0 and dev.bar_mapping(2) == a2 and dev.bar_mapping(4) == a4
    assert plat.mmio_read(a2 + 8, 4) == 0x5566_7788 + 2
    buf = bytearray(1)
    plat.pio.read(a4, memoryview(buf))
    assert buf[0] == 0x88 + 4


def test_assign_bars_puts_64bit_bars_in_the_high_window_when_given() -> None:
    root = PciRoot()
    slot = root.add_device(Dummy(FakePlatform()))
    placed = assign_bars(root, mmio64=(layout.PCI_MMIO64_START, layout.PCI_MMIO64_START + (1 << 30)))
    assert placed[(slot, 2)] == layout.PCI_MMIO64_START
    assert placed[(slot, 0)] < 1 << 32


def test_assign_bars_fails_loudly_when_the_window_is_too_small() -> None:
    root = PciRoot()
    root.add_device(Dummy(FakePlatform()))
    with pytest.raises(PciConfigError):
        assign_bars(root, mmio32=(0xC000_0000, 0xC000_8000))


def test_guest_reprogramming_a_bar_moves_its_mapping() -> None:
    root = PciRoot()
    plat = FakePlatform()
    dev = Dummy(plat)
    slot = root.add_device(dev)
    ports = CfgPorts(root)
    ports.write(slot, c.BAR0, 0xD000_0000)
    assert dev.bar_mapping(0) is None  # memory decoding still off
    ports.write(slot, c.COMMAND, c.CMD_MEMORY_SPACE, size=2)
    assert dev.bar_mapping(0) == 0xD000_0000
    assert ("map_mmio", 0xD000_0000, 0x1000) in plat.calls
    ports.write(slot, c.BAR0, 0xD010_0000)
    assert dev.bar_mapping(0) == 0xD010_0000
    assert dev.moves[-2:] == [(0, None, 0xD000_0000), (0, 0xD000_0000, 0xD010_0000)]
    assert plat.mmio.get(0xD000_0000) is None
    plat.mmio_write(0xD010_0004, b"\x01\x02")
    assert dev.writes == [(0, 4, b"\x01\x02")]


def test_clearing_memory_decode_unmaps_and_setting_it_maps_again() -> None:
    root = PciRoot()
    plat = FakePlatform()
    dev = Dummy(plat)
    slot = root.add_device(dev)
    ports = CfgPorts(root)
    ports.write(slot, c.BAR0, 0xD000_0000)
    ports.write(slot, c.COMMAND, c.CMD_MEMORY_SPACE, size=2)
    ports.write(slot, c.COMMAND, 0, size=2)
    assert dev.bar_mapping(0) is None
    assert plat.mmio.devices() == []
    ports.write(slot, c.COMMAND, c.CMD_MEMORY_SPACE, size=2)
    assert dev.bar_mapping(0) == 0xD000_0000


def test_bar_placement_refused_by_the_platform_leaves_it_undecoded_and_counts() -> None:
    root = PciRoot()
    plat = FakePlatform()
    plat.mmio.insert(BusDevice(), 0xD000_0000, 0x1000)  # something else already lives there
    dev = Dummy(plat)
    slot = root.add_device(dev)
    ports = CfgPorts(root)
    ports.write(slot, c.BAR0, 0xD000_0000)
    ports.write(slot, c.COMMAND, c.CMD_MEMORY_SPACE, size=2)
    assert dev.bar_mapping(0) is None
    assert dev.pci_stats.bar_map_failures == 1
    ports.write(slot, c.BAR0, 0xD000_1000)  # the guest fixes its mistake
    assert dev.bar_mapping(0) == 0xD000_1000


def test_sizing_a_decoded_bar_does_not_raise_even_when_the_mask_lands_on_nonsense() -> None:
    root = PciRoot()
    plat = FakePlatform()
    dev = Dummy(plat)
    slot = root.add_device(dev)
    ports = CfgPorts(root)
    ports.write(slot, c.COMMAND, c.CMD_MEMORY_SPACE | c.CMD_IO_SPACE, size=2)
    for reg in range(c.BAR0, c.BAR0 + 24, 4):
        ports.write(slot, reg, 0xFFFF_FFFF)
    assert ports.read(slot, c.BAR0 + 16) == 0xFFFF_FFE1
    assert dev.bar_mapping(4) is None  # 0xFFFFFFE0 is no x86 port
    assert dev.pci_stats.bar_map_failures >= 1


def test_intx_follows_the_device_unless_the_command_register_disables_it() -> None:
    plat = FakePlatform()
    dev = Dummy(plat)
    dev.set_intx(True)
    assert plat.intx_level is True
    assert dev.config.status & c.STATUS_INTERRUPT
    dev.write_config(c.COMMAND, c.CMD_INTX_DISABLE.to_bytes(2, "little"))
    assert plat.intx_level is False
    assert dev.config.status & c.STATUS_INTERRUPT  # status still shows the request (§6.2.3)
    dev.write_config(c.COMMAND, b"\x00\x00")
    assert plat.intx_level is True
    dev.set_intx(False)
    assert plat.intx_level is False
    assert plat.calls_named("intx") == [("intx", True), ("intx", False), ("intx", True), ("intx", False)]


def test_remove_device_unmaps_its_bars() -> None:
    root = PciRoot()
    plat = FakePlatform()
    slot = root.add_device(Dummy(plat))
    assign_bars(root)
    root.remove_device(slot)
    assert plat.mmio.devices() == [] and plat.pio.devices() == []
