"""kvmcore.acpi.aml against encodings derived by hand from ACPI 6.5 §20 (AML grammar) and §6.4 (resources)."""

from __future__ import annotations

import pytest

from kvmcore.acpi import aml


# ------------------------------------------------------------------------------------- §20.2.4 PkgLength
@pytest.mark.parametrize(("value", "encoded"), [
    (0, b"\x00"),
    (63, b"\x3f"),  # the largest one-byte PkgLength: bits 5-0
    (64, b"\x40\x04"),  # ByteCount 1 in bits 7-6, low nibble 0, then 64 >> 4
    (0x123, b"\x43\x12"),
    (4095, b"\x4f\xff"),  # 12 bits: the largest two-byte value
    (4096, b"\x80\x00\x01"),  # ByteCount 2: 4096 >> 4 = 0x100 little-endian
    ((1 << 20) - 1, b"\x8f\xff\xff"),
    (1 << 20, b"\xc0\x00\x00\x01"),
    ((1 << 28) - 1, b"\xcf\xff\xff\xff"),  # 28 bits: the largest PkgLength there is
])
def test_pkg_length_uses_one_to_four_bytes_at_the_spec_boundaries(value: int, encoded: bytes) -> None:
    assert aml.pkg_length(value) == encoded


@pytest.mark.parametrize("value", [-1, 1 << 28])
def test_pkg_length_rejects_values_it_cannot_encode(value: int) -> None:
    with pytest.raises(aml.AmlRangeError):
        aml.pkg_length(value)


@pytest.mark.parametrize(("body_len", "prefix"), [
    (62, b"\x3f"),  # 62 + 1 = 63 still fits one byte
    (63, b"\x41\x04"),  # 63 + 1 = 64 does not: two bytes, total 65
    (4093, b"\x4f\xff"),  # 4093 + 2 = 4095
    (4094, b"\x81\x00\x01"),  # 4094 + 2 = 4096 > 4095: three bytes, total 4097
])
def test_pkg_wrap_counts_its_own_length_bytes(body_len: int, prefix: bytes) -> None:
    out = aml.pkg_wrap(bytes(body_len))
    assert out == prefix + bytes(body_len)


# ------------------------------------------------------------------------------------- §20.2.2 names
@pytest.mark.parametrize(("seg", "encoded"), [("_HID", b"_HID"), ("RTC", b"RTC_"), ("C0FE", b"C0FE"), ("A", b"A___")])
def test_name_seg_pads_short_names_with_underscores(seg: str, encoded: bytes) -> None:
    assert aml.name_seg(seg) == encoded


@pytest.mark.parametrize("seg", ["", "PCI00", "0ABC", "pci0", "A-B", "É"])
def test_name_seg_rejects_malformed_segments(seg: str) -> None:
    with pytest.raises(aml.AmlNameError):
        aml.name_seg(seg)


@pytest.mark.parametrize(("path", "encoded"), [
    ("_S5", b"_S5_"),
    ("\\_S5", b"\\_S5_"),  # RootChar NameSeg
    ("\\", b"\\\x00"),  # RootChar NullName
    ("\\_SB.PCI0", b"\\\x2e_SB_PCI0"),  # DualNamePrefix
    ("_SB.PCI0.COM1", b"\x2f\x03_SB_PCI0COM1"),  # MultiNamePrefix SegCount
    ("^^FOO", b"^^FOO_"),  # ParentPrefixChar per level
])
def test_name_string_prefixes(path: str, encoded: bytes) -> None:
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("path", ["", "\\_SB.PCI00", "\\_SB..PCI0", "A." * 256 + "A"])
def test_name_string_rejects_malformed_paths(path: str) -> None:
    with pytest.raises(aml.AmlNameError):
        aml.name_string(path)


# ------------------------------------------------------------------------------------- §20.2.3 data objects
@pytest.mark.parametrize(("value", "encoded"), [
    (0, b"\x00"),  # ZeroOp
    (1, b"\x01"),  # OneOp
    (2, b"\x0a\x02"),  # BytePrefix
    (0xFF, b"\x0a\xff"),
    (0x100, b"\x0b\x00\x01"),  # WordPrefix
    (0xFFFF, b"\x0b\xff\xff"),
    (0x1_0000, b"\x0c\x00\x00\x01\x00"),  # DWordPrefix
    (0xFFFF_FFFF, b"\x0c\xff\xff\xff\xff"),
    (1 << 32, b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"),  # QWordPrefix
    ((1 << 64) - 1, b"\xff"),  # OnesOp (64-bit in a revision-2 DSDT)
])
def test_integer_uses_the_shortest_encoding(value: int, encoded: bytes) -> None:
    assert aml.integer(value) == encoded


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_integer_rejects_values_outside_64_bits(value: int) -> None:
    with pytest.raises(aml.AmlRangeError):
        aml.integer(value)


def test_string_is_prefixed_and_nul_terminated() -> None:
    assert aml.string("ACPI0007") == b"\x0dACPI0007\x00"
    assert aml.string("") == b"\x0d\x00"


@pytest.mark.parametrize("text", ["a\0b", "caf\u00e9"])
def test_string_rejects_nul_and_non_ascii(text: str) -> None:
    with pytest.raises(aml.AmlStringError):
        aml.string(text)


def test_buffer_is_bufferop_pkglength_size_bytes() -> None:
    assert aml.buffer(b"\x79\x00") == b"\x11\x05\x0a\x02\x79\x00"
    assert aml.buffer(b"") == b"\x11\x02\x00"


def test_package_counts_its_elements() -> None:
    pkg = aml.package(*(aml.integer(0) for _ in range(4)))
    assert pkg == b"\x12\x06\x04\x00\x00\x00\x00"


def test_package_rejects_more_than_255_elements() -> None:
    assert aml.package(*[aml.integer(0)] * 255)[0] == aml.PACKAGE_OP
    with pytest.raises(aml.AmlRangeError):
        aml.package(*[aml.integer(0)] * 256)


# ------------------------------------------------------------------------------------- §6.1.5 EISAID
@pytest.mark.parametrize(("eisa", "value"), [
    ("PNP0A03", 0x030AD041),  # the PCI host bridge id every DSDT carries
    ("PNP0501", 0x0105D041),
    ("PNP0B00", 0x000BD041),
])
def test_eisa_id_compresses_and_swaps(eisa: str, value: int) -> None:
    assert aml.eisa_id_value(eisa) == value
    assert aml.eisa_id(eisa) == b"\x0c" + value.to_bytes(4, "little")


@pytest.mark.parametrize("eisa", ["PNP0A0", "PNP0A033", "pnp0a03", "PNP0A0G", "1NP0A03"])
def test_eisa_id_rejects_malformed_ids(eisa: str) -> None:
    with pytest.raises(aml.AmlEisaIdError):
        aml.eisa_id(eisa)


# ------------------------------------------------------------------------------------- named objects
def test_name_of_hid_matches_the_asl_compiler_output() -> None:
    # Name (_HID, EisaId ("PNP0A03")) as iasl compiles it.
    assert aml.name("_HID", aml.eisa_id("PNP0A03")) == bytes.fromhex("085f4849440c41d00a03")


def test_scope_and_device_wrap_name_and_terms() -> None:
    inner = aml.name("_UID", aml.integer(0))  # 08 _UID 00
    assert aml.device("PCI0", inner) == b"\x5b\x82" + bytes([1 + 4 + len(inner)]) + b"PCI0" + inner
    assert aml.scope("\\_SB", inner) == b"\x10" + bytes([1 + 5 + len(inner)]) + b"\\_SB_" + inner


def test_method_returning_a_constant() -> None:
    # Method (_STA, 0, NotSerialized) { Return (0x0F) }
    assert aml.method("_STA", 0, aml.return_(aml.integer(0x0F))) == bytes.fromhex("14095f535441") + b"\x00\xa4\x0a\x0f"


def test_method_flags_carry_args_serialization_and_sync_level() -> None:
    out = aml.method("_PRT", 2, aml.return_(aml.package()), serialized=True, sync_level=3)
    assert out[6] == 0x02 | 0x08 | 0x30
    assert out.endswith(b"\xa4\x12\x02\x00")


@pytest.mark.parametrize(("nargs", "sync"), [(8, 0), (-1, 0), (0, 16)])
def test_method_rejects_bad_flags(nargs: int, sync: int) -> None:
    with pytest.raises(aml.AmlRangeError):
        aml.method("FOO", nargs, sync_level=sync)


# ------------------------------------------------------------------------------------- §6.4 resources
def test_io_descriptor_decode16() -> None:
    # IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08): tag 0x47, info bit 0, min, max, align, length.
    assert aml.io(0x3F8, 0x3F8, 1, 8) == bytes.fromhex("4701f803f8030108")
    assert aml.io(0x70, 0x70, 1, 2, decode16=False)[1] == 0


@pytest.mark.parametrize(("args", "kw"), [((0x10000, 0x10000, 1, 8), {}), ((0x400, 0x400, 1, 8), {"decode16": False}),
                                          ((0x10, 0x8, 1, 8), {}), ((0, 0, 256, 1), {}), ((0, 0, 1, 256), {})])
def test_io_descriptor_rejects_out_of_range_fields(args: tuple[int, int, int, int], kw: dict[str, bool]) -> None:
    with pytest.raises(aml.AmlRangeError):
        aml.io(*args, **kw)


def test_irq_no_flags_is_a_mask() -> None:
    assert aml.irq_no_flags(4) == b"\x22\x10\x00"
    assert aml.irq_no_flags(8) == b"\x22\x00\x01"
    assert aml.irq_no_flags(1, 15) == b"\x22\x02\x80"
    with pytest.raises(aml.AmlRangeError):
        aml.irq_no_flags(16)


def test_extended_interrupt_level_active_high() -> None:
    # Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive) {9}: 0x89, length 6, flags 0x01, count 1, GSI.
    assert aml.interrupt(9) == bytes.fromhex("8906000101" "09000000")
    assert aml.interrupt(5, 6, edge=True, active_low=True, shared=True)[3] == 0x01 | 0x02 | 0x04 | 0x08
    with pytest.raises(aml.AmlRangeError):
        aml.interrupt()
    with pytest.raises(aml.AmlRangeError):
        aml.interrupt(1 << 32)


def test_word_bus_number_matches_iasl() -> None:
    # WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0x0000, 0x0000, 0x00FF, 0x0000, 0x0100)
    assert aml.word_bus_number(0, 0xFF) == bytes.fromhex("880d00020c00" "0000" "0000" "ff00" "0000" "0001")


def test_word_io_entire_range() -> None:
    out = aml.word_io(0x0D00, 0xFFFF)
    assert out[:6] == bytes.fromhex("880d00010c03")  # type I/O, min/max fixed, producer, EntireRange
    assert out[8:] == bytes.fromhex("000dffff0000" "00f3")


def test_dword_and_qword_memory_fields() -> None:
    d = aml.dword_memory(0xC000_0000, 0xFEBF_FFFF)
    assert d[:6] == bytes.fromhex("871700000c01")  # memory, fixed, producer, non-cacheable read/write
    assert int.from_bytes(d[22:26], "little") == 0x3EC0_0000  # _LEN
    c = aml.dword_memory(0xA0000, 0xBFFFF, cacheability="cacheable")
    assert c[5] == 0x03
    q = aml.qword_memory(1 << 40, (1 << 40) + (64 << 30) - 1, cacheability="cacheable")
    assert q[:6] == bytes.fromhex("8a2b00000c03") and len(q) == 3 + 0x2B
    assert int.from_bytes(q[38:46], "little") == 64 << 30


@pytest.mark.parametrize("call", [
    lambda: aml.dword_memory(0, 1 << 32),
    lambda: aml.dword_memory(10, 5),
    lambda: aml.word_io(0, 0x10000),
    lambda: aml.qword_memory(0, 1 << 64),
    lambda: aml.dword_memory(0, 10, cacheability="sometimes"),
])
def test_address_space_descriptors_reject_bad_ranges(call: object) -> None:
    with pytest.raises(aml.AmlRangeError):
        call()  # type: ignore[operator]


def test_fixed_address_range_length_must_match() -> None:
    with pytest.raises(aml.AmlRangeError):
        aml._address_space(aml.WORD_ADDRESS_TAG, 16, aml.RESOURCE_TYPE_IO, 3, 0, 0xFF, 0x80, 0, 0, True, True,
                           True, False)


def test_resource_template_appends_an_end_tag() -> None:
    tmpl = aml.resource_template(aml.irq_no_flags(4))
    assert tmpl == b"\x11\x08\x0a\x05" + b"\x22\x10\x00" + b"\x79\x00"


def test_end_tag_checksum_makes_the_template_sum_to_zero() -> None:
    tmpl = aml.resource_template(aml.io(0x3F8, 0x3F8, 1, 8), aml.irq_no_flags(4), checksum=True)
    descriptors = tmpl[4:]  # BufferOp, PkgLength, BytePrefix size
    assert descriptors[-2] == aml.END_TAG and descriptors[-1] != 0
    assert sum(descriptors) % 256 == 0
