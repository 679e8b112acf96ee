"""MSI-X table, PBA, message control, and the irqfd/route bookkeeping (PCI LB 3.0 §6.8.2)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from devices.pci.msix import (
    MSG_CTL_ENABLE,
    MSG_CTL_FUNCTION_MASK,
    PCI_CAP_ID_MSIX,
    MsixConfig,
    msix_capability,
)
from devices.pci.testing import FakePlatform


@pytest.fixture
def efd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def program(m: MsixConfig, vector: int, addr: int, data: int, masked: bool) -> None:
    m.write_table(vector * 16, struct.pack("<Q", addr))
    m.write_table(vector * 16 + 8, struct.pack("<II", data, 1 if masked else 0))


def read_table(m: MsixConfig, offset: int, size: int) -> bytes:
    buf = bytearray(size)
    m.read_table(offset, memoryview(buf))
    return bytes(buf)


def pba(m: MsixConfig) -> int:
    buf = bytearray(8)
    m.read_pba(0, memoryview(buf))
    return int.from_bytes(buf, "little")


def test_capability_encodes_table_size_minus_one_and_bir_offsets() -> None:
    body, writable = msix_capability(5, 0, 0x4000, 2, 0x5000)
    cap_id, _next, ctl, table, pba_ = struct.unpack("<BBHII", body)
    assert cap_id == PCI_CAP_ID_MSIX
    assert ctl == 4
    assert table == 0x4000 and pba_ == 0x5002
    assert writable == bytes([0, 0, 0, 0xC0]) + bytes(8)


@pytest.mark.parametrize("n,off", [(0, 0), (2049, 0), (4, 0x4004)])
def test_capability_rejects_invalid_host_layouts(n: int, off: int) -> None:
    with pytest.raises(ValueError):
        msix_capability(n, 0, off, 0, 0x8000)


def test_every_vector_starts_masked_and_msix_disabled() -> None:
    m = MsixConfig(3, FakePlatform())
    assert all(m.entry(v)[2] for v in range(3))
    assert not m.enabled
    assert m.message_control() == 2


@pytest.mark.parametrize("offset,size", [(0, 1), (0, 2), (2, 4), (4, 8), (12, 2), (48, 4), (44, 8)])
def test_table_accesses_other_than_aligned_dword_or_qword_are_ignored_and_counted(offset: int, size: int) -> None:
    m = MsixConfig(3, FakePlatform())
    before = bytes(m.table)
    m.write_table(offset, b"\xab" * size)
    assert bytes(m.table) == before
    assert read_table(m, offset, size) == b"\xff" * size
    assert m.stats.bad_accesses == 2


def test_table_qword_and_dword_accesses_round_trip() -> None:
    m = MsixConfig(2, FakePlatform())
    m.write_table(16, struct.pack("<Q", 0xFEE0_1000))
    m.write_table(24, struct.pack("<I", 0x4041))
    assert read_table(m, 16, 8) == struct.pack("<Q", 0xFEE0_1000)
    assert read_table(m, 24, 4) == struct.pack("<I", 0x4041)
    assert m.entry(1) == (0xFEE0_1000, 0x4041, True)


def test_pba_is_read_only_and_bad_sizes_read_all_ones() -> None:
    m = MsixConfig(2, FakePlatform())
    m.write_pba(0, b"\xff" * 8)
    assert m.stats.pba_writes == 1
    assert pba(m) == 0
    buf = bytearray(2)
    m.read_pba(0, memoryview(buf))
    assert buf == b"\xff\xff"


def test_attaching_a_source_allocates_a_gsi_and_programs_its_route(efd: int) -> None:
    plat = FakePlatform()
    m = MsixConfig(2, plat)
    program(m, 1, 0xFEE0_0000, 0x31, masked=False)
    m.set_sources({efd: 1})
    gsi = m.gsis[1]
    assert plat.routes[gsi] == (0xFEE0_0000, 0x31, True)  # MSI-X still disabled: masked
    assert plat.irqfds == set()  # nothing is delivered while MSI-X is off
    m.write_message_control(MSG_CTL_ENABLE)
    assert plat.routes[gsi] == (0xFEE0_0000, 0x31, False)
    assert plat.irqfds == {(gsi, efd)}
    program(m, 1, 0xFEE0_2000, 0x42, masked=False)  # the guest retargets the vector
    assert plat.routes[gsi] == (0xFEE0_2000, 0x42, False)


def test_out_of_range_vectors_are_not_attached(efd: int) -> None:
    plat = FakePlatform()
    m = MsixConfig(2, plat)
    m.set_sources({efd: 5})
    assert m.gsis == {} and plat.calls_named("allocate_gsi") == []


@pytest.mark.parametrize("how", ["entry", "function"])
def test_masked_vector_keeps_its_message_pending_and_delivers_it_once_on_unmask(efd: int, how: str) -> None:
    plat = FakePlatform()
    m = MsixConfig(1, plat)
    m.set_sources({efd: 0})
    gsi = m.gsis[0]
    if how == "entry":
        m.write_message_control(MSG_CTL_ENABLE)
    else:
        program(m, 0, 0xFEE0_0000, 0x30, masked=False)
        m.write_message_control(MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK)
    assert plat.irqfds == set()
    assert pba(m) == 0
    os.eventfd_write(efd, 1)  # the backend fires while masked
    assert pba(m) == 1
    if how == "entry":
        program(m, 0, 0xFEE0_0000, 0x30, masked=False)
    else:
        m.write_message_control(MSG_CTL_ENABLE)
    assert plat.irqfds == {(gsi, efd)}
    # The counter was drained before attaching and signalled once after: KVM sees exactly one edge.
    assert os.eventfd_read(efd) == 1
    assert pba(m) == 0


def test_masking_again_detaches_the_irqfd(efd: int) -> None:
    plat = FakePlatform()
    m = MsixConfig(1, plat)
    m.set_sources({efd: 0})
    m.write_message_control(MSG_CTL_ENABLE)
    program(m, 0, 0xFEE0_0000, 0x30, masked=False)
    assert len(plat.irqfds) == 1
    m.write_table(12, struct.pack("<I", 1))
    assert plat.irqfds == set()
    m.detach_all()
    m.write_table(12, struct.pack("<I", 0))
    assert plat.irqfds == set()


def test_enable_flip_reports_a_mode_change() -> None:
    m = MsixConfig(1, FakePlatform())
    seen: list[bool] = []
    m.on_mode_change = lambda: seen.append(m.enabled)
    m.write_message_control(MSG_CTL_FUNCTION_MASK)
    m.write_message_control(MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK)
    m.write_message_control(MSG_CTL_ENABLE)
    m.write_message_control(0)
    assert seen == [True, False]


def test_platform_errors_are_counted_not_raised(efd: int) -> None:
    plat = FakePlatform()
    m = MsixConfig(1, plat)
    plat.irqfds.add((24, efd))  # make KVM answer EBUSY
    m.set_sources({efd: 0})
    program(m, 0, 0xFEE0_0000, 0x30, masked=False)
    m.write_message_control(MSG_CTL_ENABLE)
    assert m.stats.platform_errors == 1
    assert m.registered_irqfds() == set()
