"""MSI-X (PCI Local Bus 3.0 §6.8.2): the capability's message control, the vector table and the PBA.

Interrupt sources are eventfds. A source is *attached* to a vector; while that vector is deliverable (MSI-X
enabled, function not masked, entry not masked) the eventfd is registered as a KVM irqfd on the vector's GSI, so
the backend's write reaches the guest without this process. While the vector is masked the irqfd is detached:
the eventfd's counter keeps the event, which is exactly the vector's Pending bit (§6.8.2.10), and on unmask the
counter is drained and re-signalled after re-attaching, so the pending message is delivered once (§6.8.2.9).
Each vector gets a GSI from the platform the first time a source is attached; its route is reprogrammed whenever
the entry's address/data change or its mask state changes.
"""

from __future__ import annotations

import logging
import os
import select
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from devices.ratelimit import RateLimitedLog

if TYPE_CHECKING:
    from devices.pci.device import PciPlatform

log = logging.getLogger(__name__)

PCI_CAP_ID_MSIX = 0x11
MSIX_TABLE_ENTRY_SIZE = 16
MSIX_CAP_LEN = 12
# Message control (§6.8.2.3): table size N-1 in bits 10:0, function mask bit 14, enable bit 15.
MSG_CTL_TABLE_SIZE_MASK = 0x07FF
MSG_CTL_FUNCTION_MASK = 1 << 14
MSG_CTL_ENABLE = 1 << 15
MAX_VECTORS = 2048
# Vector control (§6.8.2.8): bit 0 masks the vector; every entry is masked after reset.
VECTOR_CTL_MASKED = 1

_ENTRY = struct.Struct("<IIII")  # addr lo, addr hi, data, vector control


@dataclass
class MsixStats:
    bad_accesses: int = 0  # table/PBA access not 4 or 8 bytes aligned to its size, or out of range
    pba_writes: int = 0  # the PBA is read-only (§6.8.2.10)
    route_updates: int = 0
    platform_errors: int = 0


def msix_capability(num_vectors: int, table_bar: int, table_offset: int, pba_bar: int, pba_offset: int
                    ) -> tuple[bytes, bytes]:
    """(body, writable mask) for PciConfiguration.add_capability (§6.8.2.1..6.8.2.5)."""
    if not 1 <= num_vectors <= MAX_VECTORS:
        raise ValueError(f"MSI-X supports 1..{MAX_VECTORS} vectors, not {num_vectors}")
    if table_offset % 8 or pba_offset % 8:
        raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
    body = struct.pack(
        "<BBHII", PCI_CAP_ID_MSIX, 0, num_vectors - 1, table_offset | table_bar, pba_offset | pba_bar
    )
    # Only enable and function-mask (the top two bits of message control) are writable.
    writable = bytes([0, 0, 0, 0xC0]) + bytes(8)
    return body, writable


class MsixConfig:
    """Table + PBA + message-control state of one function, and the irqfd/route bookkeeping behind it."""

    def __init__(self, num_vectors: int, platform: PciPlatform | None) -> None:
        if not 1 <= num_vectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X supports 1..{MAX_VECTORS} vectors, not {num_vectors}")
        self.num_vectors = num_vectors
        self.platform = platform
        self.table = bytearray(num_vectors * MSIX_TABLE_ENTRY_SIZE)
        for v in range(num_vectors):
            self.table[v * 16 + 12] = VECTOR_CTL_MASKED
        self.enabled = False
        self.function_masked = False
        self.gsis: dict[int, int] = {}
        self._attached: dict[int, int] = {}  # eventfd -> vector
        self._registered: set[tuple[int, int]] = set()  # (gsi, eventfd) irqfds currently in KVM
        self.stats = MsixStats()
        self._log = RateLimitedLog(log, per_second=5)
        self.on_mode_change: Callable[[], None] | None = None  # enable flips (INTx <-> MSI-X)

    # ------------------------------------------------------------------ sizes
    @property
    def table_size(self) -> int:
        return self.num_vectors * MSIX_TABLE_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return ((self.num_vectors + 63) // 64) * 8

    # ------------------------------------------------------------------ vector state
    def entry(self, vector: int) -> tuple[int, int, bool]:
        """(address, data, masked-bit) of one table entry."""
        lo, hi, data, ctl = _ENTRY.unpack_from(self.table, vector * 16)
        return (hi << 32) | lo, data, bool(ctl & VECTOR_CTL_MASKED)

    def masked(self, vector: int) -> bool:
        """Whether messages for vector are held back (function mask, entry mask, or MSI-X off)."""
        return not self.enabled or self.function_masked or self.entry(vector)[2]

    def pending(self, vector: int) -> bool:
        """The PBA bit: a source of this masked vector signalled and has not been delivered."""
        if not self.enabled or not self.masked(vector):
            return False
        fds = [fd for fd, v in self._attached.items() if v == vector]
        if not fds:
            return False
        p = select.poll()
        for fd in fds:
            p.register(fd, select.POLLIN)
        return bool(p.poll(0))

    # ------------------------------------------------------------------ message control
    def message_control(self) -> int:
        return (
            (self.num_vectors - 1)
            | (MSG_CTL_FUNCTION_MASK if self.function_masked else 0)
            | (MSG_CTL_ENABLE if self.enabled else 0)
        )

    def write_message_control(self, value: int) -> None:
        was_enabled, was_masked = self.enabled, self.function_masked
        self.enabled = bool(value & MSG_CTL_ENABLE)
        self.function_masked = bool(value & MSG_CTL_FUNCTION_MASK)
        if (was_enabled, was_masked) != (self.enabled, self.function_masked):
            for v in self.gsis:
                self._program_route(v)
            self.sync()
            if was_enabled != self.enabled and self.on_mode_change is not None:
                self.on_mode_change()

    # ------------------------------------------------------------------ table and PBA access (BAR region)
    def _shape_ok(self, offset: int, size: int, region: int) -> bool:
        # Software accesses the table and PBA with aligned dwords or qwords only (§6.8.2, "MSI-X Table").
        if size not in (4, 8) or offset % size or offset < 0 or offset + size > region:
            self.stats.bad_accesses += 1
            self._log.debug("msix: bad access at 0x%x size %d", offset, size)
            return False
        return True

    def read_table(self, offset: int, data: memoryview) -> None:
        if not self._shape_ok(offset, len(data), self.table_size):
            data[:] = b"\xff" * len(data)
            return
        data[:] = self.table[offset : offset + len(data)]

    def write_table(self, offset: int, data: bytes | memoryview) -> None:
        if not self._shape_ok(offset, len(data), self.table_size):
            return
        first, last = offset // 16, (offset + len(data) - 1) // 16
        before = [self.entry(v) for v in range(first, last + 1)]
        self.table[offset : offset + len(data)] = bytes(data)
        for v, old in zip(range(first, last + 1), before, strict=True):
            new = self.entry(v)
            if new != old:
                self._program_route(v)
        self.sync()

    def read_pba(self, offset: int, data: memoryview) -> None:
        if not self._shape_ok(offset, len(data), self.pba_size):
            data[:] = b"\xff" * len(data)
            return
        bits = 0
        for k in range(len(data) * 8):
            v = offset * 8 + k
            if v < self.num_vectors and self.pending(v):
                bits |= 1 << k
        data[:] = bits.to_bytes(len(data), "little")

    def write_pba(self, offset: int, data: bytes | memoryview) -> None:
        self.stats.pba_writes += 1

    # ------------------------------------------------------------------ sources
    def set_sources(self, sources: dict[int, int]) -> None:
        """Replace the eventfd -> vector attachments (vectors out of range are dropped) and resync irqfds."""
        self._attached = {fd: v for fd, v in sources.items() if 0 <= v < self.num_vectors}
        for v in set(self._attached.values()):
            if v not in self.gsis and self.platform is not None:
                self.gsis[v] = self.platform.allocate_gsi()
                self._program_route(v)
        self.sync()

    def detach_all(self) -> None:
        self.set_sources({})

    def registered_irqfds(self) -> set[tuple[int, int]]:
        return set(self._registered)

    def _program_route(self, vector: int) -> None:
        gsi = self.gsis.get(vector)
        if gsi is None or self.platform is None:
            return
        addr, data, _ = self.entry(vector)
        self.stats.route_updates += 1
        try:
            self.platform.set_msi_route(gsi, addr, data, self.masked(vector))
        except OSError as e:
            self.stats.platform_errors += 1
            self._log.warning("msix: programming GSI %d failed: %s", gsi, e)

    def sync(self) -> None:
        """Make the registered irqfds match: every source of a deliverable vector, nothing else."""
        if self.platform is None:
            return
        want = {
            (self.gsis[v], fd) for fd, v in self._attached.items() if v in self.gsis and not self.masked(v)
        }
        for gsi, fd in sorted(self._registered - want):
            try:
                self.platform.irqfd(gsi, fd, False)
            except OSError as e:
                self.stats.platform_errors += 1
                self._log.warning("msix: detaching irqfd %d from GSI %d failed: %s", fd, gsi, e)
            self._registered.discard((gsi, fd))
        for gsi, fd in sorted(want - self._registered):
            # Drain first and re-signal after: a message that arrived while masked is delivered exactly once
            # (§6.8.2.9 "pending message ... sent when unmasked"), and the counter no longer reads as pending.
            fired = _drain(fd)
            try:
                self.platform.irqfd(gsi, fd, True)
            except OSError as e:
                self.stats.platform_errors += 1
                self._log.warning("msix: attaching irqfd %d to GSI %d failed: %s", fd, gsi, e)
                continue
            self._registered.add((gsi, fd))
            if fired:
                os.eventfd_write(fd, 1)


def _drain(fd: int) -> int:
    """Read an O_NONBLOCK eventfd's counter (0 when empty)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
