"""The ACPI tables kvmdm builds, parsed back field by field (ACPI 6.5 §5.2), and the builder's validation."""

from __future__ import annotations

import struct

import pytest

from kvmcore import layout
from kvmcore.acpi import AcpiConfigError, AcpiPlatform, aml, build_tables
from kvmcore.acpi import tables as t
from kvmcore.acpi.build import dsdt_aml
from kvmcore.acpi.testing import Found, reader_for, walk

BASE = layout.ACPI_TABLES_ADDR


def placed(vcpus: int = 2, **kw: object) -> dict[str, Found]:
    blob = build_tables(AcpiPlatform(vcpus=vcpus, **kw)).place(BASE)  # type: ignore[arg-type]
    return walk(reader_for(blob, BASE), BASE)


def test_every_table_has_a_valid_header_checksum_and_our_oem_ids() -> None:
    found = placed()
    assert set(found) == {"RSDP", "RSDT", "XSDT", "FACP", "APIC", "DSDT", "FACS"}
    assert found["RSDP"].data[9:15] == b"KVMDM "
    for sig in ("RSDT", "XSDT", "FACP", "APIC", "DSDT"):
        (signature, length, _rev, _ck, oem_id, table_id, oem_rev, creator, _crev) = t.SDT_HEADER.unpack_from(
            found[sig].data)
        assert signature.decode() == sig and length == len(found[sig].data)
        assert (oem_id, table_id, oem_rev, creator) == (b"KVMDM ", b"KVMDMPLT", 1, b"KVMD")


def test_rsdp_is_first_and_16_byte_aligned_and_revision_2() -> None:
    found = placed()
    assert found["RSDP"].addr == BASE  # Linux's BIOS-area scan starts at 0xE0000
    # Table 5.3: revision 2 at 15, length 36 at 20: ACPI 2.0+.
    assert found["RSDP"].data[15] == 2 and struct.unpack_from("<I", found["RSDP"].data, 20)[0] == 36


def test_xsdt_and_rsdt_list_fadt_then_madt() -> None:
    found = placed()
    x = struct.unpack_from("<2Q", found["XSDT"].data, 36)
    assert x == (found["FACP"].addr, found["APIC"].addr)
    assert len(found["XSDT"].data) == 36 + 16 and len(found["RSDT"].data) == 36 + 8


def test_tables_after_the_rsdp_are_8_byte_aligned() -> None:
    found = placed()
    for sig in ("RSDT", "XSDT", "FACP", "APIC", "DSDT"):
        assert found[sig].addr % 8 == 0, sig


# ----------------------------------------------------------------------------------------- FADT (Table 5.9)
def _u(data: bytes, fmt: str, off: int) -> int:
    return int(struct.unpack_from("<" + fmt, data, off)[0])


def test_fadt_revision_and_length() -> None:
    fadt = placed()["FACP"].data
    assert fadt[8] == 6 and len(fadt) == 276 and fadt[t.FADT_MINOR_VERSION] == 0


def test_fadt_describes_the_pm_block_and_sci() -> None:
    fadt = placed()["FACP"].data
    assert _u(fadt, "H", t.FADT_SCI_INT) == 9
    assert _u(fadt, "I", t.FADT_SMI_CMD) == 0  # no SMI command port: always in ACPI mode
    assert fadt[t.FADT_ACPI_ENABLE] == 0 and fadt[t.FADT_ACPI_DISABLE] == 0
    assert _u(fadt, "I", t.FADT_PM1A_EVT_BLK) == 0x600 and fadt[t.FADT_PM1_EVT_LEN] == 4
    assert _u(fadt, "I", t.FADT_PM1A_CNT_BLK) == 0x604 and fadt[t.FADT_PM1_CNT_LEN] == 2
    assert _u(fadt, "I", t.FADT_PM_TMR_BLK) == 0x608 and fadt[t.FADT_PM_TMR_LEN] == 4
    for off in (t.FADT_PM1B_EVT_BLK, t.FADT_PM1B_CNT_BLK, t.FADT_PM2_CNT_BLK, t.FADT_GPE0_BLK, t.FADT_GPE1_BLK):
        assert _u(fadt, "I", off) == 0
    assert fadt[t.FADT_GPE0_BLK_LEN] == 0 and fadt[t.FADT_GPE1_BLK_LEN] == 0 and fadt[t.FADT_PM2_CNT_LEN] == 0


def test_fadt_x_blocks_match_the_legacy_blocks() -> None:
    fadt = placed()["FACP"].data
    for x_off, legacy_off, nbytes in ((t.FADT_X_PM1A_EVT_BLK, t.FADT_PM1A_EVT_BLK, 4),
                                      (t.FADT_X_PM1A_CNT_BLK, t.FADT_PM1A_CNT_BLK, 2),
                                      (t.FADT_X_PM_TMR_BLK, t.FADT_PM_TMR_BLK, 4)):
        space, width, offset, _access, address = t.GAS.unpack_from(fadt, x_off)
        assert (space, width, offset, address) == (t.GAS_SYSTEM_IO, 8 * nbytes, 0, _u(fadt, "I", legacy_off))
    for off in (t.FADT_X_PM1B_EVT_BLK, t.FADT_X_PM1B_CNT_BLK, t.FADT_X_PM2_CNT_BLK, t.FADT_X_GPE0_BLK,
                t.FADT_X_GPE1_BLK, t.FADT_SLEEP_CONTROL_REG, t.FADT_SLEEP_STATUS_REG):
        assert fadt[off : off + 12] == bytes(12)


def test_fadt_flags() -> None:
    flags = _u(placed()["FACP"].data, "I", t.FADT_FLAGS)
    for bit in (t.FADT_F_WBINVD, t.FADT_F_PROC_C1, t.FADT_F_SLP_BUTTON, t.FADT_F_TMR_VAL_EXT,
                t.FADT_F_RESET_REG_SUP, t.FADT_F_USE_PLATFORM_CLOCK):
        assert flags & bit, hex(bit)
    # A fixed-feature power button (PWR_BUTTON clear), full ACPI hardware, xAPIC flat mode allowed with 2 vCPUs.
    for bit in (t.FADT_F_PWR_BUTTON, t.FADT_F_HW_REDUCED_ACPI, t.FADT_F_FORCE_APIC_PHYSICAL_DESTINATION_MODE):
        assert not flags & bit, hex(bit)


def test_fadt_forces_physical_apic_mode_past_8_vcpus() -> None:
    assert not _u(placed(8)["FACP"].data, "I", t.FADT_FLAGS) & t.FADT_F_FORCE_APIC_PHYSICAL_DESTINATION_MODE
    assert _u(placed(9)["FACP"].data, "I", t.FADT_FLAGS) & t.FADT_F_FORCE_APIC_PHYSICAL_DESTINATION_MODE


def test_fadt_reset_register_is_port_cf9_value_6() -> None:
    fadt = placed()["FACP"].data
    assert t.GAS.unpack_from(fadt, t.FADT_RESET_REG) == (t.GAS_SYSTEM_IO, 8, 0, t.ACCESS_BYTE, 0xCF9)
    assert fadt[t.FADT_RESET_VALUE] == 0x06


def test_fadt_boot_arch_century_and_pointers() -> None:
    found = placed()
    fadt = found["FACP"].data
    arch = _u(fadt, "H", t.FADT_IAPC_BOOT_ARCH)
    assert arch == t.IAPC_LEGACY_DEVICES | t.IAPC_VGA_NOT_PRESENT  # no 8042, a CMOS RTC present
    assert fadt[t.FADT_CENTURY] == 0x32
    assert _u(fadt, "I", t.FADT_FIRMWARE_CTRL) == found["FACS"].addr
    assert _u(fadt, "Q", t.FADT_X_FIRMWARE_CTRL) == 0  # only one FACS pointer (§5.2.9 X_FIRMWARE_CTRL)
    assert _u(fadt, "I", t.FADT_DSDT) == _u(fadt, "Q", t.FADT_X_DSDT) == found["DSDT"].addr


# ----------------------------------------------------------------------------------------- MADT (§5.2.12)
def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    out, off = [], t.MADT_ENTRIES
    while off < len(madt):
        typ, length = madt[off], madt[off + 1]
        assert length >= 2
        out.append((typ, madt[off : off + length]))
        off += length
    assert off == len(madt)
    return out


@pytest.mark.parametrize("vcpus", [1, 2, 4, 255])
def test_madt_has_one_enabled_local_apic_per_vcpu(vcpus: int) -> None:
    madt = placed(vcpus)["APIC"].data
    assert _u(madt, "I", t.MADT_LAPIC_ADDRESS) == 0xFEE0_0000
    assert _u(madt, "I", t.MADT_FLAGS) == t.MADT_PCAT_COMPAT
    lapics = [t.MADT_LOCAL_APIC.unpack(e) for typ, e in madt_entries(madt) if typ == t.MADT_TYPE_LOCAL_APIC]
    # Table 5.22: type, length 8, ACPI processor uid, APIC id, flags (bit 0 enabled).
    assert lapics == [(0, 8, i, i, 1) for i in range(vcpus)]


def test_madt_ioapic_isos_and_nmi() -> None:
    entries = madt_entries(placed()["APIC"].data)
    ioapics = [t.MADT_IO_APIC.unpack(e) for typ, e in entries if typ == t.MADT_TYPE_IO_APIC]
    assert ioapics == [(1, 12, 0, 0, 0xFEC0_0000, 0)]  # Table 5.24: id 0, address, GSI base 0
    isos = [t.MADT_ISO.unpack(e) for typ, e in entries if typ == t.MADT_TYPE_ISO]
    # Table 5.25: bus 0; the PIT's IRQ 0 on GSI 2 with conforming flags; the SCI level-triggered active-high.
    assert isos == [(2, 10, 0, 0, 2, 0), (2, 10, 0, 9, 9, t.INTI_POLARITY_ACTIVE_HIGH | t.INTI_TRIGGER_LEVEL)]
    assert isos[1][5] == 0x000D
    nmis = [t.MADT_LOCAL_APIC_NMI.unpack(e) for typ, e in entries if typ == t.MADT_TYPE_LOCAL_APIC_NMI]
    assert nmis == [(4, 6, 0xFF, 0, 1)]  # Table 5.27: all processors, conforming, LINT1
    assert {typ for typ, _ in entries} == {0, 1, 2, 4}


# ----------------------------------------------------------------------------------------- DSDT and FACS
def test_dsdt_is_revision_2_and_carries_the_definition_block() -> None:
    p = AcpiPlatform(vcpus=2)
    dsdt = placed()["DSDT"].data
    assert dsdt[8] == 2  # 64-bit AML integers (QWordMemory lengths, Ones)
    assert dsdt[36:] == dsdt_aml(p)


def test_dsdt_contents_are_the_objects_we_declare() -> None:
    code = dsdt_aml(AcpiPlatform(vcpus=3))
    assert code.startswith(aml.name("\\_S5", aml.package(*[aml.integer(0)] * 4)))
    for needle in (aml.name("_HID", aml.eisa_id("PNP0A03")), aml.name("_HID", aml.eisa_id("PNP0501")),
                   aml.name("_HID", aml.eisa_id("PNP0B00")), b"COM1", b"RTC_", b"PCI0", b"_PRT", b"C002"):
        assert needle in code, needle
    for absent in (b"_S3_", b"_S4_", b"_S1_", b"C003"):
        assert absent not in code


def test_facs_is_64_bytes_version_2() -> None:
    facs = placed()["FACS"].data
    assert t.FACS.unpack(facs)[:2] == (b"FACS", 64) and facs[32] == t.FACS_VERSION


def test_intx_swizzle_matches_vmm_wiring() -> None:
    p = AcpiPlatform(vcpus=1)
    for slot in range(1, 32):
        assert p.intx_gsi(slot, 0) == layout.pci_intx_gsi(slot, 0) == 16 + slot % 8
        for pin in range(4):
            assert p.intx_gsi(slot, pin) == 16 + (slot + pin) % 8


# ----------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("kw", "why"), [
    ({"vcpus": 0}, "vCPUs"),
    ({"vcpus": 256}, "vCPUs"),  # APIC id 255 is the xAPIC broadcast id
    ({"lapic_address": 1 << 32}, "Local APIC"),
    ({"ioapic_id": 256}, "IOAPIC id"),
    ({"ioapic_pins": 0}, "pins"),
    ({"pm_io_base": 0x602}, "PM block"),
    ({"pm_io_base": 0xFFF8}, "PM block"),
    ({"sci_irq": 2}, "SCI"),
    ({"sci_irq": 16}, "SCI"),
    ({"com1_irq": 0}, "COM1"),
    ({"s5_slp_typ": 8}, "SLP_TYP"),
    ({"reset_port": 0x10000}, "reset port"),
    ({"reset_value": 0x100}, "reset value"),
    ({"rtc_century": 0x80}, "CENTURY"),
    ({"pci_buses": (5, 4)}, "bus range"),
    ({"pci_io_windows": ((0x0000, 0x0D00),)}, "config ports"),
    ({"pci_io_windows": ((0x0D00, 0x1_0000), (0x0000, 0x0CF8))}, "out of order"),
    ({"pci_io_windows": ((0x0D00, 0x2_0000),)}, "past 0xFFFF"),
    ({"pci_mmio32": (0xC000_0000, (1 << 32) + 1)}, "32-bit"),
    ({"pci_mmio64": (0xC000_0000, 1 << 40)}, "64-bit"),
    ({"pci_intx_gsi_count": 0}, "INTx"),
    ({"pci_intx_gsi_base": 20}, "INTx GSI"),  # 20 + 8 - 1 = 27: past the 24 IOAPIC pins
    ({"pci_intx_gsi_base": 8}, "ISA"),
])
def test_platform_rejects_what_acpi_cannot_describe(kw: dict[str, object], why: str) -> None:
    args: dict[str, object] = {"vcpus": 1} | kw
    with pytest.raises(AcpiConfigError, match=why):
        AcpiPlatform(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw", [{"oem_id": "TOOLONG"}, {"oem_table_id": "NINECHARS"}, {"creator_id": "KVMDM"},
                                {"oem_id": "KV\u00c9"}, {"oem_revision": -1}, {"creator_revision": 1 << 32}])
def test_oem_ids_must_fit_their_fields(kw: dict[str, object]) -> None:
    with pytest.raises(t.AcpiTableError):
        t.OemIds(**kw)  # type: ignore[arg-type]


def test_sdt_rejects_a_bad_signature() -> None:
    with pytest.raises(t.AcpiTableError):
        t.sdt(b"APICX", 1, b"", t.OemIds())


def test_checksum_helper() -> None:
    data = b"\x01\x02\x03"
    assert (sum(data) + t.checksum(data)) % 256 == 0


def test_build_tables_is_memoized_per_platform_and_its_result_immutable() -> None:
    a, b = build_tables(AcpiPlatform(vcpus=3)), build_tables(AcpiPlatform(vcpus=3))
    assert a is b  # the DM zygote builds the common platforms once for every DM it forks
    assert build_tables(AcpiPlatform(vcpus=2)) != a
    with pytest.raises(AttributeError):
        a.blobs = ()  # type: ignore[misc]
    assert all(isinstance(blob.data, bytes) for blob in a.blobs)
