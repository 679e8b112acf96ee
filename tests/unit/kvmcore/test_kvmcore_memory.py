"""GuestMemory: checked (gpa, length) accesses over memfd-backed regions, typed errors, layout validation."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import re
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmcore import layout, memory
from kvmcore.layout import GIB, MIB
from kvmcore.memory import (
    PAGE_SIZE,
    GuestAddressOverflow,
    GuestMemory,
    GuestMemoryError,
    InvalidGuestAddress,
    MemoryLayoutError,
)

U64_END = 1 << 64

# Two small regions with a gap between them, like ram_layout's split around the PCI hole but cheap.
LOW = (0, 64 * 1024)
HIGH = (1 * MIB, 32 * 1024)


@pytest.fixture
def two() -> Iterator[GuestMemory]:
    m = GuestMemory.create([LOW, HIGH])
    yield m
    m.close()


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


# ---------------------------------------------------------------------------------------------- construction
def test_create_64mib_is_one_region_at_zero() -> None:
    with GuestMemory.create(layout.ram_layout(64 * MIB)) as m:
        assert list(m.regions()) == [(0, 64 * MIB)]
        assert m.size == 64 * MIB
        assert m.read(0, 16) == bytes(16)  # memfd pages start zeroed


def test_create_5gib_splits_around_the_pci_hole_and_maps_both_regions() -> None:
    # 4 GiB + 1 GiB: the memfd is sparse, untouched pages cost nothing.
    lay = layout.ram_layout(4 * GIB + 1 * GIB)
    assert lay == [(0, layout.LOW_RAM_END), (layout.HIGH_RAM_START, 5 * GIB - layout.LOW_RAM_END)]
    with GuestMemory.create(lay) as m:
        assert list(m.regions()) == lay
        assert m.size == 5 * GIB
        m.write_u64(layout.LOW_RAM_END - 8, 0x1122334455667788)
        m.write_u64(layout.HIGH_RAM_START, 0xAABBCCDD)
        assert m.read_u64(layout.LOW_RAM_END - 8) == 0x1122334455667788
        assert m.read_u64(layout.HIGH_RAM_START) == 0xAABBCCDD
        assert not m.contains(layout.PCI_MMIO32_START)
        assert not m.contains(layout.LAPIC_BASE)
        with pytest.raises(InvalidGuestAddress):
            m.read_u8(layout.IOAPIC_BASE)


def test_slots_describe_each_region_with_its_host_mapping_and_fd_offset(two: GuestMemory) -> None:
    slots = two.slots()
    assert [(s.slot, s.gpa, s.size) for s in slots] == [(0, *LOW), (1, *HIGH)]
    assert slots[0].fd == slots[1].fd  # one memfd for all regions
    assert [s.fd_offset for s in slots] == [0, LOW[1]]
    two.write(HIGH[0] + 5, b"slot!")
    assert ctypes.string_at(slots[1].host_addr + 5, 5) == b"slot!"


def test_regions_are_sorted_by_address_even_if_given_out_of_order() -> None:
    with GuestMemory.create([HIGH, LOW]) as m:
        assert list(m.regions()) == [LOW, HIGH]
        m.write(HIGH[0], b"hi")
        m.write(0, b"lo")
        assert m.read(HIGH[0], 2) == b"hi" and m.read(0, 2) == b"lo"


# ---------------------------------------------------------------------------------------------- accesses
def test_read_write_roundtrip_in_both_regions(two: GuestMemory) -> None:
    two.write(0x10, b"hello")
    two.write(HIGH[0] + 0x20, bytearray(b"world"))
    two.write(0x30, memoryview(b"view"))
    assert two.read(0x10, 5) == b"hello"
    assert two.read(HIGH[0] + 0x20, 5) == b"world"
    assert two.read(0x30, 4) == b"view"


def test_typed_integer_accessors_are_little_endian(two: GuestMemory) -> None:
    two.write_u8(0, 0xAB)
    two.write_u16(2, 0x1234)
    two.write_u32(4, 0xDEADBEEF)
    two.write_u64(8, 0x0102030405060708)
    assert two.read(0, 16) == bytes.fromhex("ab00 3412 efbeadde 0807060504030201")
    assert (two.read_u8(0), two.read_u16(2), two.read_u32(4), two.read_u64(8)) == (
        0xAB, 0x1234, 0xDEADBEEF, 0x0102030405060708)


def test_unpack_from_and_pack_into_use_the_given_struct(two: GuestMemory) -> None:
    desc = struct.Struct("<QIHH")  # a virtq descriptor
    two.pack_into(desc, HIGH[0] + 0x100, 0x1000, 512, 1, 7)
    assert two.unpack_from(desc, HIGH[0] + 0x100) == (0x1000, 512, 1, 7)
    assert two.read(HIGH[0] + 0x100, 16) == desc.pack(0x1000, 512, 1, 7)


def test_read_into_fills_the_caller_buffer(two: GuestMemory) -> None:
    two.write(0x200, b"abcdef")
    buf = bytearray(4)
    two.read_into(0x201, buf)
    assert buf == b"bcde"
    mv = memoryview(bytearray(3))
    two.read_into(0x203, mv)
    assert bytes(mv) == b"def"


def test_fill_sets_every_byte_of_the_range_only(two: GuestMemory) -> None:
    two.fill(0x100, 8, 0x5A)
    assert two.read(0xFF, 10) == b"\0" + b"\x5a" * 8 + b"\0"
    two.fill(0x100, 4)
    assert two.read(0x100, 8) == bytes(4) + b"\x5a" * 4


def test_view_is_a_zero_copy_writable_window(two: GuestMemory) -> None:
    v = two.view(HIGH[0] + 8, 4)
    assert len(v) == 4 and not v.readonly
    v[:] = b"WXYZ"
    assert two.read(HIGH[0] + 8, 4) == b"WXYZ"
    two.write(HIGH[0] + 9, b"q")
    assert bytes(v) == b"WqYZ"
    v.release()


# ---------------------------------------------------------------------------------------------- boundaries
def test_last_byte_of_each_region_is_accessible(two: GuestMemory) -> None:
    for gpa, size in (LOW, HIGH):
        two.write_u8(gpa + size - 1, 0x77)
        assert two.read_u8(gpa + size - 1) == 0x77
        assert two.read(gpa, size)[-1] == 0x77  # a whole-region access is fine too


@pytest.mark.parametrize("gpa,size", [LOW, HIGH], ids=["low", "high"])
def test_one_byte_past_a_region_is_invalid(two: GuestMemory, gpa: int, size: int) -> None:
    with pytest.raises(InvalidGuestAddress) as ei:
        two.read_u8(gpa + size)
    assert (ei.value.gpa, ei.value.length) == (gpa + size, 1)
    with pytest.raises(InvalidGuestAddress):
        two.read(gpa + size - 1, 2)  # starts inside, ends one past
    with pytest.raises(InvalidGuestAddress):
        two.write(gpa + size - 4, b"12345")


def test_access_straddling_two_adjacent_regions_is_invalid_even_though_every_byte_is_ram() -> None:
    # Adjacent regions are distinct mappings: an access must lie inside exactly one of them.
    with GuestMemory.create([(0, PAGE_SIZE), (PAGE_SIZE, PAGE_SIZE)]) as m:
        assert m.contains(PAGE_SIZE - 1) and m.contains(PAGE_SIZE)
        with pytest.raises(InvalidGuestAddress):
            m.read(PAGE_SIZE - 2, 4)
        with pytest.raises(InvalidGuestAddress):
            m.write_u32(PAGE_SIZE - 1, 0)
        assert not m.check_range(PAGE_SIZE - 2, 4)


def test_access_straddling_the_gap_between_regions_is_invalid(two: GuestMemory) -> None:
    with pytest.raises(InvalidGuestAddress):
        two.read(LOW[1] - 4, HIGH[0] - LOW[1] + 8)


@pytest.mark.parametrize("gpa", [LOW[1], LOW[1] + 0x1234, HIGH[0] - 1, HIGH[0] + HIGH[1], 1 << 40, U64_END - 1])
def test_addresses_outside_every_region_are_invalid(two: GuestMemory, gpa: int) -> None:
    assert not two.contains(gpa)
    with pytest.raises(InvalidGuestAddress):
        two.read_u8(gpa)
    with pytest.raises(InvalidGuestAddress):
        two.view(gpa, 1)
    with pytest.raises(InvalidGuestAddress):
        two.pack_into(struct.Struct("<B"), gpa, 1)


@pytest.mark.parametrize(
    "gpa,length",
    [(-1, 1), (0, -1), (-PAGE_SIZE, 2 * PAGE_SIZE), (U64_END - 4, 8), (U64_END, 1), (1, U64_END)],
    ids=["negative-gpa", "negative-length", "negative-straddling-zero", "wraps-2**64", "at-2**64",
         "length-2**64"],
)
def test_negative_or_wrapping_ranges_raise_overflow(two: GuestMemory, gpa: int, length: int) -> None:
    with pytest.raises(GuestAddressOverflow) as ei:
        two.read(gpa, length)
    assert (ei.value.gpa, ei.value.length) == (gpa, length)
    assert not two.check_range(gpa, length)


def test_range_ending_exactly_at_2_pow_64_is_not_an_overflow(two: GuestMemory) -> None:
    # [2**64 - 8, 2**64) is representable; it is merely not RAM here.
    with pytest.raises(InvalidGuestAddress):
        two.read(U64_END - 8, 8)


def test_zero_length_access_at_region_end_is_allowed_but_not_in_a_gap(two: GuestMemory) -> None:
    assert two.read(LOW[1], 0) == b""
    assert two.check_range(HIGH[0] + HIGH[1], 0)
    with pytest.raises(InvalidGuestAddress):
        two.read(LOW[1] + PAGE_SIZE, 0)


def test_typed_errors_share_one_base_class() -> None:
    for cls in (InvalidGuestAddress, GuestAddressOverflow, MemoryLayoutError):
        assert issubclass(cls, GuestMemoryError)


# ---------------------------------------------------------------------------------------------- layout validation
@pytest.mark.parametrize(
    "regions",
    [
        [(0x800, PAGE_SIZE)],
        [(0, PAGE_SIZE + 1)],
        [(0, 2 * PAGE_SIZE), (PAGE_SIZE, PAGE_SIZE)],
        [(0, 2 * PAGE_SIZE), (0, PAGE_SIZE)],
        [],
        [(0, 0)],
        [(0, PAGE_SIZE), (2 * PAGE_SIZE, 0)],
        [(-PAGE_SIZE, 2 * PAGE_SIZE)],
        [(U64_END - PAGE_SIZE, 2 * PAGE_SIZE)],
    ],
    ids=["unaligned-gpa", "unaligned-size", "overlapping", "same-base", "empty", "zero-size",
         "second-zero-size", "negative-gpa", "past-2**64"],
)
def test_create_rejects_bad_layouts_and_leaks_no_fd(regions: list[tuple[int, int]]) -> None:
    before = _open_fds()
    with pytest.raises(MemoryLayoutError):
        GuestMemory.create(regions)
    assert _open_fds() == before


def test_from_fds_rejects_an_unaligned_file_offset(two: GuestMemory) -> None:
    s = two.slots()[0]
    with pytest.raises(MemoryLayoutError, match="page aligned"):
        GuestMemory.from_fds([(0, PAGE_SIZE, s.fd, 0x10)])


def test_ram_layout_rejects_sizes_that_are_not_whole_pages() -> None:
    for bad in (0, -PAGE_SIZE, PAGE_SIZE + 1):
        with pytest.raises(ValueError):
            layout.ram_layout(bad)


def test_failed_mapping_reports_the_real_error_and_closes_the_memfd_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Regression: __init__ closed the memfd on a failed mmap and create() closed it again, so the caller saw
    # EBADF instead of the mmap error (and a concurrently opened fd with the same number could be closed).
    real_mmap = mmap.mmap
    calls = []

    def failing_second_mmap(*args: object, **kwargs: object) -> mmap.mmap:
        calls.append(args)
        if len(calls) == 2:
            raise OSError(errno.ENOMEM, "injected mmap failure")
        return real_mmap(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(memory.mmap, "mmap", failing_second_mmap)
    before = _open_fds()
    with pytest.raises(OSError) as ei:
        GuestMemory.create([LOW, HIGH])
    assert ei.value.errno == errno.ENOMEM
    assert _open_fds() == before


# ---------------------------------------------------------------------------------------------- memfd and sharing
def test_memfd_is_sealed_against_shrinking(two: GuestMemory) -> None:
    fd = two.slots()[0].fd
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK
    assert seals & fcntl.F_SEAL_SEAL  # and nobody can lift that later
    with pytest.raises(PermissionError):
        os.ftruncate(fd, PAGE_SIZE)
    assert os.fstat(fd).st_size == LOW[1] + HIGH[1]


def test_from_fds_maps_the_same_pages(two: GuestMemory) -> None:
    regions = [(s.gpa, s.size, s.fd, s.fd_offset) for s in two.slots()]
    with GuestMemory.from_fds(regions) as other:
        assert list(other.regions()) == list(two.regions())
        two.write(HIGH[0] + 0x40, b"from A")
        assert other.read(HIGH[0] + 0x40, 6) == b"from A"
        other.write_u32(0x80, 0xCAFEF00D)
        assert two.read_u32(0x80) == 0xCAFEF00D
    # from_fds does not own the fds: closing it left the creator's memory working.
    two.write_u8(0, 1)
    os.fstat(two.slots()[0].fd)


def test_close_releases_the_memfd_and_later_accesses_fail() -> None:
    m = GuestMemory.create([LOW, HIGH])
    fd = m.slots()[0].fd
    m.close()
    with pytest.raises(OSError) as ei:
        os.fstat(fd)
    assert ei.value.errno == errno.EBADF
    assert m.size == 0 and list(m.regions()) == []
    with pytest.raises(InvalidGuestAddress):
        m.read_u8(0)
    m.close()  # idempotent


def test_close_with_an_outstanding_view_completes_and_keeps_the_view_valid() -> None:
    # Regression: mmap.close() refused (BufferError) while a view() was alive and close() stopped half-way.
    m = GuestMemory.create([LOW])
    v = m.view(0x10, 4)
    m.close()
    assert list(m.regions()) == []
    with pytest.raises(InvalidGuestAddress):
        m.read_u8(0x10)
    v[:] = b"safe"  # the pages stay mapped until the view goes away: no dangling pointer
    assert bytes(v) == b"safe"
    v.release()


# ---------------------------------------------------------------------------------------------- property
_REGIONS = [(0, 4 * PAGE_SIZE), (4 * PAGE_SIZE, PAGE_SIZE), (16 * PAGE_SIZE, 2 * PAGE_SIZE)]


def _inside_one_region(gpa: int, length: int) -> bool:
    return any(g <= gpa and gpa + length <= g + s for g, s in _REGIONS)


_edges = [g + d for g, s in _REGIONS for d in (-1, 0, 1, s - 1, s, s + 1)]
_gpas = st.one_of(st.sampled_from(_edges), st.integers(-2, 20 * PAGE_SIZE),
                  st.integers(U64_END - 3 * PAGE_SIZE, U64_END + 2), st.integers(-(1 << 65), 1 << 65))
_lengths = st.one_of(st.integers(0, 9), st.integers(-2, 6 * PAGE_SIZE), st.sampled_from([U64_END, U64_END - 1]))


@pytest.fixture(scope="module")
def prop_mem() -> Iterator[GuestMemory]:
    m = GuestMemory.create(_REGIONS)
    yield m
    m.close()


@settings(max_examples=600, deadline=None)
@given(gpa=_gpas, length=_lengths, data=st.binary(min_size=0, max_size=8))
def test_random_accesses_succeed_inside_a_region_or_raise_a_guest_memory_error(
    prop_mem: GuestMemory, gpa: int, length: int, data: bytes
) -> None:
    expect_ok = gpa >= 0 and length >= 0 and _inside_one_region(gpa, length)
    if length > 6 * PAGE_SIZE:  # keep the bytes we would allocate small; the check is what matters
        assert prop_mem.check_range(gpa, length) is expect_ok
        return
    try:
        got = prop_mem.read(gpa, length)
    except GuestMemoryError as e:
        assert not expect_ok, f"read({gpa:#x}, {length}) inside RAM raised {e!r}"
        overflow = gpa < 0 or length < 0 or gpa + length > U64_END
        assert isinstance(e, GuestAddressOverflow if overflow else InvalidGuestAddress)
    else:
        assert expect_ok, f"read({gpa:#x}, {length}) outside RAM succeeded"
        assert len(got) == length
    try:
        prop_mem.write(gpa, data)
    except GuestMemoryError:
        assert not (gpa >= 0 and _inside_one_region(gpa, len(data)))
    else:
        assert gpa >= 0 and _inside_one_region(gpa, len(data))
        assert prop_mem.read(gpa, len(data)) == data


# ------------------------------------------------------------------------------------------ backings
def _anon_huge_kib(addr: int) -> int:
    """AnonHugePages (KiB) of the mapping that holds ``addr``, from /proc/self/smaps."""
    inside = False
    for line in open("/proc/self/smaps"):
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            inside = int(m.group(1), 16) <= addr < int(m.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping at 0x{addr:x}")


def test_unshared_memory_is_anonymous_with_host_addresses_congruent_to_the_guest_s_mod_2mib() -> None:
    mem = GuestMemory.create([(0, 8 * MIB), (16 * MIB + 64 * 1024, 4 * MIB)], shared=False)
    try:
        assert not mem.shareable
        for s in mem.slots():
            assert s.fd == -1
            assert (s.host_addr - s.gpa) % (2 * MIB) == 0  # KVM can map 2 MiB guest pages
        mem.write(8 * MIB - 4, b"edge")
        mem.write(16 * MIB + 64 * 1024, b"second")
        assert mem.read(8 * MIB - 4, 4) == b"edge" and mem.read(16 * MIB + 64 * 1024, 6) == b"second"
        with pytest.raises(InvalidGuestAddress):
            mem.read(8 * MIB - 4, 8)  # the alignment pad past the region is not guest memory
        [(gpa0, v0), (gpa1, v1)] = mem.host_views()
        assert (gpa0, len(v0), gpa1, len(v1)) == (0, 8 * MIB, 16 * MIB + 64 * 1024, 4 * MIB)
        assert bytes(v0[8 * MIB - 4 :]) == b"edge"
        v0.release()
        v1.release()
    finally:
        mem.close()


def test_unshared_memory_gets_transparent_huge_pages_where_the_kernel_offers_them() -> None:
    mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    if "[never]" in mode:
        pytest.skip(f"this kernel's THP mode is never ({mode.strip()})")
    mem = GuestMemory.create([(0, 16 * MIB)], shared=False)
    try:
        mem.write(0, b"\x01" * (16 * MIB))  # fault every page in
        [slot] = mem.slots()
        assert _anon_huge_kib(slot.host_addr) >= 2048, "no huge page backs the guest's RAM"
    finally:
        mem.close()


def test_shared_memory_is_a_sealed_memfd_and_says_so() -> None:
    mem = GuestMemory.create([(0, 4 * MIB)])
    try:
        assert mem.shareable
        [slot] = mem.slots()
        seals = fcntl.fcntl(slot.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
    finally:
        mem.close()
