"""PCI type-0 configuration space: 256 bytes guarded by per-dword writable and write-1-to-clear masks.

Modelled on crosvm ``devices/src/pci/pci_configuration.rs``: every guest write is ANDed with a writable mask, so
read-only fields (IDs, class, header type, capability bodies) cannot change, and BAR sizing falls out of the
mask: a BAR's writable bits are exactly its address bits, so writing all-ones reads back ``~(size - 1)`` plus
the read-only type bits (PCI Local Bus 3.0 §6.2.5.1). Accesses that are not 1, 2 or 4 bytes inside one dword, or
that fall outside 0..255, read as all-ones and write nothing (what a master abort returns, §6.1); they are
counted, never raised.
"""

from __future__ import annotations

import array
import enum
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from devices.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

CONFIG_SPACE_SIZE = 256
NUM_BARS = 6

# Type-0 header offsets (PCI Local Bus 3.0 §6.1, figure 6-1).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
PROG_IF = 0x09
SUBCLASS = 0x0A
CLASS_CODE = 0x0B
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
EXPANSION_ROM = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
FIRST_CAPABILITY = 0x40  # capabilities live after the 64-byte header (§6.7)

# Command register bits (§6.2.2).
CMD_IO_SPACE = 1 << 0
CMD_MEMORY_SPACE = 1 << 1
CMD_BUS_MASTER = 1 << 2
CMD_PARITY_ERROR_RESPONSE = 1 << 6
CMD_SERR = 1 << 8
CMD_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = (
    CMD_IO_SPACE | CMD_MEMORY_SPACE | CMD_BUS_MASTER | CMD_PARITY_ERROR_RESPONSE | CMD_SERR | CMD_INTX_DISABLE
)

# Status register bits (§6.2.3). The error bits are RW1C: software clears them by writing 1.
STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4
STATUS_W1C = (1 << 8) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15)

# BAR low bits (§6.2.5.1).
BAR_IO_SPACE = 0x1
BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCHABLE = 0x8
BAR_MEM_ADDR_MASK = 0xFFFF_FFF0
BAR_IO_ADDR_MASK = 0xFFFF_FFFC

HEADER_TYPE_MULTIFUNCTION = 0x80

_U32 = struct.Struct("<I")


class PciConfigError(Exception):
    """A host-side PCI layout request is invalid (bad BAR size, BAR slot taken, capability space full)."""


class BarType(enum.Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@dataclass(frozen=True)
class BarSpec:
    """One base address register as the device model declares it. A MEM64 BAR also uses slot index + 1."""

    index: int
    size: int
    type: BarType
    prefetchable: bool = False

    @property
    def is_io(self) -> bool:
        return self.type is BarType.IO


@dataclass
class ConfigStats:
    reads: int = 0
    writes: int = 0
    bad_accesses: int = 0  # out of range, odd size, or straddling a dword


def access_ok(offset: int, size: int) -> bool:
    """1, 2 or 4 bytes, inside 0..255, not crossing a dword boundary."""
    return size in (1, 2, 4) and 0 <= offset and offset + size <= CONFIG_SPACE_SIZE and (offset & 3) + size <= 4


class PciConfiguration:
    """Config space registers of one function. Host-side setters raise PciConfigError; guest accesses never raise."""

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        subclass: int,
        prog_if: int = 0,
        revision: int = 0,
        header_type: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        interrupt_pin: int = 0,
    ) -> None:
        # uint32 arrays, never resized: config mechanism #1's C half (kvmcore.fastrun) serves guest accesses from
        # these very buffers (PciRoot.attach_accel), so there is one register file, not a copy to keep in step.
        self._regs = array.array("I", bytes(CONFIG_SPACE_SIZE))
        self._writable = array.array("I", bytes(CONFIG_SPACE_SIZE))
        self._w1c = array.array("I", bytes(CONFIG_SPACE_SIZE))
        self._bars: dict[int, BarSpec] = {}
        self._last_cap: int | None = None
        self._next_cap = FIRST_CAPABILITY
        self._stats = ConfigStats()
        self._c_counts: Callable[[], tuple[int, int]] | None = None
        self._log = RateLimitedLog(log, per_second=5)

        self._set_raw(VENDOR_ID, 2, vendor_id)
        self._set_raw(DEVICE_ID, 2, device_id)
        self._set_raw(REVISION_ID, 1, revision)
        self._set_raw(PROG_IF, 1, prog_if)
        self._set_raw(SUBCLASS, 1, subclass)
        self._set_raw(CLASS_CODE, 1, class_code)
        self._set_raw(HEADER_TYPE, 1, header_type)
        self._set_raw(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._set_raw(SUBSYSTEM_ID, 2, subsystem_id)
        self._set_raw(INTERRUPT_PIN, 1, interrupt_pin)
        self._writable[COMMAND // 4] = COMMAND_WRITABLE
        self._w1c[COMMAND // 4] = STATUS_W1C << 16
        # Cache line size and latency timer are plain read/write scratch registers for firmware (§6.2.4).
        self._writable[CACHE_LINE_SIZE // 4] = 0x0000_FFFF
        # Interrupt line is written by firmware for the OS to read (§6.2.4); pin, min_gnt, max_lat are RO.
        self._writable[INTERRUPT_LINE // 4] = 0x0000_00FF

    # ------------------------------------------------------------------ raw helpers (host side)
    def _set_raw(self, offset: int, size: int, value: int) -> None:
        i, shift = offset // 4, (offset & 3) * 8
        mask = ((1 << (size * 8)) - 1) << shift
        self._regs[i] = (self._regs[i] & ~mask) | ((value << shift) & mask)

    def _get_raw(self, offset: int, size: int) -> int:
        i, shift = offset // 4, (offset & 3) * 8
        return (self._regs[i] >> shift) & ((1 << (size * 8)) - 1)

    def set_writable_bits(self, offset: int, mask: int) -> None:
        """Make the masked bits of the dword at offset guest-writable (for device-specific registers)."""
        self._writable[offset // 4] |= mask & 0xFFFF_FFFF

    def set_host(self, offset: int, size: int, value: int) -> None:
        """Host-side write that ignores the writable masks (e.g. a device updating a capability field)."""
        if not access_ok(offset, size):
            raise PciConfigError(f"bad host config write at 0x{offset:x} size {size}")
        self._set_raw(offset, size, value)

    # ------------------------------------------------------------------ shared with the C path
    def register_file(self) -> tuple[array.array[int], array.array[int], array.array[int]]:
        """(registers, writable masks, W1C masks): 64 dwords each, for a C reader/writer that follows
        :meth:`write`'s rule (PciRoot.attach_accel)."""
        return self._regs, self._writable, self._w1c

    def count_elsewhere(self, counts: Callable[[], tuple[int, int]] | None) -> None:
        """Fold (reads, writes) made by someone else on the register file into ``stats``; None: stop, keeping
        what was counted so far."""
        if self._c_counts is not None:
            r, w = self._c_counts()
            self._stats.reads += r
            self._stats.writes += w
        self._c_counts = counts

    @property
    def stats(self) -> ConfigStats:
        if self._c_counts is None:
            return self._stats
        r, w = self._c_counts()
        st = self._stats
        return ConfigStats(st.reads + r, st.writes + w, st.bad_accesses)

    # ------------------------------------------------------------------ guest side
    def read(self, offset: int, size: int) -> int:
        self._stats.reads += 1
        if not access_ok(offset, size):
            self._stats.bad_accesses += 1
            self._log.debug("pci config: bad read at 0x%x size %d", offset, size)
            return (1 << (8 * size)) - 1 if 0 < size <= 8 else 0xFFFF_FFFF
        return self._get_raw(offset, size)

    def read_into(self, offset: int, data: memoryview) -> None:
        size = len(data)
        if not access_ok(offset, size):
            self._stats.reads += 1
            self._stats.bad_accesses += 1
            data[:] = b"\xff" * size
            return
        data[:] = self.read(offset, size).to_bytes(size, "little")

    def write(self, offset: int, data: bytes | memoryview) -> bool:
        """Apply a guest write through the masks; False (and counted) when the access shape is invalid."""
        self._stats.writes += 1
        size = len(data)
        if not access_ok(offset, size):
            self._stats.bad_accesses += 1
            self._log.debug("pci config: bad write at 0x%x size %d", offset, size)
            return False
        i, shift = offset // 4, (offset & 3) * 8
        lane = ((1 << (size * 8)) - 1) << shift
        value = int.from_bytes(data, "little") << shift
        writable = self._writable[i] & lane
        w1c = self._w1c[i] & lane
        reg = self._regs[i]
        reg = (reg & ~writable) | (value & writable)
        reg &= ~(value & w1c)
        self._regs[i] = reg
        return True

    # ------------------------------------------------------------------ command / status
    @property
    def command(self) -> int:
        return self._get_raw(COMMAND, 2)

    @property
    def status(self) -> int:
        return self._get_raw(STATUS, 2)

    def memory_enabled(self) -> bool:
        return bool(self.command & CMD_MEMORY_SPACE)

    def io_enabled(self) -> bool:
        return bool(self.command & CMD_IO_SPACE)

    def intx_disabled(self) -> bool:
        return bool(self.command & CMD_INTX_DISABLE)

    def set_interrupt_status(self, asserted: bool) -> None:
        """Status bit 3 mirrors the function's INTx state, regardless of the disable bit (§6.2.3)."""
        st = self.status
        self._set_raw(STATUS, 2, (st | STATUS_INTERRUPT) if asserted else (st & ~STATUS_INTERRUPT))

    def set_status_error_bits(self, bits: int) -> None:
        """Device-side setting of RW1C error bits (tests and future error paths)."""
        self._set_raw(STATUS, 2, self.status | (bits & STATUS_W1C))

    @property
    def interrupt_line(self) -> int:
        return self._get_raw(INTERRUPT_LINE, 1)

    @property
    def interrupt_pin(self) -> int:
        return self._get_raw(INTERRUPT_PIN, 1)

    # ------------------------------------------------------------------ BARs
    def add_bar(self, spec: BarSpec) -> None:
        size = spec.size
        if spec.index < 0 or spec.index >= NUM_BARS:
            raise PciConfigError(f"BAR index {spec.index} out of range")
        if spec.type is BarType.MEM64 and spec.index == NUM_BARS - 1:
            raise PciConfigError("a 64-bit BAR cannot start in the last slot")
        slots = [spec.index, spec.index + 1] if spec.type is BarType.MEM64 else [spec.index]
        for s in slots:
            if s in self._bars or any(b.type is BarType.MEM64 and b.index + 1 == s for b in self._bars.values()):
                raise PciConfigError(f"BAR slot {s} already used")
        if size <= 0 or size & (size - 1):
            raise PciConfigError(f"BAR size 0x{size:x} is not a power of two")
        if spec.type is BarType.IO:
            if not 4 <= size <= 256:  # I/O BARs claim at most 256 ports (§6.2.5.1)
                raise PciConfigError(f"I/O BAR size 0x{size:x} must be 4..256")
        elif size < 16:
            raise PciConfigError(f"memory BAR size 0x{size:x} must be at least 16")
        if spec.type is BarType.MEM32 and size > 1 << 31:
            raise PciConfigError(f"32-bit BAR size 0x{size:x} too large")
        if spec.prefetchable and spec.type is BarType.IO:
            raise PciConfigError("I/O BARs cannot be prefetchable")

        off = BAR0 + 4 * spec.index
        if spec.type is BarType.IO:
            self._set_raw(off, 4, BAR_IO_SPACE)
            self._writable[off // 4] = ~(size - 1) & BAR_IO_ADDR_MASK
        else:
            low = (BAR_MEM_TYPE_64 if spec.type is BarType.MEM64 else 0) | (
                BAR_MEM_PREFETCHABLE if spec.prefetchable else 0
            )
            self._set_raw(off, 4, low)
            # The writable bits ARE the address bits: all-ones reads back the size mask (§6.2.5.1).
            self._writable[off // 4] = ~(size - 1) & BAR_MEM_ADDR_MASK
            if spec.type is BarType.MEM64:
                self._set_raw(off + 4, 4, 0)
                self._writable[off // 4 + 1] = (~(size - 1) >> 32) & 0xFFFF_FFFF
        self._bars[spec.index] = spec

    def bars(self) -> list[BarSpec]:
        return [self._bars[i] for i in sorted(self._bars)]

    def bar(self, index: int) -> BarSpec | None:
        return self._bars.get(index)

    def bar_address(self, index: int) -> int:
        spec = self._bars.get(index)
        if spec is None:
            return 0
        off = BAR0 + 4 * index
        low = self._get_raw(off, 4)
        if spec.type is BarType.IO:
            return low & BAR_IO_ADDR_MASK
        addr = low & BAR_MEM_ADDR_MASK
        if spec.type is BarType.MEM64:
            addr |= self._get_raw(off + 4, 4) << 32
        return addr

    def set_bar_address(self, index: int, addr: int) -> None:
        """Host-side BAR programming (firmware-less guests); masked like a guest write so type bits stay."""
        spec = self._bars.get(index)
        if spec is None:
            raise PciConfigError(f"no BAR {index}")
        if addr % spec.size:
            raise PciConfigError(f"BAR {index} address 0x{addr:x} not aligned to its size 0x{spec.size:x}")
        limit = 1 << 64 if spec.type is BarType.MEM64 else 1 << 32
        if addr < 0 or addr + spec.size > limit:
            raise PciConfigError(f"BAR {index} address 0x{addr:x} out of range for {spec.type.value}")
        off = BAR0 + 4 * index
        self.write(off, _U32.pack(addr & 0xFFFF_FFFF))
        if spec.type is BarType.MEM64:
            self.write(off + 4, _U32.pack(addr >> 32))

    @staticmethod
    def bar_dwords(index: int, spec: BarSpec | None) -> range:
        n = 2 if spec is not None and spec.type is BarType.MEM64 else 1
        return range(BAR0 // 4 + index, BAR0 // 4 + index + n)

    # ------------------------------------------------------------------ capabilities
    def add_capability(self, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (body[0] = cap ID; body[1] is overwritten with the next pointer) and return its
        offset. ``writable`` is an optional per-byte guest-writable mask of the same length as body; the ID and
        next-pointer bytes are always read-only (§6.7)."""
        if len(body) < 2:
            raise PciConfigError("a capability needs at least an ID and a next pointer")
        if writable is not None and len(writable) != len(body):
            raise PciConfigError("capability writable mask length differs from its body")
        length = (len(body) + 3) & ~3
        offset = self._next_cap
        if offset + length > CONFIG_SPACE_SIZE:
            raise PciConfigError(f"no room for a {len(body)}-byte capability at 0x{offset:x}")
        for k, b in enumerate(body):
            self._set_raw(offset + k, 1, b)
        self._set_raw(offset + 1, 1, 0)
        if writable is not None:
            for k, m in enumerate(writable):
                if k >= 2 and m:
                    self._writable[(offset + k) // 4] |= m << (((offset + k) & 3) * 8)
        if self._last_cap is None:
            self._set_raw(CAPABILITIES_POINTER, 1, offset)
            self._set_raw(STATUS, 2, self.status | STATUS_CAP_LIST)
        else:
            self._set_raw(self._last_cap + 1, 1, offset)
        self._last_cap = offset
        self._next_cap = offset + length
        return offset
