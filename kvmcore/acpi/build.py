"""Build kvmdm's ACPI table set from a description of the platform (QEMU's hw/i386/acpi-build.c in miniature).

The result is relocatable (:class:`kvmcore.acpi.linker.AcpiTables`): ``place(gpa)`` for a direct kernel boot,
``table_loader()`` for firmware. What the tables say follows QEMU's PIIX4 "pc" machine and Firecracker:

* RSDP (revision 2) -> RSDT and XSDT, each listing FADT and MADT; FADT -> FACS and DSDT.
* MADT: one enabled Local APIC per vCPU (APIC id = ACPI uid = vCPU index), the IOAPIC, ISA IRQ 0 -> GSI 2 (the
  PIT is on IOAPIC pin 2, conforming flags = ISA edge/high), the SCI level/active-high, LINT1 NMI for all.
* FADT: full (not hardware-reduced) ACPI with the fixed PM block of devices.acpi_pm; no SMI command port, so the
  OS finds the hardware already in ACPI mode (PM1_CNT.SCI_EN reads 1); reset through port 0xCF9.
* DSDT: \\_S5, and under \\_SB the processors, the PCI root bridge with its windows and _PRT, COM1 and the RTC.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from kvmcore import layout
from kvmcore.acpi import aml
from kvmcore.acpi import tables as t
from kvmcore.acpi.linker import AcpiTables, Blob, ChecksumFixup, PointerFixup

MAX_VCPUS = 255  # xAPIC ids 0..254 (0xFF is the broadcast id) in 8-bit MADT Local APIC entries
ISA_IRQS = 16
PIT_IRQ, PIT_GSI = 0, 2  # the 8254 is on IOAPIC pin 2 (KVM's in-kernel IOAPIC, like every PC chipset)
PCI_SLOTS = range(1, 32)  # slot 0 is the host bridge
PCI_PINS = range(4)  # INTA#..INTD#
LINT1 = 1
LEGACY_VGA_WINDOW = (0x000A_0000, 0x000C_0000)  # [start, end), decoded by the root bridge on a PC


class AcpiConfigError(ValueError):
    """The platform description cannot be expressed in ACPI tables (a host-side configuration error)."""


def _u(value: int, bits: int, what: str) -> None:
    if not 0 <= value < (1 << bits):
        raise AcpiConfigError(f"{what} {value:#x} does not fit in {bits} bits")


@dataclass(frozen=True)
class AcpiPlatform:
    """What the tables describe. Ranges are half-open [start, end) like kvmcore.layout; defaults are kvmdm's
    machine (kvmcore.layout), so callers usually give only ``vcpus``."""

    vcpus: int
    lapic_address: int = layout.LAPIC_BASE
    ioapic_address: int = layout.IOAPIC_BASE
    ioapic_id: int = 0
    ioapic_gsi_base: int = 0
    ioapic_pins: int = layout.IOAPIC_PINS
    pm_io_base: int = layout.ACPI_PM_BASE
    sci_irq: int = layout.ACPI_SCI_IRQ
    s5_slp_typ: int = layout.ACPI_S5_SLP_TYP
    reset_port: int = layout.ACPI_RESET_PORT
    reset_value: int = layout.ACPI_RESET_VALUE
    com1_port: int = layout.COM1_PORT
    com1_irq: int = layout.COM1_IRQ
    rtc_port: int = layout.RTC_PORT
    rtc_irq: int = layout.RTC_IRQ
    rtc_century: int = 0x32  # CMOS index of the century byte (devices.rtc.REG_CENTURY); 0: none
    pci_buses: tuple[int, int] = (0, 0xFF)  # inclusive, as _BBN/WordBusNumber count buses
    pci_io_windows: tuple[tuple[int, int], ...] = ((0x0000, 0x0CF8), (0x0D00, 0x1_0000))
    pci_mmio32: tuple[int, int] = (layout.PCI_MMIO32_START, layout.PCI_MMIO32_END)
    pci_mmio64: tuple[int, int] | None = (layout.PCI_MMIO64_START, layout.PCI_MMIO64_START + layout.PCI_MMIO64_SIZE)
    pci_intx_gsi_base: int = layout.PCI_INTX_GSI_BASE
    pci_intx_gsi_count: int = layout.PCI_INTX_GSI_COUNT
    ids: t.OemIds = field(default_factory=t.OemIds)

    def __post_init__(self) -> None:
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise AcpiConfigError(f"the MADT describes 1..{MAX_VCPUS} vCPUs with xAPIC ids, got {self.vcpus}")
        _u(self.lapic_address, 32, "Local APIC address")
        _u(self.ioapic_address, 32, "IOAPIC address")
        _u(self.ioapic_id, 8, "IOAPIC id")
        _u(self.ioapic_gsi_base, 32, "IOAPIC GSI base")
        if not 1 <= self.ioapic_pins <= 240:
            raise AcpiConfigError(f"an IOAPIC has 1..240 pins, got {self.ioapic_pins}")
        if not 0 <= self.pm_io_base <= 0x1_0000 - layout.ACPI_PM_LENGTH or self.pm_io_base % 4:
            raise AcpiConfigError(f"PM block base {self.pm_io_base:#x} must be a 4-aligned port with "
                                  f"{layout.ACPI_PM_LENGTH} ports after it")
        for irq, what in ((self.sci_irq, "SCI"), (self.com1_irq, "COM1 IRQ"), (self.rtc_irq, "RTC IRQ")):
            if not 0 <= irq < ISA_IRQS or irq in (PIT_GSI, PIT_IRQ):
                raise AcpiConfigError(f"{what} {irq} must be an ISA IRQ 1..15 other than 2 (the PIT's GSI)")
        if not 0 <= self.s5_slp_typ <= 7:
            raise AcpiConfigError(f"SLP_TYP is 3 bits, got {self.s5_slp_typ}")
        for port, what in ((self.reset_port, "reset port"), (self.com1_port, "COM1 port"),
                           (self.rtc_port, "RTC port")):
            _u(port, 16, what)
        _u(self.reset_value, 8, "reset value")
        if not 0 <= self.rtc_century < 128:
            raise AcpiConfigError(f"CENTURY is a CMOS index 0..127, got {self.rtc_century:#x}")
        lo, hi = self.pci_buses
        if not 0 <= lo <= hi <= 0xFF:
            raise AcpiConfigError(f"PCI bus range {lo}..{hi} is not within 0..255")
        cursor = 0
        for start, end in self.pci_io_windows:
            if not cursor <= start < end <= 0x1_0000:
                raise AcpiConfigError(f"PCI I/O window {start:#x}..{end:#x} is empty, overlaps another, is out of "
                                      "order or past 0xFFFF")
            if start < layout.PCI_CONFIG_PORT + 8 and layout.PCI_CONFIG_PORT < end:
                raise AcpiConfigError(f"PCI I/O window {start:#x}..{end:#x} overlaps the config ports 0xCF8-0xCFF")
            cursor = end
        start, end = self.pci_mmio32
        if not 0 <= start < end <= 1 << 32:
            raise AcpiConfigError(f"32-bit PCI window {start:#x}..{end:#x} is empty or not below 4 GiB")
        if self.pci_mmio64 is not None:
            start, end = self.pci_mmio64
            if not 1 << 32 <= start < end <= 1 << 64:
                raise AcpiConfigError(f"64-bit PCI window {start:#x}..{end:#x} is empty or not above 4 GiB")
        if self.pci_intx_gsi_count < 1:
            raise AcpiConfigError("PCI INTx needs at least one GSI")
        gsi_lo, gsi_hi = self.ioapic_gsi_base, self.ioapic_gsi_base + self.ioapic_pins
        used = [(PIT_GSI, "the PIT's GSI"), (self.sci_irq, "the SCI"), (self.com1_irq, "COM1's IRQ"),
                (self.rtc_irq, "the RTC's IRQ"), (self.pci_intx_gsi_base, "the first PCI INTx GSI"),
                (self.pci_intx_gsi_base + self.pci_intx_gsi_count - 1, "the last PCI INTx GSI")]
        for gsi, what in used:
            if not gsi_lo <= gsi < gsi_hi:
                raise AcpiConfigError(f"{what} ({gsi}) is not on the IOAPIC (GSIs {gsi_lo}..{gsi_hi - 1})")
        if self.pci_intx_gsi_base < ISA_IRQS:
            raise AcpiConfigError(f"PCI INTx GSIs must not share the ISA IRQs 0..15, base {self.pci_intx_gsi_base}")

    def intx_gsi(self, slot: int, pin: int) -> int:
        return layout.pci_intx_gsi(slot, pin, self.pci_intx_gsi_base, self.pci_intx_gsi_count)


# ------------------------------------------------------------------------------------------------------ DSDT
def _pci0(p: AcpiPlatform) -> bytes:
    """\\_SB.PCI0, the host bridge (ACPI 6.5 §6.1 _HID PNP0A03, §6.5.5 _BBN, §6.2.13 _PRT)."""
    crs = [aml.word_bus_number(p.pci_buses[0], p.pci_buses[1]),
           # The config mechanism's ports are consumed by the bridge itself (Linux drops them from its windows).
           aml.io(layout.PCI_CONFIG_PORT, layout.PCI_CONFIG_PORT, 0x01, 0x08)]
    crs += [aml.word_io(start, end - 1) for start, end in p.pci_io_windows]
    crs.append(aml.dword_memory(LEGACY_VGA_WINDOW[0], LEGACY_VGA_WINDOW[1] - 1, cacheability="cacheable"))
    crs.append(aml.dword_memory(p.pci_mmio32[0], p.pci_mmio32[1] - 1))
    if p.pci_mmio64 is not None:
        crs.append(aml.qword_memory(p.pci_mmio64[0], p.pci_mmio64[1] - 1, cacheability="cacheable"))
    # _PRT (§6.2.13): Package {Address (slot << 16 | 0xFFFF = any function), Pin, Source 0, Source Index}: with a
    # Source of 0 the index is a GSI, which the OS treats as level-triggered, active-low and shareable.
    prt = [aml.package(aml.integer(slot << 16 | 0xFFFF), aml.integer(pin), aml.integer(0),
                       aml.integer(p.intx_gsi(slot, pin)))
           for slot in PCI_SLOTS for pin in PCI_PINS]
    return aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A03")),
        aml.name("_UID", aml.integer(0)),
        aml.name("_ADR", aml.integer(0)),
        aml.name("_BBN", aml.integer(p.pci_buses[0])),
        aml.name("_CRS", aml.resource_template(*crs)),
        aml.name("_PRT", aml.package(*prt)),
    )


def _com1(p: AcpiPlatform) -> bytes:
    """COM1, a 16550A (PNP0501)."""
    return aml.device(
        "COM1",
        aml.name("_HID", aml.eisa_id("PNP0501")),
        aml.name("_UID", aml.integer(1)),
        aml.name("_CRS", aml.resource_template(aml.io(p.com1_port, p.com1_port, 0x01, 0x08),
                                               aml.irq_no_flags(p.com1_irq))),
    )


def _rtc(p: AcpiPlatform) -> bytes:
    """The MC146818 CMOS RTC (PNP0B00): index and data ports."""
    return aml.device(
        "RTC",
        aml.name("_HID", aml.eisa_id("PNP0B00")),
        aml.name("_CRS", aml.resource_template(aml.io(p.rtc_port, p.rtc_port, 0x01, 0x02),
                                               aml.irq_no_flags(p.rtc_irq))),
    )


def _processors(p: AcpiPlatform) -> list[bytes]:
    """One processor device per vCPU (§8.4 "Declaring Processors": _HID ACPI0007, _UID = the MADT uid)."""
    return [aml.device(f"C{i:03X}", aml.name("_HID", aml.string("ACPI0007")), aml.name("_UID", aml.integer(i)))
            for i in range(p.vcpus)]


def dsdt_aml(p: AcpiPlatform) -> bytes:
    # \_S5 (§7.4.2.5): Package {SLP_TYPa, SLP_TYPb, reserved, reserved}. No \_S1-\_S4: kvmdm cannot sleep.
    s5 = aml.name("\\_S5", aml.package(*(aml.integer(v) for v in (p.s5_slp_typ, p.s5_slp_typ, 0, 0))))
    return s5 + aml.scope("\\_SB", *_processors(p), _pci0(p), _com1(p), _rtc(p))


# -------------------------------------------------------------------------------------------------- the set
def _fadt_fields(p: AcpiPlatform) -> t.FadtFields:
    flags = (t.FADT_F_WBINVD | t.FADT_F_PROC_C1 | t.FADT_F_SLP_BUTTON | t.FADT_F_TMR_VAL_EXT
             | t.FADT_F_RESET_REG_SUP | t.FADT_F_USE_PLATFORM_CLOCK)
    if p.vcpus > 8:
        # xAPIC logical flat mode addresses 8 CPUs at most (QEMU sets this flag from 9 vCPUs too).
        flags |= t.FADT_F_FORCE_APIC_PHYSICAL_DESTINATION_MODE
    return t.FadtFields(
        sci_int=p.sci_irq,
        pm_io_base=p.pm_io_base,
        pm1_evt_len=layout.ACPI_PM1_EVT_LEN,
        pm1_cnt_offset=layout.ACPI_PM1_CNT_OFFSET,
        pm1_cnt_len=layout.ACPI_PM1_CNT_LEN,
        pm_tmr_offset=layout.ACPI_PM_TMR_OFFSET,
        pm_tmr_len=layout.ACPI_PM_TMR_LEN,
        reset_port=p.reset_port,
        reset_value=p.reset_value,
        century=p.rtc_century,
        # Legacy ISA devices (COM1, RTC) exist; no VGA. No 8042 flag: kvmdm's i8042 is only a reset/probe stub,
        # and without the flag Linux does not probe for a PS/2 controller. A CMOS RTC is present.
        iapc_boot_arch=t.IAPC_LEGACY_DEVICES | t.IAPC_VGA_NOT_PRESENT,
        flags=flags,
    )


def _sdt_checksum(name: str, data: bytes) -> ChecksumFixup:
    return ChecksumFixup(name, t.SDT_CHECKSUM_OFFSET, 0, len(data))


@functools.lru_cache(maxsize=16)
def build_tables(p: AcpiPlatform) -> AcpiTables:
    """The tables of platform ``p``: a pure function of a frozen platform into frozen tables, so memoized (building
    the AML costs ~1.5 ms of a DM's startup; a DM forked by daemon.zygote finds the common platforms built)."""
    ids = p.ids
    isos = [t.MadtIso(PIT_IRQ, PIT_GSI, t.INTI_CONFORMING),
            t.MadtIso(p.sci_irq, p.sci_irq, t.INTI_POLARITY_ACTIVE_HIGH | t.INTI_TRIGGER_LEVEL)]
    listed = ["facp", "apic"]  # what the RSDT and XSDT point at, in order
    tables = {
        "rsdp": t.rsdp(ids),
        "facs": t.facs(),
        "dsdt": t.dsdt(ids, dsdt_aml(p)),
        "facp": t.fadt(ids, _fadt_fields(p)),
        "apic": t.madt(ids, lapic_address=p.lapic_address, apic_ids=list(range(p.vcpus)),
                       ioapic_id=p.ioapic_id, ioapic_address=p.ioapic_address,
                       ioapic_gsi_base=p.ioapic_gsi_base, isos=isos, nmi_lint=LINT1),
        "rsdt": t.rsdt(len(listed), ids),
        "xsdt": t.xsdt(len(listed), ids),
    }
    # The FACS first in the tables file: it needs 64-byte alignment, the rest 8 (we choose 8; the spec asks 4).
    blobs = [Blob("rsdp", tables["rsdp"], t.RSDP_ALIGN, "fseg"), Blob("facs", tables["facs"], t.FACS_ALIGN)]
    blobs += [Blob(n, tables[n]) for n in ("dsdt", "facp", "apic", "rsdt", "xsdt")]
    pointers = [
        PointerFixup("facp", t.FADT_FIRMWARE_CTRL, 4, "facs"),
        PointerFixup("facp", t.FADT_DSDT, 4, "dsdt"),
        PointerFixup("facp", t.FADT_X_DSDT, 8, "dsdt"),
    ]
    for i, target in enumerate(listed):
        pointers.append(PointerFixup("rsdt", t.SDT_HEADER_SIZE + t.RSDT_ENTRY_SIZE * i, 4, target))
        pointers.append(PointerFixup("xsdt", t.SDT_HEADER_SIZE + t.XSDT_ENTRY_SIZE * i, 8, target))
    # SeaBIOS finds the FADT through the RSDT only (src/fw/biostables.c find_fadt), Linux prefers the XSDT.
    pointers.append(PointerFixup("rsdp", t.RSDP_RSDT_OFFSET, 4, "rsdt"))
    pointers.append(PointerFixup("rsdp", t.RSDP_XSDT_OFFSET, 8, "xsdt"))
    checksums = [_sdt_checksum(n, tables[n]) for n in ("dsdt", "facp", "apic", "rsdt", "xsdt")]
    # The ACPI 1.0 checksum covers the first 20 bytes and the extended one all 36, the first included: in order.
    checksums.append(ChecksumFixup("rsdp", t.RSDP_CHECKSUM_OFFSET, 0, t.RSDP_V1_SIZE))
    checksums.append(ChecksumFixup("rsdp", t.RSDP_EXT_CHECKSUM_OFFSET, 0, t.RSDP_SIZE))
    return AcpiTables(tuple(blobs), tuple(pointers), tuple(checksums))
