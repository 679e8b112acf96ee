"""ACPI system description tables (ACPI 6.5 §5.2) as byte strings, pointer fields and checksums left zero.

Pointers between tables and checksums are resolved later (kvmcore.acpi.linker), so each builder here returns
the table with its pointer fields holding 0 (an offset into the target) and its checksum byte 0; the
``*_OFFSET`` constants say where the build step must put fix-ups.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# §5.2.6 Table 5.4 System Description Table Header: 36 bytes.
SDT_HEADER = struct.Struct("<4sIBB6s8sI4sI")
SDT_HEADER_SIZE = SDT_HEADER.size
SDT_LENGTH_OFFSET = 4
SDT_CHECKSUM_OFFSET = 9

# §5.2.5.3 Table 5.3 RSDP Structure (ACPI 2.0+): 36 bytes; the first 20 are the ACPI 1.0 structure with its own
# checksum, the extended checksum covers all 36.
RSDP = struct.Struct("<8sB6sBIIQB3s")
RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2
RSDP_SIZE = RSDP.size
RSDP_V1_SIZE = 20
RSDP_CHECKSUM_OFFSET = 8
RSDP_RSDT_OFFSET = 16
RSDP_LENGTH_OFFSET = 20
RSDP_XSDT_OFFSET = 24
RSDP_EXT_CHECKSUM_OFFSET = 32
RSDP_ALIGN = 16  # §5.2.5.1: on a 16-byte boundary in the first KiB of the EBDA or 0xE0000-0xFFFFF

RSDT_REVISION = 1  # §5.2.7
XSDT_REVISION = 1  # §5.2.8
RSDT_ENTRY_SIZE = 4
XSDT_ENTRY_SIZE = 8

# §5.2.10 Table 5.14 Firmware ACPI Control Structure: 64 bytes, 64-byte aligned, no checksum.
FACS = struct.Struct("<4sIIIIIQB3sI24s")
FACS_SIZE = FACS.size
FACS_ALIGN = 64
FACS_VERSION = 2

# §5.2.3.2 Generic Address Structure.
GAS = struct.Struct("<BBBBQ")
GAS_SYSTEM_MEMORY = 0
GAS_SYSTEM_IO = 1
ACCESS_UNDEFINED = 0
ACCESS_BYTE = 1
ACCESS_WORD = 2
ACCESS_DWORD = 3

# §5.2.9 Table 5.9 Fixed ACPI Description Table: byte offsets of every field we fill (revision 6, ACPI 6.0+).
FADT_REVISION = 6
FADT_MINOR_REVISION = 0
FADT_SIZE = 276
FADT_FIRMWARE_CTRL = 36
FADT_DSDT = 40
FADT_PREFERRED_PM_PROFILE = 45
FADT_SCI_INT = 46
FADT_SMI_CMD = 48
FADT_ACPI_ENABLE = 52
FADT_ACPI_DISABLE = 53
FADT_PM1A_EVT_BLK = 56
FADT_PM1B_EVT_BLK = 60
FADT_PM1A_CNT_BLK = 64
FADT_PM1B_CNT_BLK = 68
FADT_PM2_CNT_BLK = 72
FADT_PM_TMR_BLK = 76
FADT_GPE0_BLK = 80
FADT_GPE1_BLK = 84
FADT_PM1_EVT_LEN = 88
FADT_PM1_CNT_LEN = 89
FADT_PM2_CNT_LEN = 90
FADT_PM_TMR_LEN = 91
FADT_GPE0_BLK_LEN = 92
FADT_GPE1_BLK_LEN = 93
FADT_P_LVL2_LAT = 96
FADT_P_LVL3_LAT = 98
FADT_CENTURY = 108
FADT_IAPC_BOOT_ARCH = 109
FADT_FLAGS = 112
FADT_RESET_REG = 116
FADT_RESET_VALUE = 128
FADT_MINOR_VERSION = 131
FADT_X_FIRMWARE_CTRL = 132
FADT_X_DSDT = 140
FADT_X_PM1A_EVT_BLK = 148
FADT_X_PM1B_EVT_BLK = 160
FADT_X_PM1A_CNT_BLK = 172
FADT_X_PM1B_CNT_BLK = 184
FADT_X_PM2_CNT_BLK = 196
FADT_X_PM_TMR_BLK = 208
FADT_X_GPE0_BLK = 220
FADT_X_GPE1_BLK = 232
FADT_SLEEP_CONTROL_REG = 244
FADT_SLEEP_STATUS_REG = 256
FADT_HYPERVISOR_VENDOR = 268

# §5.2.9.3 Table 5.11 IA-PC Boot Architecture Flags.
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_PCIE_ASPM_CONTROLS = 1 << 4
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5

# §5.2.9 Table 5.10 Fixed ACPI Description Table Fixed Feature Flags.
FADT_F_WBINVD = 1 << 0
FADT_F_PROC_C1 = 1 << 2
FADT_F_PWR_BUTTON = 1 << 4  # set: the power button is a control-method device (or absent); clear: fixed feature
FADT_F_SLP_BUTTON = 1 << 5  # set: no fixed-feature sleep button
FADT_F_RTC_S4 = 1 << 7
FADT_F_TMR_VAL_EXT = 1 << 8  # the PM timer is 32 bits wide (else 24)
FADT_F_RESET_REG_SUP = 1 << 10
FADT_F_USE_PLATFORM_CLOCK = 1 << 15
FADT_F_FORCE_APIC_PHYSICAL_DESTINATION_MODE = 1 << 19
FADT_F_HW_REDUCED_ACPI = 1 << 20

# §5.2.12 Multiple APIC Description Table.
MADT_REVISION = 3  # ACPI 6.0
MADT_LAPIC_ADDRESS = 36
MADT_FLAGS = 40
MADT_ENTRIES = 44
MADT_PCAT_COMPAT = 1 << 0  # §5.2.12 Table 5.20: the system also has dual 8259s
MADT_TYPE_LOCAL_APIC = 0  # §5.2.12.2 Table 5.22, 8 bytes: uid, APIC id, flags
MADT_TYPE_IO_APIC = 1  # §5.2.12.3 Table 5.24, 12 bytes: id, reserved, address, GSI base
MADT_TYPE_ISO = 2  # §5.2.12.5 Table 5.25, 10 bytes: bus, source, GSI, MPS INTI flags
MADT_TYPE_LOCAL_APIC_NMI = 4  # §5.2.12.7 Table 5.27, 6 bytes: uid, MPS INTI flags, LINT#
MADT_LOCAL_APIC = struct.Struct("<BBBBI")
MADT_IO_APIC = struct.Struct("<BBBBII")
MADT_ISO = struct.Struct("<BBBBIH")
MADT_LOCAL_APIC_NMI = struct.Struct("<BBBHB")
LOCAL_APIC_ENABLED = 1 << 0
ALL_PROCESSORS_UID = 0xFF  # §5.2.12.7: Local APIC NMI for every processor
# §5.2.12.5 Table 5.26 MPS INTI Flags: polarity bits 1-0, trigger mode bits 3-2.
INTI_CONFORMING = 0x0
INTI_POLARITY_ACTIVE_HIGH = 0x1
INTI_POLARITY_ACTIVE_LOW = 0x3
INTI_TRIGGER_EDGE = 0x1 << 2
INTI_TRIGGER_LEVEL = 0x3 << 2

DSDT_REVISION = 2  # §5.2.11.1: revision 2 and later have 64-bit AML integers


class AcpiTableError(ValueError):
    """A table field got a value it cannot hold (a host-side programming error)."""


@dataclass(frozen=True)
class OemIds:
    """Identification in every table header (§5.2.6): OEM id (6 chars), OEM table id (8), creator id (4)."""

    oem_id: str = "KVMDM"
    oem_table_id: str = "KVMDMPLT"
    oem_revision: int = 1
    creator_id: str = "KVMD"
    creator_revision: int = 1

    def __post_init__(self) -> None:
        for value, size, what in ((self.oem_id, 6, "OEM id"), (self.oem_table_id, 8, "OEM table id"),
                                  (self.creator_id, 4, "creator id")):
            if not value.isascii() or not value.isprintable() or len(value) > size:
                raise AcpiTableError(f"{what} {value!r} must be at most {size} printable ASCII characters")
        for number, what in ((self.oem_revision, "OEM revision"), (self.creator_revision, "creator revision")):
            if not 0 <= number <= 0xFFFF_FFFF:
                raise AcpiTableError(f"{what} {number} does not fit 32 bits")

    def raw(self) -> tuple[bytes, bytes, bytes]:
        return (self.oem_id.encode().ljust(6, b" "), self.oem_table_id.encode().ljust(8, b" "),
                self.creator_id.encode().ljust(4, b" "))


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` + it sum to zero mod 256."""
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes, ids: OemIds) -> bytes:
    """Header + body; the checksum byte is left 0 for the linker."""
    if len(signature) != 4:
        raise AcpiTableError(f"table signature {signature!r} is not 4 bytes")
    oem_id, table_id, creator = ids.raw()
    return SDT_HEADER.pack(signature, SDT_HEADER_SIZE + len(body), revision, 0, oem_id, table_id,
                           ids.oem_revision, creator, ids.creator_revision) + body


def rsdp(ids: OemIds) -> bytes:
    """RSDP with RsdtAddress/XsdtAddress 0 and both checksums 0 (the linker fills them)."""
    return RSDP.pack(RSDP_SIGNATURE, 0, ids.raw()[0], RSDP_REVISION, 0, RSDP_SIZE, 0, 0, b"\0" * 3)


def rsdt(entries: int, ids: OemIds) -> bytes:
    """§5.2.7 RSDT: ``entries`` 32-bit table addresses at SDT_HEADER_SIZE + 4 * i."""
    return sdt(b"RSDT", RSDT_REVISION, bytes(RSDT_ENTRY_SIZE * entries), ids)


def xsdt(entries: int, ids: OemIds) -> bytes:
    """§5.2.8 XSDT: ``entries`` 64-bit table addresses at SDT_HEADER_SIZE + 8 * i."""
    return sdt(b"XSDT", XSDT_REVISION, bytes(XSDT_ENTRY_SIZE * entries), ids)


def facs() -> bytes:
    """§5.2.10 FACS: no waking vector, no global lock owner, version 2."""
    return FACS.pack(b"FACS", FACS_SIZE, 0, 0, 0, 0, 0, FACS_VERSION, b"\0" * 3, 0, b"\0" * 24)


def gas(space: int, bit_width: int, address: int, *, bit_offset: int = 0, access: int = ACCESS_UNDEFINED) -> bytes:
    return GAS.pack(space, bit_width, bit_offset, access, address)


@dataclass(frozen=True)
class MadtIso:
    """Interrupt Source Override: ISA IRQ ``source`` (bus 0) arrives on ``gsi`` with MPS INTI ``flags``."""

    source: int
    gsi: int
    flags: int


def madt(ids: OemIds, *, lapic_address: int, apic_ids: list[int], ioapic_id: int, ioapic_address: int,
         ioapic_gsi_base: int, isos: list[MadtIso], nmi_lint: int) -> bytes:
    """§5.2.12 MADT with PCAT_COMPAT: one enabled Local APIC per processor (ACPI uid = index), one I/O APIC, the
    ISOs, and a Local APIC NMI on ``nmi_lint`` for all processors."""
    body = struct.pack("<II", lapic_address, MADT_PCAT_COMPAT)
    for uid, apic_id in enumerate(apic_ids):
        body += MADT_LOCAL_APIC.pack(MADT_TYPE_LOCAL_APIC, MADT_LOCAL_APIC.size, uid, apic_id, LOCAL_APIC_ENABLED)
    body += MADT_IO_APIC.pack(MADT_TYPE_IO_APIC, MADT_IO_APIC.size, ioapic_id, 0, ioapic_address, ioapic_gsi_base)
    for iso in isos:
        body += MADT_ISO.pack(MADT_TYPE_ISO, MADT_ISO.size, 0, iso.source, iso.gsi, iso.flags)
    body += MADT_LOCAL_APIC_NMI.pack(MADT_TYPE_LOCAL_APIC_NMI, MADT_LOCAL_APIC_NMI.size, ALL_PROCESSORS_UID,
                                     INTI_CONFORMING, nmi_lint)
    return sdt(b"APIC", MADT_REVISION, body, ids)


@dataclass(frozen=True)
class FadtFields:
    sci_int: int
    pm_io_base: int
    pm1_evt_len: int
    pm1_cnt_offset: int
    pm1_cnt_len: int
    pm_tmr_offset: int
    pm_tmr_len: int
    reset_port: int
    reset_value: int
    century: int
    iapc_boot_arch: int
    flags: int


def fadt(ids: OemIds, f: FadtFields) -> bytes:
    """§5.2.9 FADT revision 6. FIRMWARE_CTRL, DSDT and X_DSDT are left 0 for the linker (X_FIRMWARE_CTRL stays 0:
    the spec wants only one FACS pointer, and FIRMWARE_CTRL reaches any FACS below 4 GiB). Legacy 32-bit blocks
    and their X_ GAS twins say the same thing (ACPICA warns when they differ). SMI_CMD 0: the platform is always
    in ACPI mode. No GPE blocks, no PM2, no PM1b."""
    t = bytearray(FADT_SIZE)
    struct.pack_into("<H", t, FADT_SCI_INT, f.sci_int)
    pm1a_evt = f.pm_io_base
    pm1a_cnt = f.pm_io_base + f.pm1_cnt_offset
    pm_tmr = f.pm_io_base + f.pm_tmr_offset
    struct.pack_into("<I", t, FADT_PM1A_EVT_BLK, pm1a_evt)
    struct.pack_into("<I", t, FADT_PM1A_CNT_BLK, pm1a_cnt)
    struct.pack_into("<I", t, FADT_PM_TMR_BLK, pm_tmr)
    t[FADT_PM1_EVT_LEN] = f.pm1_evt_len
    t[FADT_PM1_CNT_LEN] = f.pm1_cnt_len
    t[FADT_PM_TMR_LEN] = f.pm_tmr_len
    # C2/C3 latencies above 100 us / 1000 us mean "not supported" (§5.2.9 P_LVL2_LAT, P_LVL3_LAT).
    struct.pack_into("<HH", t, FADT_P_LVL2_LAT, 0x0FFF, 0x03E9)
    t[FADT_CENTURY] = f.century
    struct.pack_into("<H", t, FADT_IAPC_BOOT_ARCH, f.iapc_boot_arch)
    struct.pack_into("<I", t, FADT_FLAGS, f.flags)
    t[FADT_RESET_REG : FADT_RESET_REG + GAS.size] = gas(GAS_SYSTEM_IO, 8, f.reset_port, access=ACCESS_BYTE)
    t[FADT_RESET_VALUE] = f.reset_value
    t[FADT_MINOR_VERSION] = FADT_MINOR_REVISION
    for off, addr, nbytes in ((FADT_X_PM1A_EVT_BLK, pm1a_evt, f.pm1_evt_len),
                              (FADT_X_PM1A_CNT_BLK, pm1a_cnt, f.pm1_cnt_len),
                              (FADT_X_PM_TMR_BLK, pm_tmr, f.pm_tmr_len)):
        t[off : off + GAS.size] = gas(GAS_SYSTEM_IO, 8 * nbytes, addr)
    return sdt(b"FACP", FADT_REVISION, bytes(t[SDT_HEADER_SIZE:]), ids)


def dsdt(ids: OemIds, aml: bytes) -> bytes:
    """§5.2.11.1 DSDT: the header and the definition block's AML."""
    return sdt(b"DSDT", DSDT_REVISION, aml, ids)
