"""Address-range buses for port I/O and MMIO.

A bus is a sorted list of non-overlapping [base, base+length) ranges, each owned by one device. Devices see
(offset, data) and never learn where they were placed. An access must lie wholly inside one range; anything
else is "unclaimed": reads see all-ones (what an empty ISA/PCI bus returns), writes vanish, both are counted
and logged at a bounded rate. Nothing a guest does here raises.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass

from devices.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)


class BusError(Exception):
    """Base of host-side bus configuration errors (never raised for guest accesses)."""


class BusOverlap(BusError):
    """A device range overlaps one already on the bus."""


class BusRangeInvalid(BusError):
    """A device range is empty or outside the bus's address space."""


class BusDevice:
    """What every device behind a bus implements. Defaults are no-ops so a device implements what it needs.

    read: fill ``data`` (a writable memoryview of 1..8 bytes, pre-filled with zeros) with the register value.
    write: consume ``data`` (1..8 bytes).
    Neither may raise on guest input.
    """

    def read(self, offset: int, data: memoryview) -> None:  # pragma: no cover - default
        return None

    def write(self, offset: int, data: bytes | memoryview) -> None:  # pragma: no cover - default
        return None


@dataclass
class BusStats:
    reads: int = 0
    writes: int = 0
    unclaimed_reads: int = 0
    unclaimed_writes: int = 0


class Bus:
    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit  # one past the highest valid address (0x10000 for port I/O, 2**64 for MMIO)
        self._bases: list[int] = []
        self._entries: list[tuple[int, int, BusDevice]] = []  # (base, end, device), sorted by base
        self._stats = BusStats()
        # Counters kept elsewhere (a vCPU's C fast path, kvmcore.fastrun, answers unclaimed accesses and some
        # accesses to accelerated devices itself): callables returning (device reads, device writes, unclaimed
        # reads, unclaimed writes) so far, folded into ``stats`` when it is read.
        self._sources: list[Callable[[], tuple[int, int, int, int]]] = []
        self._log = RateLimitedLog(log, per_second=5)
        # Bumped on every insert/remove, so a vCPU's C fast path (kvmcore.fastrun) knows to refresh its table.
        self.generation = 0

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        if length <= 0 or base < 0 or base + length > self.limit:
            raise BusRangeInvalid(f"{self.name}: range 0x{base:x}+0x{length:x} is invalid")
        end = base + length
        i = bisect.bisect_left(self._bases, base)
        if i > 0 and self._entries[i - 1][1] > base:
            raise BusOverlap(f"{self.name}: 0x{base:x}+0x{length:x} overlaps 0x{self._entries[i - 1][0]:x}")
        if i < len(self._entries) and self._entries[i][0] < end:
            raise BusOverlap(f"{self.name}: 0x{base:x}+0x{length:x} overlaps 0x{self._entries[i][0]:x}")
        self._bases.insert(i, base)
        self._entries.insert(i, (base, end, device))
        self.generation += 1

    def remove(self, base: int) -> BusDevice:
        i = bisect.bisect_left(self._bases, base)
        if i == len(self._bases) or self._bases[i] != base:
            raise BusRangeInvalid(f"{self.name}: nothing is placed at 0x{base:x}")
        del self._bases[i]
        self.generation += 1
        return self._entries.pop(i)[2]

    def get(self, addr: int, length: int = 1) -> tuple[BusDevice, int] | None:
        """(device, offset) when [addr, addr+length) lies inside one device's range."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        base, end, dev = self._entries[i]
        if addr + length > end:
            return None
        return dev, addr - base

    def ranges(self) -> list[tuple[int, int]]:
        """Claimed [base, end) ranges in address order."""
        return [(b, e) for b, e, _d in self._entries]

    def add_counter_source(self, source: Callable[[], tuple[int, int, int, int]]) -> None:
        """Count accesses answered elsewhere: (reads and writes a device's C half answered, unclaimed reads and
        writes answered with all-ones / dropped)."""
        self._sources.append(source)

    def accelerated(self) -> list[tuple[int, int, object]]:
        """(base, end, accel) of the devices with a C half (a non-None ``fast_accel``: kvmcore.fastrun's
        UartAccel, PciConfigAccel) that a vCPU's C loop may let answer accesses inside their range."""
        out = []
        for base, end, dev in self._entries:
            acc = getattr(dev, "fast_accel", None)
            if acc is not None:
                out.append((base, end, acc))
        return out

    @property
    def stats(self) -> BusStats:
        st = self._stats
        if not self._sources:
            return st
        dr = dw = ur = uw = 0
        for source in self._sources:
            a, b, c, d = source()
            dr += a
            dw += b
            ur += c
            uw += d
        return BusStats(st.reads + dr + ur, st.writes + dw + uw, st.unclaimed_reads + ur, st.unclaimed_writes + uw)

    def devices(self) -> list[tuple[int, int, BusDevice]]:
        return [(b, e - b, d) for b, e, d in self._entries]

    def read(self, addr: int, data: memoryview) -> bool:
        """Fill data from the device at addr; all-ones if nobody claims the whole access."""
        self._stats.reads += 1
        hit = self.get(addr, len(data))
        if hit is None:
            self._stats.unclaimed_reads += 1
            data[:] = b"\xff" * len(data)
            self._log.debug("%s: unclaimed read 0x%x len %d", self.name, addr, len(data))
            return False
        dev, off = hit
        data[:] = bytes(len(data))
        dev.read(off, data)
        return True

    def write(self, addr: int, data: bytes | memoryview) -> bool:
        self._stats.writes += 1
        hit = self.get(addr, len(data))
        if hit is None:
            self._stats.unclaimed_writes += 1
            self._log.debug("%s: unclaimed write 0x%x len %d", self.name, addr, len(data))
            return False
        dev, off = hit
        dev.write(off, data)
        return True


def pio_bus() -> Bus:
    return Bus("pio", 0x1_0000)


def mmio_bus() -> Bus:
    return Bus("mmio", 1 << 64)
