"""Test helpers shipped with pv (rust-vmm virtio-queue's ``mock.rs``, Firecracker's ``test_utils.rs``).

:class:`MockSplitQueue` plays the driver: it lays the descriptor table, available ring and used ring out in a real
:class:`~kvmcore.memory.GuestMemory` (a memfd; no /dev/kvm needed), puts random gaps between rings and buffers and
hands out descriptor indices in random order, so device code cannot get away with assuming a tidy layout. It also
offers raw writers for every ring field so tests can build exactly the malformed ring they need.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from kvmcore.memory import GuestMemory
from pv.device import QueueConfig
from pv.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")

POISON = 0xEE  # writable buffers start out filled with this, so tests can see what the device wrote


def make_guest_memory(main: int = 1 << 20, *, guard_region: bool = True) -> GuestMemory:
    """RAM at [0, main) and, if ``guard_region``, a small second region after a 1 MiB hole (unbacked gpa)."""
    layout = [(0, main)]
    if guard_region:
        layout.append((main + (1 << 20), 1 << 16))
    return GuestMemory.create(layout, name="pv-test-ram")


@dataclass(frozen=True)
class Buf:
    """One buffer of a chain as the mock laid it out."""

    addr: int
    len: int
    writable: bool


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


class MockSplitQueue:
    """A driver-side split virtqueue in guest memory; builds chains and reads the used ring back."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int = 256,
        *,
        base: int = 0x1000,
        limit: int | None = None,
        event_idx: bool = False,
        seed: int = 0,
        max_gap: int = 256,
        index: int = 0,
        kick_fd: int = -1,
        call_fd: int = -1,
    ) -> None:
        self.mem = mem
        self.size = size
        self.rng = random.Random(seed)
        self.max_gap = max_gap
        self.index = index
        self.event_idx = event_idx
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        if limit is None:
            limit = next(gpa + sz for gpa, sz in mem.regions() if gpa <= base < gpa + sz)
        self.limit = limit
        self._next = base
        self.desc_table = self.alloc(desc_table_size(size), 16)
        self.avail_ring = self.alloc(avail_ring_size(size), 2)
        self.used_ring = self.alloc(used_ring_size(size), 4)
        for gpa, n in (
            (self.desc_table, desc_table_size(size)),
            (self.avail_ring, avail_ring_size(size)),
            (self.used_ring, used_ring_size(size)),
        ):
            mem.fill(gpa, n, 0)
        self._data_start = self._next
        self.avail_idx = 0  # driver's shadow of avail->idx
        self.last_used = 0  # driver's position in the used ring
        self._free = list(range(size))
        self.rng.shuffle(self._free)
        self._chains: dict[int, list[int]] = {}  # in flight: head -> descriptor indices
        self._bufs: dict[int, list[Buf]] = {}  # head -> buffers of the latest chain built at that head

    # ----------------------------------------------------------------- layout
    def alloc(self, length: int, align: int = 1) -> int:
        """Bump-allocate ``length`` bytes after a random gap (0..max_gap)."""
        gpa = _align(self._next + self.rng.randint(0, self.max_gap), align)
        if gpa + length > self.limit:
            raise MemoryError(f"mock queue out of guest memory ({length} bytes)")
        self._next = gpa + length
        return gpa

    def reset_data(self) -> None:
        """Reuse the data area (all previously built buffers become garbage)."""
        self._next = self._data_start

    def config(self) -> QueueConfig:
        return QueueConfig(
            index=self.index,
            size=self.size,
            desc_table=self.desc_table,
            avail_ring=self.avail_ring,
            used_ring=self.used_ring,
            kick_fd=self.kick_fd,
            call_fd=self.call_fd,
            event_idx=self.event_idx,
        )

    # ----------------------------------------------------------------- raw ring access
    def write_desc(
        self, i: int, addr: int, length: int, flags: int, next_: int = 0, table: int | None = None
    ) -> None:
        base = self.desc_table if table is None else table
        self.mem.pack_into(_DESC, base + 16 * i, addr, length, flags, next_)

    def read_desc(self, i: int, table: int | None = None) -> tuple[int, int, int, int]:
        base = self.desc_table if table is None else table
        return self.mem.unpack_from(_DESC, base + 16 * i)  # type: ignore[return-value]

    def set_avail_entry(self, slot: int, head: int) -> None:
        self.mem.pack_into(_U16, self.avail_ring + 4 + 2 * (slot % self.size), head)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.mem.pack_into(_U16, self.avail_ring + 2, self.avail_idx)

    def set_avail_flags(self, value: int) -> None:
        self.mem.pack_into(_U16, self.avail_ring, value)

    def set_used_event(self, value: int) -> None:
        self.mem.pack_into(_U16, self.avail_ring + 4 + 2 * self.size, value & 0xFFFF)

    def set_used_idx(self, value: int) -> None:
        """Only for setting up a test (the device owns the used ring)."""
        self.mem.pack_into(_U16, self.used_ring + 2, value & 0xFFFF)
        self.last_used = value & 0xFFFF

    def used_idx(self) -> int:
        return self.mem.unpack_from(_U16, self.used_ring + 2)[0]  # type: ignore[no-any-return]

    def used_flags(self) -> int:
        return self.mem.unpack_from(_U16, self.used_ring)[0]  # type: ignore[no-any-return]

    def avail_event(self) -> int:
        return self.mem.unpack_from(_U16, self.used_ring + 4 + 8 * self.size)[0]  # type: ignore[no-any-return]

    def used_elem(self, slot: int) -> tuple[int, int]:
        return self.mem.unpack_from(_USED_ELEM, self.used_ring + 4 + 8 * (slot % self.size))  # type: ignore[return-value]

    # ----------------------------------------------------------------- chains
    def _buffers(self, segments: Sequence[bytes | int]) -> list[Buf]:
        """bytes -> a readable buffer holding them; int n -> a writable buffer of n bytes filled with POISON."""
        bufs = []
        for seg in segments:
            if isinstance(seg, int):
                addr = self.alloc(seg)
                self.mem.fill(addr, seg, POISON)
                bufs.append(Buf(addr, seg, True))
            else:
                addr = self.alloc(len(seg))
                self.mem.write(addr, seg)
                bufs.append(Buf(addr, len(seg), False))
        return bufs

    def add_chain(
        self, segments: Sequence[bytes | int], *, indirect: bool = False, publish: bool = True
    ) -> int:
        """Build a chain (readable ``bytes`` first, then writable lengths) and, by default, make it available."""
        bufs = self._buffers(segments)
        if indirect:
            table = self.alloc(16 * len(bufs), 16)
            for i, b in enumerate(bufs):
                last = i == len(bufs) - 1
                flags = (VIRTQ_DESC_F_WRITE if b.writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
                self.write_desc(i, b.addr, b.len, flags, 0 if last else i + 1, table=table)
            idxs = [self._free.pop()]
            self.write_desc(idxs[0], table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
        else:
            if len(bufs) > len(self._free):
                raise MemoryError("mock queue out of descriptors")
            idxs = [self._free.pop() for _ in bufs]
            for j, (i, b) in enumerate(zip(idxs, bufs, strict=True)):
                last = j == len(bufs) - 1
                flags = (VIRTQ_DESC_F_WRITE if b.writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
                self.write_desc(i, b.addr, b.len, flags, 0 if last else idxs[j + 1])
        head = idxs[0]
        self._chains[head] = idxs
        self._bufs[head] = bufs
        if publish:
            self.publish(head)
        return head

    def publish(self, *heads: int) -> None:
        """Put heads in the available ring and then bump avail->idx (§2.7.13 order)."""
        idx = self.avail_idx
        for h in heads:
            self.set_avail_entry(idx, h)
            idx = (idx + 1) & 0xFFFF
        self.set_avail_idx(idx)

    def kick(self) -> None:
        if self.kick_fd >= 0:
            os.eventfd_write(self.kick_fd, 1)

    def buffers(self, head: int) -> list[Buf]:
        return self._bufs[head]

    def read_buffer(self, buf: Buf) -> bytes:
        return self.mem.read(buf.addr, buf.len)

    def read_used(self) -> list[tuple[int, int]]:
        """Used elements since the last call, as (id, len); their descriptors return to the free list."""
        out = []
        end = self.used_idx()
        while self.last_used != end:
            head, length = self.used_elem(self.last_used)
            out.append((head, length))
            if head in self._chains:
                self._free.extend(self._chains.pop(head))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


class FakeHealth:
    """A DeviceHealth that records what the device reported (tests)."""

    def __init__(self) -> None:
        self.resets: list[str] = []
        self.config_changes = 0

    def needs_reset(self, reason: str) -> None:
        self.resets.append(reason)

    def config_changed(self) -> None:
        self.config_changes += 1
