"""devices.pam: the i440FX PAM registers as SeaBIOS's src/fw/shadow.c programs them, through config mechanism #1
on the port bus, and the MMIO sink for writes to write-protected shadow regions."""

from __future__ import annotations

import struct

import pytest

from devices.bus import pio_bus
from devices.pam import (
    REGIONS,
    SHADOW_START,
    Backing,
    Pam,
    PamHostBridge,
    PamRegion,
    ShadowWriteSink,
    Source,
    backing_for,
)
from devices.pci import PciConfigIo, PciRoot
from kvmcore.memory import GuestMemory

ROM_RW = Backing(Source.RAM, True, True)
RAM_RO = Backing(Source.RAM, False, False)
ROM = Backing(Source.ROM, False, False)


class Platform:
    def __init__(self) -> None:
        self.applied: list[tuple[PamRegion, Backing]] = []
        self.pam = Pam(lambda r, b: self.applied.append((r, b)))
        self.root = PciRoot(PamHostBridge(self.pam))
        self.bus = pio_bus()
        self.bus.insert(PciConfigIo(self.root), 0xCF8, 8)

    def writel(self, reg: int, value: int) -> None:  # SeaBIOS pci_config_writel(bdf 0, reg, value)
        self.bus.write(0xCF8, struct.pack("<I", 0x8000_0000 | reg))
        self.bus.write(0xCFC, struct.pack("<I", value))

    def readl(self, reg: int) -> int:
        self.bus.write(0xCF8, struct.pack("<I", 0x8000_0000 | reg))
        buf = memoryview(bytearray(4))
        self.bus.read(0xCFC, buf)
        return struct.unpack("<I", buf)[0]

    def readb(self, reg: int) -> int:
        self.bus.write(0xCF8, struct.pack("<I", 0x8000_0000 | (reg & ~3)))
        buf = memoryview(bytearray(1))
        self.bus.read(0xCFC + (reg & 3), buf)
        return buf[0]

    def backing_at(self, gpa: int) -> Backing:
        r = self.pam.region_at(gpa)
        assert r is not None
        return self.pam.backings[r.index]


def test_reset_state_shows_the_rom_alias_at_e0000_and_ram_below() -> None:
    p = Platform()
    assert len(p.applied) == len(REGIONS) == 13  # every region made real at start
    for gpa in (0xE0000, 0xE4000, 0xE8000, 0xEC000, 0xF0000, 0xFFFFF):
        assert p.backing_at(gpa) == ROM
    for gpa in (0xC0000, 0xD0000, 0xDC000):
        assert p.backing_at(gpa) == ROM_RW  # QEMU's pc.rom: RAM where no ROM is decoded
    assert p.readb(0x59) & 0x10 == 0  # SeaBIOS then runs __make_bios_writable_intel from the flash copy


def test_seabios_make_bios_writable_then_readonly() -> None:
    p = Platform()
    # __make_bios_writable_intel: pam[1..6] = 0x33, pam[0] = 0x30, written back as the dwords at 0x58 and 0x5C.
    d0 = p.readl(0x58)
    d1 = p.readl(0x5C)
    pam = bytearray(struct.pack("<II", d0, d1))
    pam[1] = 0x30
    pam[2:8] = b"\x33" * 6
    p.writel(0x58, struct.unpack_from("<I", pam, 0)[0])
    p.writel(0x5C, struct.unpack_from("<I", pam, 4)[0])
    for r in REGIONS:
        assert p.pam.backings[r.index] == ROM_RW, hex(r.gpa)
    # make_bios_readonly_intel with option ROMs up to 0xCC000: 0x11 for C0000-CFFFF (pam1, pam2), 0x31 where a
    # ROM ends mid-block, and 0x10 for the F-segment.
    pam[1] = 0x10
    pam[2] = 0x11
    pam[3] = 0x31
    p.writel(0x58, struct.unpack_from("<I", pam, 0)[0])
    p.writel(0x5C, struct.unpack_from("<I", pam, 4)[0])
    assert p.backing_at(0xF0000) == RAM_RO
    assert p.backing_at(0xC0000) == RAM_RO and p.backing_at(0xC4000) == RAM_RO
    assert p.backing_at(0xC8000) == RAM_RO and p.backing_at(0xCC000) == ROM_RW  # 0x31: low RO, high RW
    assert p.backing_at(0xD0000) == ROM_RW
    assert p.readb(0x59) == 0x10 and p.readb(0x5B) == 0x31


def test_only_writes_touching_pam_reach_the_state_machine() -> None:
    p = Platform()
    n = len(p.applied)
    p.writel(0x70, 0x00AA_0000)  # SMRAM byte: not a PAM register
    p.writel(0x04, 0x0000_0006)  # command register
    assert len(p.applied) == n
    assert p.pam.metrics.changes == 13


@pytest.mark.parametrize("mode, has_rom, expected", [
    (0, True, ROM), (1, True, RAM_RO), (2, True, Backing(Source.ROM, False, True)), (3, True, ROM_RW),
    (0, False, ROM_RW), (1, False, RAM_RO), (2, False, ROM_RW), (3, False, ROM_RW),
])
def test_mode_table(mode: int, has_rom: bool, expected: Backing) -> None:
    assert backing_for(mode, has_rom) == expected


def test_write_sink_drops_writes_to_protected_regions_and_carries_mode_2_into_ram() -> None:
    mem = GuestMemory.create([(0, 2 << 20)])
    try:
        p = Platform()
        rom = bytes(range(256)) * 512  # 128 KiB alias
        sink = ShadowWriteSink(p.pam, mem, lambda gpa, n: rom[gpa - 0xE0000 : gpa - 0xE0000 + n])
        sink.write(0xF0000 - SHADOW_START, b"x")  # mode 0: to the ROM, dropped
        assert mem.read(0xF0000, 1) == b"\0"
        assert p.pam.metrics.dropped_writes == 1
        p.pam.update(bytes([0x20, 0, 0, 0, 0, 0, 0]))  # F-segment mode 2: reads ROM, writes RAM
        sink.write(0xF0010 - SHADOW_START, b"hello")
        assert mem.read(0xF0010, 5) == b"hello"
        assert p.pam.metrics.shadow_writes == 1
        buf = memoryview(bytearray(4))
        sink.read(0xF0010 - SHADOW_START, buf)
        assert bytes(buf) == rom[0x10010:0x10014]  # reads still come from the ROM
        p.pam.update(bytes([0x10, 0, 0, 0, 0, 0, 0]))  # read-only RAM
        sink.write(0xF0010 - SHADOW_START, b"HELLO")
        assert mem.read(0xF0010, 5) == b"hello"
        sink.read(0xF0010 - SHADOW_START, buf)
        assert bytes(buf) == b"hell"
        sink.write(0xFFFFE - SHADOW_START, b"abcd")  # beyond the last region: dropped, no exception
        assert p.pam.metrics.dropped_writes == 3
    finally:
        mem.close()
