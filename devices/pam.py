"""The i440FX Programmable Attribute Map (Intel 82441FX PMC datasheet §3.2.18, "PAM0-PAM6"): what backs each
piece of 0xC0000-0xFFFFF, the shadow-RAM switch SeaBIOS uses to copy itself from ROM into RAM and write-protect it
(src/fw/shadow.c).

PAM0 bits 5:4 govern 0xF0000-0xFFFFF (64 KiB); PAM1..PAM6 hold two fields each, bits 1:0 for the lower and 5:4
for the upper 16 KiB of their 32 KiB, from 0xC0000 up. Each field: bit 0 RE (reads go to DRAM), bit 1 WE (writes
go to DRAM); a cycle not sent to DRAM goes to PCI, which on a PC means the BIOS ROM's alias where the chipset
decodes it (the last 128 KiB of the BIOS at 0xE0000-0xFFFFF, QEMU's "isa-bios").

What a region shows, per mode (QEMU hw/pci-host/pam.c makes the same four choices):

    mode 0  reads ROM, writes dropped        (reset state)
    mode 1  reads RAM, writes dropped        (SeaBIOS: 0x10 / 0x11 after make_bios_readonly)
    mode 2  reads ROM, writes reach RAM
    mode 3  reads RAM, writes reach RAM      (SeaBIOS: 0x30 / 0x33 while it runs from shadow RAM)

Where there is no ROM behind a region (0xC0000-0xDFFFF, or above a BIOS smaller than 128 KiB) modes 0 and 2 show
RAM that takes writes, as QEMU's "pc.rom" RAM does there.

This module is the state machine only: :class:`Pam` turns register values into a :class:`Backing` per region and
hands changes to an injected ``apply(region, backing)`` (kvmcore.firmware.FirmwareMemory switches KVM memory
slots). :class:`ShadowWriteSink` receives the MMIO exits a write to a read-only slot causes and carries out mode 2
(writes to RAM, through GuestMemory) or drops them (modes 0 and 1), counting both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from devices.bus import BusDevice
from devices.pci.root import I440FX_PAM0, I440fxHostBridge
from devices.ratelimit import RateLimitedLog
from kvmcore.memory import GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

PAM0_OFFSET = I440FX_PAM0  # config-space offset of PAM0; PAM6 is 0x5F
PAM_COUNT = 7
SHADOW_START = 0xC0000
SHADOW_END = 0x100000
RE = 0x1
WE = 0x2


@dataclass(frozen=True)
class PamRegion:
    index: int
    gpa: int
    size: int


def _regions() -> tuple[PamRegion, ...]:
    out = [PamRegion(0, 0xF0000, 0x10000)]
    for i in range(12):
        out.append(PamRegion(i + 1, SHADOW_START + i * 0x4000, 0x4000))
    return tuple(out)


# Region 0 is PAM0's upper field (0xF0000); regions 1..12 are 0xC0000 + 16 KiB * (i - 1): PAM(1 + (i-1)//2),
# lower field for even (i-1), upper for odd.
REGIONS = _regions()


class Source(Enum):
    RAM = "ram"
    ROM = "rom"


@dataclass(frozen=True)
class Backing:
    """What a region shows: reads come from ``source``; ``writable`` means guest writes land in KVM's slot
    directly (RAM read-write); otherwise they exit to the ShadowWriteSink, which ``writes_to_ram`` decides."""

    source: Source
    writable: bool
    writes_to_ram: bool


def field_mode(pam: bytes, region: PamRegion) -> int:
    """The 2-bit mode of ``region`` from the 7 PAM bytes."""
    if region.index == 0:
        return (pam[0] >> 4) & 0x3
    k = region.index - 1
    return (pam[1 + k // 2] >> (4 if k % 2 else 0)) & 0x3


def backing_for(mode: int, has_rom: bool) -> Backing:
    if not has_rom and not mode & RE:
        return Backing(Source.RAM, True, True)  # QEMU's pc.rom: plain RAM where no ROM is decoded
    if mode == 3:
        return Backing(Source.RAM, True, True)
    if mode == 1:
        return Backing(Source.RAM, False, False)
    if mode == 2:
        return Backing(Source.ROM, False, True)
    return Backing(Source.ROM, False, False)


@dataclass
class PamMetrics:
    changes: int = 0  # region backings switched
    dropped_writes: int = 0  # guest writes into a write-protected region
    shadow_writes: int = 0  # mode-2 writes carried into RAM


class Pam:
    """``rom_floor``: the lowest address with the BIOS's ISA alias behind it (0xE0000 for a BIOS of 128 KiB or
    more). ``apply(region, backing)`` makes a region's backing real; it is called for every region at start."""

    def __init__(self, apply: Callable[[PamRegion, Backing], None], rom_floor: int = 0xE0000) -> None:
        self._apply = apply
        self.rom_floor = rom_floor
        self.registers = bytes(PAM_COUNT)
        self.backings: dict[int, Backing] = {}
        self.metrics = PamMetrics()
        for r in REGIONS:
            self._set(r, backing_for(0, self.has_rom(r)))

    def has_rom(self, region: PamRegion) -> bool:
        return region.gpa >= self.rom_floor

    def _set(self, region: PamRegion, backing: Backing) -> None:
        if self.backings.get(region.index) == backing:
            return
        self.backings[region.index] = backing
        self.metrics.changes += 1
        self._apply(region, backing)

    def update(self, registers: bytes) -> None:
        """The host bridge's PAM0..PAM6 after a config write (7 bytes)."""
        registers = bytes(registers[:PAM_COUNT])
        if registers == self.registers:
            return
        self.registers = registers
        for r in REGIONS:
            self._set(r, backing_for(field_mode(registers, r), self.has_rom(r)))

    def region_at(self, gpa: int) -> PamRegion | None:
        for r in REGIONS:
            if r.gpa <= gpa < r.gpa + r.size:
                return r
        return None


class ShadowWriteSink(BusDevice):
    """MMIO 0xC0000-0xFFFFF as the bus sees it: only accesses KVM could not complete in a memory slot get here,
    i.e. writes to a read-only region. Mode 2 carries them into RAM; the others drop them. Reads (only possible
    while a slot is being switched) are answered from RAM or the ROM image as the region's backing says."""

    def __init__(self, pam: Pam, mem: GuestMemory, rom_alias: Callable[[int, int], bytes]) -> None:
        self.pam = pam
        self.mem = mem
        self._rom_alias = rom_alias  # (gpa, length) -> ROM bytes shown there
        self._log = RateLimitedLog(log, per_second=5)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        gpa = SHADOW_START + offset
        region = self.pam.region_at(gpa)
        if region is None or gpa + len(data) > region.gpa + region.size:
            self.pam.metrics.dropped_writes += 1
            return
        backing = self.pam.backings[region.index]
        if not backing.writes_to_ram:
            self.pam.metrics.dropped_writes += 1
            self._log.debug("pam: dropped write to write-protected %#x", gpa)
            return
        try:
            self.mem.write(gpa, data)
            self.pam.metrics.shadow_writes += 1
        except GuestMemoryError:
            self.pam.metrics.dropped_writes += 1

    def read(self, offset: int, data: memoryview) -> None:
        gpa = SHADOW_START + offset
        region = self.pam.region_at(gpa)
        if region is None or gpa + len(data) > region.gpa + region.size:
            data[:] = b"\xff" * len(data)
            return
        try:
            if self.pam.backings[region.index].source is Source.ROM:
                data[:] = self._rom_alias(gpa, len(data))
            else:
                self.mem.read_into(gpa, data)
        except (GuestMemoryError, ValueError):
            data[:] = b"\xff" * len(data)


class PamHostBridge(I440fxHostBridge):
    """The i440FX host bridge of a firmware-booted guest: after every config write touching PAM0..PAM6 the seven
    registers go to ``pam.update`` (SeaBIOS writes them as the dwords at 0x58 and 0x5C)."""

    def __init__(self, pam: Pam) -> None:
        super().__init__()
        self.pam = pam

    def write_config(self, offset: int, data: bytes | memoryview) -> None:
        super().write_config(offset, data)
        if offset < PAM0_OFFSET + PAM_COUNT and offset + len(data) > PAM0_OFFSET:
            regs = memoryview(bytearray(4))
            pam = bytearray()
            for dword in (0x58, 0x5C):
                self.read_config(dword, regs)
                pam += regs
            self.pam.update(bytes(pam[1 : 1 + PAM_COUNT]))
