"""QEMU ``pc-testdev`` compatible scratch registers for our test guests' port-I/O and MMIO round trips.

Semantics match QEMU ``hw/misc/pc-testdev.c`` for the two regions implemented:

* ``TestDevIoport`` - the 4-byte data register QEMU places at port 0xe0 (``pc-testdev-ioport``). An access of
  ``len`` bytes at ``addr`` covers byte lanes ``addr & 3`` .. upwards of one 32-bit register: a write replaces
  those lanes, a read returns them shifted down (``test_ioport_write`` / ``test_ioport_read``: mask
  ``(0xffffffff >> (32 - bits)) << start_bit``, truncated to 32 bits, so lanes past byte 3 are dropped on write
  and read as 0). QEMU's ``pc-testdev-ioport-byte`` region at 0xe8 shares the same register and splits every
  access into single bytes, which gives identical results, so the builder may place the same instance at
  0xe8 length 4 too.
* ``TestDevMmio`` - the 64 KiB scratch memory QEMU places at 0xff000000 (``pc-testdev-iomem``): accesses of any
  size read back what was written (``test_iomem_read``/``test_iomem_write`` memcpy ``len`` bytes, little-endian;
  QEMU's memory core splits 8-byte accesses into two 4-byte ones, which is the same bytes).

Not implemented: the flush-page port 0xe4 and the IRQ-line ports 0x2000-0x2017. Nothing here raises or grows:
accesses reaching past the end are clipped (reads of the missing part see zeros) and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from devices.bus import BusDevice

IOPORT_BASE = 0xE0
IOPORT_BYTE_BASE = 0xE8
IOPORT_LEN = 4
IOMEM_BASE = 0xFF00_0000
IOMEM_LEN = 0x1_0000


@dataclass
class TestDevMetrics:
    reads: int = 0
    writes: int = 0
    invalid_access: int = 0


def _lane_mask(offset: int, size: int) -> tuple[int, int]:
    """(mask, start_bit) exactly as test_ioport_read/write compute them, for 1..4-byte accesses."""
    start_bit = (offset & 3) * 8
    mask = ((0xFFFF_FFFF >> (32 - size * 8)) << start_bit) & 0xFFFF_FFFF
    return mask, start_bit


class TestDevIoport(BusDevice):
    __test__ = False  # not a pytest test class despite the name

    def __init__(self) -> None:
        self.data = 0  # QEMU's uint32_t ioport_data
        self.metrics = TestDevMetrics()

    def read(self, offset: int, data: memoryview) -> None:
        size = len(data)
        if not 1 <= size <= 4:
            # Port I/O is at most 4 bytes; QEMU's default valid.max_access_size is 4 as well.
            self.metrics.invalid_access += 1
            return
        self.metrics.reads += 1
        mask, start_bit = _lane_mask(offset, size)
        data[:] = ((self.data & mask) >> start_bit).to_bytes(size, "little")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        size = len(data)
        if not 1 <= size <= 4:
            self.metrics.invalid_access += 1
            return
        self.metrics.writes += 1
        mask, start_bit = _lane_mask(offset, size)
        value = int.from_bytes(data, "little")
        self.data = ((self.data & ~mask) | (value << start_bit)) & 0xFFFF_FFFF


class TestDevMmio(BusDevice):
    __test__ = False

    def __init__(self) -> None:
        self.mem = bytearray(IOMEM_LEN)  # fixed size: never grows
        self.metrics = TestDevMetrics()

    def _span(self, offset: int, size: int) -> int:
        """How many of the ``size`` bytes at ``offset`` lie inside the buffer (0 if none)."""
        if offset < 0 or offset >= IOMEM_LEN:
            return 0
        return min(size, IOMEM_LEN - offset)

    def read(self, offset: int, data: memoryview) -> None:
        n = self._span(offset, len(data))
        if n < len(data):
            self.metrics.invalid_access += 1
            data[:] = bytes(len(data))
        self.metrics.reads += 1
        data[:n] = self.mem[offset : offset + n]

    def write(self, offset: int, data: bytes | memoryview) -> None:
        n = self._span(offset, len(data))
        if n < len(data):
            self.metrics.invalid_access += 1
        self.metrics.writes += 1
        self.mem[offset : offset + n] = bytes(data[:n])
