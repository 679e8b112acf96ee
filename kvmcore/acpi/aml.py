"""A small AML encoder (ACPI 6.5 §20 "ACPI Machine Language (AML) Specification") for the tables kvmdm builds.

Every function returns the encoded bytes of one AML term or data object, so a table is plain concatenation:

    scope("\\_SB", device("PCI0", name("_HID", eisa_id("PNP0A03")), name("_UID", integer(0))))

The encoder is pure (no I/O) and only ever sees host-chosen values: anything it cannot represent is a programming
error in kvmdm and raises an :class:`AmlError` subclass at build time, never a guest-visible fault.

Resource descriptors (§6.4 "Resource Data Types for ACPI") are encoded separately and wrapped by
:func:`resource_template`, which appends the End Tag and makes the whole a Buffer, as ASL's ResourceTemplate does.
"""

from __future__ import annotations

import struct

# ---------------------------------------------------------------------------------------- opcodes (§20.3, §20.2.x)
ZERO_OP = 0x00
ONE_OP = 0x01
ALIAS_OP = 0x06
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
DEVICE_OP = (EXT_OP_PREFIX, 0x82)
ROOT_CHAR = 0x5C  # '\'
PARENT_PREFIX_CHAR = 0x5E  # '^'
NULL_NAME = 0x00
RETURN_OP = 0xA4
ONES_OP = 0xFF

# §20.2.4 PkgLength: one byte holds 0..63; 2, 3 or 4 bytes hold 12, 20 or 28 bits.
PKG_LENGTH_MAX = (1 << 28) - 1
_PKG_LENGTH_LIMITS = (0x3F, (1 << 12) - 1, (1 << 20) - 1, PKG_LENGTH_MAX)

U64_MAX = (1 << 64) - 1
NAME_SEG_LEN = 4
MAX_PACKAGE_ELEMENTS = 255  # PackageOp's NumElements is a ByteData (§20.2.5.4)
MAX_METHOD_ARGS = 7  # MethodFlags bits 0-2 (§20.2.5.2)
MAX_SYNC_LEVEL = 15  # MethodFlags bits 4-7


class AmlError(ValueError):
    """An AML object was asked for that the encoding cannot represent (a host-side programming error)."""


class AmlNameError(AmlError):
    """A NameSeg or NameString is malformed: a NameSeg is 1-4 of [A-Z0-9_] not starting with a digit (§20.2.2)."""


class AmlRangeError(AmlError):
    """A number does not fit the field that encodes it (integer width, PkgLength, element count, descriptor field)."""


class AmlStringError(AmlError):
    """An AML String holds only ASCII 0x01-0x7F and is NUL-terminated by the encoder (§20.2.3 AsciiCharList)."""


class AmlEisaIdError(AmlError):
    """An EISA id is three upper-case letters and four hex digits, e.g. "PNP0A03" (§6.1.5 _HID)."""


# ------------------------------------------------------------------------------------------------ package lengths
def pkg_length(value: int) -> bytes:
    """Encode ``value`` as a PkgLength (§20.2.4). ``value`` already counts the PkgLength bytes themselves.

    One byte: bits 7-6 = 0, bits 5-0 = value (0..63). Otherwise bits 7-6 = how many bytes follow (1-3), bits 3-0
    the low nibble of the value, and each following byte the next 8 bits.
    """
    if not 0 <= value <= PKG_LENGTH_MAX:
        raise AmlRangeError(f"PkgLength {value} is outside 0..{PKG_LENGTH_MAX}")
    if value <= _PKG_LENGTH_LIMITS[0]:
        return bytes([value])
    follow = next(i for i, limit in enumerate(_PKG_LENGTH_LIMITS) if value <= limit)
    out = bytearray([(follow << 6) | (value & 0x0F)])
    rest = value >> 4
    for _ in range(follow):
        out.append(rest & 0xFF)
        rest >>= 8
    return bytes(out)


def pkg_wrap(body: bytes) -> bytes:
    """PkgLength + body, where the length covers itself and the body (the smallest encoding that fits)."""
    for nbytes, limit in enumerate(_PKG_LENGTH_LIMITS, start=1):
        if len(body) + nbytes <= limit:
            return pkg_length(len(body) + nbytes) + body
    raise AmlRangeError(f"a package body of {len(body)} bytes is longer than PkgLength can describe")


# -------------------------------------------------------------------------------------------------------- names
_LEAD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _LEAD_CHARS | frozenset(b"0123456789")


def name_seg(seg: str) -> bytes:
    """A 4-byte NameSeg (§20.2.2); shorter names are padded with '_' as ASL does ("RTC" -> "RTC_")."""
    raw = seg.encode("ascii", errors="replace")
    if not 1 <= len(raw) <= NAME_SEG_LEN or raw[0] not in _LEAD_CHARS or any(c not in _NAME_CHARS for c in raw):
        raise AmlNameError(f"invalid NameSeg {seg!r}: 1-4 of [A-Z0-9_], not starting with a digit")
    return raw.ljust(NAME_SEG_LEN, b"_")


def name_string(path: str) -> bytes:
    """A NameString (§20.2.2): optional '\\' (root) or '^'... (parent) prefix, then dot-separated NameSegs.

    No segment: NullName; one: the NameSeg; two: DualNamePrefix; three or more: MultiNamePrefix + count.
    """
    i = 0
    if path.startswith("\\"):
        prefix = bytes([ROOT_CHAR])
        i = 1
    else:
        while i < len(path) and path[i] == "^":
            i += 1
        prefix = bytes([PARENT_PREFIX_CHAR]) * i
    rest = path[i:]
    segs = [name_seg(s) for s in rest.split(".")] if rest else []
    if not segs:
        if not prefix:
            raise AmlNameError("an empty NameString names nothing (use '\\' for the root)")
        return prefix + bytes([NULL_NAME])
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + segs[0] + segs[1]
    if len(segs) > 255:
        raise AmlNameError(f"a NameString has at most 255 segments, got {len(segs)}")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


# ------------------------------------------------------------------------------------------------- data objects
def integer(value: int) -> bytes:
    """The shortest ComputationalData for ``value`` (§20.2.3): Zero, One, Ones (all 64 bits set; DSDT revision
    2 or later, where integers are 64-bit), else BytePrefix/WordPrefix/DWordPrefix/QWordPrefix + little-endian."""
    if not 0 <= value <= U64_MAX:
        raise AmlRangeError(f"AML integer {value} is outside 0..2**64-1")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value == U64_MAX:
        return bytes([ONES_OP])
    if value <= 0xFF:
        return bytes([BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value <= 0xFFFF_FFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    """StringPrefix AsciiCharList NullChar (§20.2.3)."""
    if not text.isascii() or "\0" in text:
        raise AmlStringError(f"AML string {text!r} must be ASCII 0x01-0x7F")
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\x00"


def buffer(data: bytes) -> bytes:
    """BufferOp PkgLength BufferSize ByteList (§20.2.5.4 DefBuffer); BufferSize is the byte count."""
    return bytes([BUFFER_OP]) + pkg_wrap(integer(len(data)) + bytes(data))


def package(*elements: bytes) -> bytes:
    """PackageOp PkgLength NumElements PackageElementList (§20.2.5.4 DefPackage). Elements are encoded data
    objects (integer(), string(), package(), buffer()) or NameStrings."""
    if len(elements) > MAX_PACKAGE_ELEMENTS:
        raise AmlRangeError(f"a Package holds at most {MAX_PACKAGE_ELEMENTS} elements, got {len(elements)}")
    return bytes([PACKAGE_OP]) + pkg_wrap(bytes([len(elements)]) + b"".join(elements))


def eisa_id_value(eisa: str) -> int:
    """The 32-bit compressed EISA id (§6.1.5 _HID; ASL EISAID()): the three letters as 5-bit values ('A' = 1) in
    bits 30-16, the four hex digits in bits 15-0, then byte-swapped so the bytes read in that order."""
    if (len(eisa) != 7 or not all("A" <= c <= "Z" for c in eisa[:3])
            or not all(c in "0123456789ABCDEF" for c in eisa[3:])):
        raise AmlEisaIdError(f"invalid EISA id {eisa!r} (want e.g. 'PNP0A03')")
    value = (((ord(eisa[0]) - 0x40) << 26) | ((ord(eisa[1]) - 0x40) << 21) | ((ord(eisa[2]) - 0x40) << 16)
             | int(eisa[3:], 16))
    return int.from_bytes(value.to_bytes(4, "big"), "little")


def eisa_id(eisa: str) -> bytes:
    """EISAID("PNP0A03") as an AML integer (always DWordPrefix: the value never fits a smaller one)."""
    return integer(eisa_id_value(eisa))


# ------------------------------------------------------------------------------------- named objects and methods
def name(path: str, value: bytes) -> bytes:
    """NameOp NameString DataRefObject (§20.2.5.1 DefName)."""
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, *terms: bytes) -> bytes:
    """ScopeOp PkgLength NameString TermList (§20.2.5.1 DefScope)."""
    return bytes([SCOPE_OP]) + pkg_wrap(name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    """ExtOpPrefix DeviceOp PkgLength NameString TermList (§20.2.5.2 DefDevice)."""
    return bytes(DEVICE_OP) + pkg_wrap(name_string(path) + b"".join(terms))


def method(path: str, nargs: int, *terms: bytes, serialized: bool = False, sync_level: int = 0) -> bytes:
    """MethodOp PkgLength NameString MethodFlags TermList (§20.2.5.2 DefMethod).

    MethodFlags: bits 0-2 ArgCount, bit 3 SerializeFlag, bits 4-7 SyncLevel.
    """
    if not 0 <= nargs <= MAX_METHOD_ARGS:
        raise AmlRangeError(f"a Method takes 0..{MAX_METHOD_ARGS} arguments, got {nargs}")
    if not 0 <= sync_level <= MAX_SYNC_LEVEL:
        raise AmlRangeError(f"a Method's SyncLevel is 0..{MAX_SYNC_LEVEL}, got {sync_level}")
    flags = nargs | (0x08 if serialized else 0) | (sync_level << 4)
    return bytes([METHOD_OP]) + pkg_wrap(name_string(path) + bytes([flags]) + b"".join(terms))


def return_(value: bytes) -> bytes:
    """ReturnOp ArgObject (§20.2.5.3 DefReturn), e.g. return_(integer(0x0F)) or return_(package(...))."""
    return bytes([RETURN_OP]) + value


# ------------------------------------------------------------------------------ resource descriptors (§6.4)
# Small items: tag byte = 0 | item name (bits 6-3) | length (bits 2-0). Large items: 1 | item name, then a
# 16-bit length of what follows.
IRQ_NO_FLAGS_TAG = 0x22  # §6.4.2.1 IRQ Descriptor, length 2 (no information byte)
IO_PORT_TAG = 0x47  # §6.4.2.5 I/O Port Descriptor, length 7
END_TAG = 0x79  # §6.4.2.9 End Tag, length 1
DWORD_ADDRESS_TAG = 0x87  # §6.4.3.5.2
EXTENDED_IRQ_TAG = 0x89  # §6.4.3.6
WORD_ADDRESS_TAG = 0x88  # §6.4.3.5.3
QWORD_ADDRESS_TAG = 0x8A  # §6.4.3.5.1

IO_DECODE16 = 0x01  # I/O descriptor information bit 0: the device decodes 16 address bits (else 10)

# Address space descriptors: Resource Type (byte 3), General Flags (byte 4), Type Specific Flags (byte 5).
RESOURCE_TYPE_MEMORY = 0
RESOURCE_TYPE_IO = 1
RESOURCE_TYPE_BUS_NUMBER = 2
GEN_FLAG_CONSUMER = 0x01  # bit 0: 1 = this device consumes the range; 0 = it produces it (a bridge window)
GEN_FLAG_SUB_DECODE = 0x02  # _DEC
GEN_FLAG_MIN_FIXED = 0x04  # _MIF
GEN_FLAG_MAX_FIXED = 0x08  # _MAF
MEM_FLAG_READ_WRITE = 0x01  # _RW
MEM_CACHEABILITY = {"non-cacheable": 0, "cacheable": 1, "write-combining": 2, "prefetchable": 3}  # _MEM, bits 2-1
IO_RANGE_ENTIRE = 0x03  # _RNG: both ISA and non-ISA ranges

# Extended Interrupt Descriptor flags (§6.4.3.6, byte 3).
INT_FLAG_CONSUMER = 0x01
INT_FLAG_EDGE = 0x02  # _HE: 1 edge, 0 level
INT_FLAG_ACTIVE_LOW = 0x04  # _LL
INT_FLAG_SHARED = 0x08  # _SHR
INT_FLAG_WAKE = 0x10

ISA_IRQS = 16


def _check(value: int, bits: int, what: str) -> int:
    if not 0 <= value < (1 << bits):
        raise AmlRangeError(f"{what} {value:#x} does not fit in {bits} bits")
    return value


def io(minimum: int, maximum: int, alignment: int, length: int, *, decode16: bool = True) -> bytes:
    """IO (Decode16, min, max, align, len) (§6.4.2.5)."""
    limit = 16 if decode16 else 10
    _check(minimum, limit, "I/O minimum base")
    _check(maximum, limit, "I/O maximum base")
    if maximum < minimum:
        raise AmlRangeError(f"I/O maximum base {maximum:#x} is below the minimum {minimum:#x}")
    _check(alignment, 8, "I/O alignment")
    _check(length, 8, "I/O length")
    return struct.pack("<BBHHBB", IO_PORT_TAG, IO_DECODE16 if decode16 else 0, minimum, maximum, alignment, length)


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags () {irqs} (§6.4.2.1): a 16-bit mask of ISA IRQs, edge-triggered active-high, exclusive."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq < ISA_IRQS:
            raise AmlRangeError(f"IRQ descriptor lists ISA IRQs 0..15, got {irq}")
        mask |= 1 << irq
    return struct.pack("<BH", IRQ_NO_FLAGS_TAG, mask)


def interrupt(*gsis: int, consumer: bool = True, edge: bool = False, active_low: bool = False,
              shared: bool = False, wake: bool = False) -> bytes:
    """Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive) {gsis} (§6.4.3.6 Extended Interrupt
    Descriptor); no ResourceSource."""
    if not 1 <= len(gsis) <= 255:
        raise AmlRangeError(f"an Interrupt descriptor lists 1..255 interrupts, got {len(gsis)}")
    flags = ((INT_FLAG_CONSUMER if consumer else 0) | (INT_FLAG_EDGE if edge else 0)
             | (INT_FLAG_ACTIVE_LOW if active_low else 0) | (INT_FLAG_SHARED if shared else 0)
             | (INT_FLAG_WAKE if wake else 0))
    body = bytes([flags, len(gsis)]) + b"".join(struct.pack("<I", _check(g, 32, "interrupt number")) for g in gsis)
    return struct.pack("<BH", EXTENDED_IRQ_TAG, len(body)) + body


def _address_space(tag: int, bits: int, resource_type: int, type_flags: int, minimum: int, maximum: int,
                   length: int | None, granularity: int, translation: int, producer: bool,
                   min_fixed: bool, max_fixed: bool, sub_decode: bool) -> bytes:
    """Word/DWord/QWord Address Space Descriptor (§6.4.3.5.1-3): type, general flags, type flags, then
    _GRA, _MIN, _MAX, _TRA, _LEN in the descriptor's width."""
    if length is None:
        length = maximum - minimum + 1
    for value, what in ((granularity, "granularity"), (minimum, "minimum"), (maximum, "maximum"),
                        (translation, "translation offset"), (length, "length")):
        _check(value, bits, f"address space {what}")
    if maximum < minimum:
        raise AmlRangeError(f"address space maximum {maximum:#x} is below the minimum {minimum:#x}")
    if min_fixed and max_fixed and length:
        # §6.4.3.5 Table "Valid combination of Address Space Descriptor fields": a fixed-size, fixed-location
        # range has _GRA = 0 and _LEN = _MAX - _MIN + 1.
        if length != maximum - minimum + 1 or granularity != 0:
            raise AmlRangeError(f"fixed address range {minimum:#x}..{maximum:#x} needs length "
                                f"{maximum - minimum + 1:#x} and granularity 0, got {length:#x}, {granularity:#x}")
    gflags = ((0 if producer else GEN_FLAG_CONSUMER) | (GEN_FLAG_SUB_DECODE if sub_decode else 0)
              | (GEN_FLAG_MIN_FIXED if min_fixed else 0) | (GEN_FLAG_MAX_FIXED if max_fixed else 0))
    fmt = {16: "H", 32: "I", 64: "Q"}[bits]
    body = struct.pack(f"<BBB5{fmt}", resource_type, gflags, type_flags, granularity, minimum, maximum,
                       translation, length)
    return struct.pack("<BH", tag, len(body)) + body


def word_bus_number(minimum: int, maximum: int, *, producer: bool = True) -> bytes:
    """WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, len) (§6.4.3.5.3)."""
    return _address_space(WORD_ADDRESS_TAG, 16, RESOURCE_TYPE_BUS_NUMBER, 0, minimum, maximum, None, 0, 0,
                          producer, True, True, False)


def word_io(minimum: int, maximum: int, *, producer: bool = True) -> bytes:
    """WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, min, max, 0, len)."""
    return _address_space(WORD_ADDRESS_TAG, 16, RESOURCE_TYPE_IO, IO_RANGE_ENTIRE, minimum, maximum, None, 0, 0,
                          producer, True, True, False)


def _mem_flags(cacheability: str, read_write: bool) -> int:
    if cacheability not in MEM_CACHEABILITY:
        raise AmlRangeError(f"memory cacheability {cacheability!r} is not one of {sorted(MEM_CACHEABILITY)}")
    return (MEM_CACHEABILITY[cacheability] << 1) | (MEM_FLAG_READ_WRITE if read_write else 0)


def dword_memory(minimum: int, maximum: int, *, cacheability: str = "non-cacheable", read_write: bool = True,
                 producer: bool = True) -> bytes:
    """DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, <cacheability>, ReadWrite, 0, min, max, 0,
    len) (§6.4.3.5.2)."""
    return _address_space(DWORD_ADDRESS_TAG, 32, RESOURCE_TYPE_MEMORY, _mem_flags(cacheability, read_write),
                          minimum, maximum, None, 0, 0, producer, True, True, False)


def qword_memory(minimum: int, maximum: int, *, cacheability: str = "non-cacheable", read_write: bool = True,
                 producer: bool = True) -> bytes:
    """QWordMemory (...) like dword_memory, with 64-bit fields (§6.4.3.5.1)."""
    return _address_space(QWORD_ADDRESS_TAG, 64, RESOURCE_TYPE_MEMORY, _mem_flags(cacheability, read_write),
                          minimum, maximum, None, 0, 0, producer, True, True, False)


def end_tag(preceding: bytes = b"", *, checksum: bool = False) -> bytes:
    """End Tag (§6.4.2.9). Its checksum byte makes the template's bytes sum to zero; 0 means "treat the checksum
    as valid", which is what ASL compilers emit and what we use unless asked."""
    if not checksum:
        return bytes([END_TAG, 0])
    return bytes([END_TAG, (-(sum(preceding) + END_TAG)) & 0xFF])


def resource_template(*descriptors: bytes, checksum: bool = False) -> bytes:
    """ResourceTemplate () {...}: a Buffer of the descriptors followed by an End Tag."""
    body = b"".join(descriptors)
    return buffer(body + end_tag(body, checksum=checksum))
