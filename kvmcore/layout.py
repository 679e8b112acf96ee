"""The x86 guest-physical memory map, in one place, chosen so firmware (SeaBIOS) can run on it later.

    0x0000_0000 .. 0x0009_FFFF   low RAM (real-mode IVT, BDA, EBDA)
    0x000A_0000 .. 0x000F_FFFF   legacy VGA/option-ROM/BIOS hole (RAM here, reserved in e820)
    0x0010_0000 .. LOW_RAM_END   RAM (kernels load at 1 MiB)
    PCI_MMIO32_START .. 0xFEBF_FFFF   32-bit PCI BARs
    0xFEC0_0000                  IOAPIC (in-kernel)
    0xFEE0_0000                  LAPIC (in-kernel)
    0xFEFF_C000                  KVM identity-map page, then 3 pages of KVM's real-mode TSS (QEMU's choice)
    0xFF00_0000 .. +64 KiB       test device scratch MMIO (QEMU pc-testdev compatible)
    0xFFFC_0000 .. 0xFFFF_FFFF   firmware (BIOS) image, when one is loaded
    4 GiB ..                     RAM above the PCI hole
"""

from __future__ import annotations

MIB = 1 << 20
GIB = 1 << 30

LOW_RAM_END = 0xC000_0000  # RAM below 4 GiB stops here; the rest goes above 4 GiB
PCI_MMIO32_START = 0xC000_0000
PCI_MMIO32_END = 0xFEC0_0000
IOAPIC_BASE = 0xFEC0_0000
LAPIC_BASE = 0xFEE0_0000
KVM_IDENTITY_MAP_ADDR = 0xFEFF_C000
KVM_TSS_ADDR = 0xFEFF_D000
TESTDEV_MMIO_BASE = 0xFF00_0000
TESTDEV_MMIO_SIZE = 0x1_0000
BIOS_END = 1 << 32
HIGH_RAM_START = 1 << 32
PCI_MMIO64_START = 1 << 40  # 64-bit BARs, well above any RAM we hand out


def ram_layout(mem_size: int) -> list[tuple[int, int]]:
    """Split mem_size bytes of guest RAM around the 32-bit PCI hole: [(gpa, size), ...]."""
    if mem_size <= 0 or mem_size % 4096:
        raise ValueError(f"guest memory size must be a positive multiple of 4 KiB, got {mem_size}")
    if mem_size <= LOW_RAM_END:
        return [(0, mem_size)]
    return [(0, LOW_RAM_END), (HIGH_RAM_START, mem_size - LOW_RAM_END)]
