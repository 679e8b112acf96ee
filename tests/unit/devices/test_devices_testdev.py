"""pc-testdev compatibility (devices/testdev.py): byte lanes of the 0xe0 register, 64 KiB scratch MMIO."""

from __future__ import annotations

import pytest

from devices.bus import mmio_bus, pio_bus
from devices.testdev import (
    IOMEM_BASE,
    IOMEM_LEN,
    IOPORT_BASE,
    IOPORT_BYTE_BASE,
    IOPORT_LEN,
    TestDevIoport,
    TestDevMmio,
)


def rd(dev: TestDevIoport | TestDevMmio, offset: int, size: int) -> int:
    buf = bytearray(size)
    dev.read(offset, memoryview(buf))
    return int.from_bytes(buf, "little")


def wr(dev: TestDevIoport | TestDevMmio, offset: int, size: int, value: int) -> None:
    dev.write(offset, value.to_bytes(size, "little"))


def test_ioport_dword_write_reads_back_per_byte_lane() -> None:
    dev = TestDevIoport()
    wr(dev, 0, 4, 0x11223344)
    assert [rd(dev, i, 1) for i in range(4)] == [0x44, 0x33, 0x22, 0x11]
    assert rd(dev, 0, 2) == 0x3344
    assert rd(dev, 2, 2) == 0x1122
    assert rd(dev, 0, 4) == 0x11223344


def test_ioport_byte_write_replaces_only_its_lane() -> None:
    dev = TestDevIoport()
    wr(dev, 0, 4, 0x11223344)
    wr(dev, 1, 1, 0xAA)
    assert rd(dev, 0, 4) == 0x1122AA44


def test_ioport_word_write_replaces_two_lanes() -> None:
    dev = TestDevIoport()
    wr(dev, 0, 4, 0x11223344)
    wr(dev, 2, 2, 0xBEEF)
    assert rd(dev, 0, 4) == 0xBEEF3344
    wr(dev, 1, 2, 0x0000)
    assert rd(dev, 0, 4) == 0xBE000044


def test_ioport_lanes_past_byte_3_are_dropped_like_qemu() -> None:
    dev = TestDevIoport()
    wr(dev, 1, 4, 0xAABBCCDD)  # only reachable by direct call: the bus keeps accesses inside 4 bytes
    assert dev.data == 0xBBCCDD00
    assert rd(dev, 1, 4) == 0x00BBCCDD


def test_ioport_register_is_shared_between_0xe0_and_0xe8_placements() -> None:
    bus = pio_bus()
    dev = TestDevIoport()
    bus.insert(dev, IOPORT_BASE, IOPORT_LEN)
    bus.insert(dev, IOPORT_BYTE_BASE, IOPORT_LEN)
    bus.write(IOPORT_BASE, (0xCAFEF00D).to_bytes(4, "little"))
    buf = bytearray(2)
    bus.read(IOPORT_BYTE_BASE + 2, memoryview(buf))
    assert int.from_bytes(buf, "little") == 0xCAFE


def test_ioport_rejects_accesses_wider_than_4_bytes() -> None:
    dev = TestDevIoport()
    dev.write(0, bytes(range(8)))
    assert dev.data == 0
    assert dev.metrics.invalid_access == 1


@pytest.mark.parametrize("size", [1, 2, 4, 8])
@pytest.mark.parametrize("offset", [0, 1, 6, 0x1234, IOMEM_LEN - 8])
def test_mmio_access_reads_back_what_was_written(size: int, offset: int) -> None:
    dev = TestDevMmio()
    value = int.from_bytes(bytes(range(0xA1, 0xA1 + size)), "little")
    wr(dev, offset, size, value)
    assert rd(dev, offset, size) == value


def test_mmio_is_little_endian_across_access_sizes() -> None:
    dev = TestDevMmio()
    wr(dev, 0x100, 8, 0x0102030405060708)
    assert rd(dev, 0x100, 1) == 0x08
    assert rd(dev, 0x104, 4) == 0x01020304
    wr(dev, 0x102, 2, 0xFFFF)
    assert rd(dev, 0x100, 8) == 0x01020304FFFF0708


def test_mmio_through_the_bus_at_0xff000000() -> None:
    bus = mmio_bus()
    dev = TestDevMmio()
    bus.insert(dev, IOMEM_BASE, IOMEM_LEN)
    assert bus.write(IOMEM_BASE + IOMEM_LEN - 4, b"\x01\x02\x03\x04")
    buf = bytearray(4)
    assert bus.read(IOMEM_BASE + IOMEM_LEN - 4, memoryview(buf))
    assert buf == b"\x01\x02\x03\x04"
    assert not bus.write(IOMEM_BASE + IOMEM_LEN - 2, b"\x00" * 4)  # straddles the end: unclaimed


def test_mmio_access_past_the_end_is_clipped_and_counted() -> None:
    dev = TestDevMmio()
    dev.write(IOMEM_LEN - 1, b"\x11\x22\x33")
    buf = bytearray(b"\xff" * 3)
    dev.read(IOMEM_LEN - 1, memoryview(buf))
    assert buf == b"\x11\x00\x00"
    dev.write(IOMEM_LEN + 10, b"\x11")
    assert len(dev.mem) == IOMEM_LEN
    assert dev.metrics.invalid_access == 3
