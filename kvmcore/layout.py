"""The x86 guest-physical memory map, in one place, chosen so firmware (SeaBIOS) can run on it later.

    0x0000_0000 .. 0x0009_FFFF   low RAM (real-mode IVT, BDA, EBDA)
    0x000A_0000 .. 0x000D_FFFF   legacy VGA/option-ROM hole (RAM here)
    0x000E_0000 .. 0x000F_FFFF   BIOS area, reserved in e820: ACPI tables of a direct boot, RSDP at 0xE0000
    0x0010_0000 .. LOW_RAM_END   RAM (kernels load at 1 MiB)
    PCI_MMIO32_START .. 0xFEBF_FFFF   32-bit PCI BARs
    0xFEC0_0000                  IOAPIC (in-kernel)
    0xFEE0_0000                  LAPIC (in-kernel)
    0xFEFF_C000                  KVM identity-map page, then 3 pages of KVM's real-mode TSS (QEMU's choice)
    0xFF00_0000 .. +64 KiB       test device scratch MMIO (QEMU pc-testdev compatible)
    0xFFFC_0000 .. 0xFFFF_FFFF   firmware (BIOS) image, when one is loaded
    4 GiB ..                     RAM above the PCI hole
    PCI_MMIO64_START ..          64-bit PCI window (PCI_MMIO64_SIZE), as described to the guest in ACPI

The port-I/O map and the interrupt wiring of the platform devices are here too, because three places must agree
on them: the devices (daemon.vmm puts them on the bus), the ACPI tables that describe them (kvmcore.acpi), and
firmware later.
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
PCI_MMIO64_SIZE = 64 * GIB
IOAPIC_PINS = 24  # KVM's in-kernel IOAPIC (KVM_IOAPIC_NUM_PINS), GSI base 0

# Direct boot: the ACPI tables (kvmcore.acpi) are written here, RSDP first, in the BIOS area Linux scans
# (Documentation/arch/x86/boot.rst acpi_rsdp_addr says where it is too). Reserved in e820 up to 1 MiB.
ACPI_TABLES_ADDR = 0x000E_0000
ACPI_TABLES_END = 0x0010_0000

# ---- port I/O and ISA interrupts (ISA IRQ n is GSI n: identity-mapped onto the IOAPIC, MADT ISOs aside)
I8042_PORT = 0x60
RTC_PORT, RTC_IRQ = 0x70, 8
TESTDEV_PORT = 0xE0
COM1_PORT, COM1_IRQ = 0x3F8, 4
DEBUG_EXIT_PORT = 0x501
PCI_CONFIG_PORT = 0xCF8
# ACPI fixed-hardware PM block (devices.acpi_pm), at QEMU's PIIX4/ICH9 base: PM1a event block (2 bytes status +
# 2 bytes enable), PM1a control block, 32-bit PM timer. Linux prints "ACPI: PM-Timer IO Port: 0x608".
ACPI_PM_BASE = 0x600
ACPI_PM1_EVT_OFFSET, ACPI_PM1_EVT_LEN = 0, 4
ACPI_PM1_CNT_OFFSET, ACPI_PM1_CNT_LEN = 4, 2
ACPI_PM_TMR_OFFSET, ACPI_PM_TMR_LEN = 8, 4
ACPI_PM_LENGTH = 12
ACPI_SCI_IRQ = 9  # level-triggered, active-high (MADT ISO), as on PIIX4
ACPI_S5_SLP_TYP = 0  # \_S5 = Package {0, 0, 0, 0}: SLP_TYP 0 is soft-off, as on QEMU's PIIX4
# FADT RESET_REG: the PIIX reset control register behind devices.pci.PciConfigIo (bit 2 resets the CPU).
ACPI_RESET_PORT = 0xCF9
ACPI_RESET_VALUE = 0x06
# PCI INTx: IOAPIC pins 16..23, swizzled by slot (the _PRT in the DSDT lists every slot and pin).
PCI_INTX_GSI_BASE = 16
PCI_INTX_GSI_COUNT = 8


def ram_layout(mem_size: int) -> list[tuple[int, int]]:
    """Split mem_size bytes of guest RAM around the 32-bit PCI hole: [(gpa, size), ...]."""
    if mem_size <= 0 or mem_size % 4096:
        raise ValueError(f"guest memory size must be a positive multiple of 4 KiB, got {mem_size}")
    if mem_size <= LOW_RAM_END:
        return [(0, mem_size)]
    return [(0, LOW_RAM_END), (HIGH_RAM_START, mem_size - LOW_RAM_END)]


def pci_intx_gsi(slot: int, pin: int, base: int = PCI_INTX_GSI_BASE, count: int = PCI_INTX_GSI_COUNT) -> int:
    """The GSI INTx pin ``pin`` (0-3 = INTA#-INTD#) of PCI slot ``slot`` on bus 0 is wired to: the usual
    rotation across slots (PCI-to-PCI Bridge spec §9.1), onto ``count`` IOAPIC pins from ``base``."""
    if not 0 <= slot < 32 or not 0 <= pin < 4:
        raise ValueError(f"PCI slot {slot} / INTx pin {pin} out of range (0-31 / 0-3)")
    return base + (slot + pin) % count
