"""The BIOS-style e820 memory map both loaders hand their kernel (Linux boot_params, multiboot mmap).

Low RAM stops at the EBDA (0x9FC00, which we leave empty but reserve as a BIOS would), the VGA/option-ROM hole is
left out, and the BIOS area 0xE0000-0xFFFFF is reserved: it holds the ACPI tables of a direct boot
(kvmcore.layout.ACPI_TABLES_ADDR), and firmware lives there later. RAM above 1 MiB and above 4 GiB follows.
"""

from __future__ import annotations

from kvmcore import layout
from kvmcore.memory import GuestMemory

E820_RAM = 1
E820_RESERVED = 2

EBDA_START = 0x9FC00
LEGACY_HOLE_START = 0xA0000
BIOS_AREA_START = layout.ACPI_TABLES_ADDR
BIOS_AREA_END = layout.ACPI_TABLES_END
HIGH_MEMORY_START = 0x10_0000


def e820_map(mem: GuestMemory) -> list[tuple[int, int, int]]:
    """[(base, size, type), ...] in address order for the RAM regions of ``mem``."""
    out: list[tuple[int, int, int]] = []
    for gpa, size in mem.regions():
        if gpa == 0:
            out.append((0, EBDA_START, E820_RAM))
            out.append((EBDA_START, LEGACY_HOLE_START - EBDA_START, E820_RESERVED))
            out.append((BIOS_AREA_START, BIOS_AREA_END - BIOS_AREA_START, E820_RESERVED))
            if size > HIGH_MEMORY_START:
                out.append((HIGH_MEMORY_START, size - HIGH_MEMORY_START, E820_RAM))
        else:
            out.append((gpa, size, E820_RAM))
    return out


def firmware_e820_map(mem: GuestMemory) -> list[tuple[int, int, int]]:
    """The map QEMU's fw_cfg ``etc/e820`` gives firmware (hw/i386/pc.c pc_memory_init, target/i386/kvm/kvm.c):
    every RAM region whole, and KVM's identity-map page plus real-mode TSS reserved. The firmware reserves what
    it uses itself (SeaBIOS: the EBDA, the BIOS area, the top 256 KiB of 4 GiB), so none of that is here."""
    out = [(gpa, size, E820_RAM) for gpa, size in mem.regions()]
    kvm_pages = layout.KVM_TSS_ADDR + 3 * 0x1000 - layout.KVM_IDENTITY_MAP_ADDR
    out.append((layout.KVM_IDENTITY_MAP_ADDR, kvm_pages, E820_RESERVED))
    return sorted(out)
