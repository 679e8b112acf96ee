"""Device side of a split virtqueue (virtio 1.2 §2.7), written for a hostile driver.

Everything the guest can write (ring indices, descriptor fields, indirect tables) is validated here exactly once;
what :meth:`SplitQueue.pop` returns is a fully checked :class:`DescriptorChain` whose buffers all lie inside guest
RAM, so backends may trust its types and ranges (CONVENTIONS §6). Violations raise one of :mod:`pv.errors`, never
anything else. Modelled on rust-vmm virtio-queue (``queue.rs``, ``chain.rs``, ``descriptor_utils.rs``) and
Firecracker ``devices/virtio/queue.rs``.

Memory ordering (why this is correct enough without fences, and where the real ones are)
----------------------------------------------------------------------------------------
The driver publishes a buffer by writing descriptors and the avail ring entry, then (after a write barrier)
``avail->idx`` (§2.7.13). We read ``idx`` first and only then the ring entry and descriptors. On x86 (TSO) loads
are not reordered with older loads, and every guest-memory access here is an opaque C call (``struct`` on a
``memoryview`` of the mmap), so neither the CPU nor CPython can hoist the entry read above the ``idx`` read: no
acquire fence is needed. Symmetrically, ``add_used`` stores the used element before the used ``idx``, and x86 does
not reorder stores with older stores: no release fence is needed. A port to a weakly ordered CPU would need an
acquire fence after reading ``idx`` (in :meth:`SplitQueue._read_avail_idx`) and a release fence before storing the
used ``idx`` (in :meth:`SplitQueue.add_used`).

The one reordering x86 *does* allow is a later load passing an earlier store. Two places store then load and
must not be reordered (§2.7.7 and §2.7.10, the "missed notification" races): storing used ``idx`` then reading
``used_event``/avail ``flags`` (:meth:`SplitQueue.needs_notification`), and storing ``avail_event``/used ``flags``
then re-reading avail ``idx`` (:meth:`SplitQueue.enable_notification`). Both call :func:`full_fence`, which takes
and releases a lock: on x86 that is a ``lock``-prefixed read-modify-write, a full barrier like ``mfence``.

Single loads and stores of the 16-bit indices are atomic because the rings are validated to be naturally aligned
(desc 16, avail 2, used 4; guest RAM regions are page aligned in the host mapping too) and ``struct``'s ``<H`` on
a little-endian host compiles to one ``memcpy`` of 2 bytes, i.e. a single 16-bit move, so the guest can never
observe (nor make us observe) a torn index.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from kvmcore.memory import GuestMemory
from pv.device import QueueConfig
from pv.errors import (
    AvailRingOverflow,
    ChainLengthOverflow,
    ChainTooLong,
    DescriptorIndexOutOfRange,
    IndirectNotNegotiated,
    IndirectWithNext,
    InvalidDescriptorRange,
    InvalidIndirectLength,
    InvalidQueueConfig,
    NestedIndirect,
    ReadableAfterWritable,
)

# Descriptor flags (§2.7.5).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# Ring flags (§2.7.6, §2.7.8).
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768  # §2.7: "The maximum Queue Size value is 32768"
MAX_CHAIN_BYTES = 1 << 32  # §2.7.5.2
DESC_SIZE = 16

# Alignment of each part (§2.7 table).
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

_DESC = struct.Struct("<QIHH")  # struct virtq_desc: addr, len, flags, next
# Ring indices and flags that the driver reads or writes concurrently (avail idx/flags/used_event, used
# idx/flags/avail_event) must move as one 16-bit access: a driver polling used->idx must never see half of our
# update, and we must never see half of its avail->idx update. Two CPython details decide how (Modules/_struct.c):
# standard-size formats ('<', '=') load and store byte by byte (lu_uint/lp_uint), and *every* Struct.pack_into
# first memset()s its destination to zero (s_pack_internal) — a polling driver then sees 0 for an instant. So:
# loads use the native format '@H' (nu_ushort: one sized memcpy = one aligned 16-bit mov, single-copy atomic on
# x86), and stores go through a memoryview cast to 'H' (pack_single: one sized memcpy, no memset). The rings are
# naturally aligned (§2.7: avail 2, used 4); native order is virtio's little-endian order on the hosts we run on.
_IDX16 = struct.Struct("@H")
assert sys.byteorder == "little", "virtio rings are little-endian; the native-order index accessors assume it"
_USED_ELEM = struct.Struct("<II")  # struct virtq_used_elem: id, len

_FENCE_LOCK = threading.Lock()


def full_fence() -> None:
    """A store-load barrier. Python has no ``mfence``; a lock round trip is a locked RMW, which is one on x86."""
    with _FENCE_LOCK:
        pass


def desc_table_size(size: int) -> int:
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """flags, idx, ring[size], used_event (§2.7.6); the spec sizes the part with used_event always present."""
    return 6 + 2 * size


def used_ring_size(size: int) -> int:
    """flags, idx, ring[size] of 8-byte elements, avail_event (§2.7.8)."""
    return 6 + 8 * size


class Descriptor(NamedTuple):
    """One buffer of a validated chain. ``addr``/``len`` lie inside guest RAM (or ``len`` is 0)."""

    addr: int
    len: int
    flags: int
    writable: bool


class _Segments:
    """A cursor over consecutive guest-memory buffers, consumed front to back. Ranges were checked by pop().

    Hot path of every backend: the common cases (consume everything that is left; a small object inside the
    current buffer) skip the general loop.
    """

    __slots__ = ("_mem", "_segs", "_i", "_off", "remaining")

    def __init__(self, mem: GuestMemory, segs: list[tuple[int, int]], remaining: int | None = None) -> None:
        self._mem = mem
        self._segs = segs  # (addr, len), len > 0
        self._i = 0
        self._off = 0
        # ``remaining`` is the sum of the lengths when the caller already knows it (saves a pass over segs).
        self.remaining = sum(n for _a, n in segs) if remaining is None else remaining

    def take_views(self, n: int) -> list[memoryview]:
        """Consume the next ``n`` bytes as zero-copy views (for os.preadv/os.pwritev). Caller checks remaining."""
        if n < 0 or n > self.remaining:
            raise ValueError(f"take_views({n}) with {self.remaining} bytes remaining")
        segs = self._segs
        view = self._mem.view
        if n == self.remaining and self._off == 0:
            # Everything that is left, starting at a buffer boundary: one view per buffer.
            out = [view(addr, length) for addr, length in segs[self._i :]]
            self._i = len(segs)
            self.remaining = 0
            return out
        out = []
        while n:
            addr, length = segs[self._i]
            chunk = min(length - self._off, n)
            out.append(view(addr + self._off, chunk))
            n -= chunk
            self.remaining -= chunk
            self._off += chunk
            if self._off == length:
                self._i += 1
                self._off = 0
        return out

    def skip(self, n: int) -> None:
        self.take_views(n)

    def split_tail(self, n: int) -> list[tuple[int, int]]:
        """Remove the last ``n`` bytes from this cursor and return them as (addr, len) segments."""
        if n < 0 or n > self.remaining:
            raise ValueError(f"split_tail({n}) with {self.remaining} bytes remaining")
        segs = self._segs
        if n and segs:
            addr, length = segs[-1]
            if length - (self._off if len(segs) - 1 == self._i else 0) > n:
                # Inside the last buffer and leaving some of it (virtio-blk's status byte after data in the
                # same buffer, or any tail shorter than the last buffer).
                segs[-1] = (addr, length - n)
                self.remaining -= n
                return [(addr + length - n, n)]
        tail: list[tuple[int, int]] = []
        need = n
        while need:
            addr, length = segs[-1]
            avail = length - (self._off if len(segs) - 1 == self._i else 0)
            chunk = min(avail, need)
            tail.append((addr + length - chunk, chunk))
            need -= chunk
            if chunk == length:
                segs.pop()
            else:
                segs[-1] = (addr, length - chunk)
        self.remaining -= n
        tail.reverse()
        return tail

    def _advance(self, length: int, n: int) -> None:
        """Move the cursor ``n`` bytes forward inside the current buffer (of ``length`` bytes)."""
        self.remaining -= n
        off = self._off + n
        if off == length:
            self._i += 1
            self._off = 0
        else:
            self._off = off


class ChainReader(_Segments):
    """The device-readable part of a chain."""

    __slots__ = ()

    def read(self, n: int) -> bytes:
        """Copy the next ``n`` bytes out of guest memory (for small headers; use take_views for data)."""
        views = self.take_views(n)
        if len(views) == 1:
            return bytes(views[0])
        return b"".join(views)

    def read_obj(self, st: struct.Struct) -> tuple:
        n = st.size
        if 0 < n <= self.remaining:
            addr, length = self._segs[self._i]
            if length - self._off >= n:
                # Inside the current buffer (the usual case): unpack straight from guest memory, no copy.
                values = self._mem.unpack_from(st, addr + self._off)
                self._advance(length, n)
                return values
        return st.unpack(self.read(n))


class ChainWriter(_Segments):
    """The device-writable part of a chain."""

    __slots__ = ()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if 0 < n <= self.remaining:
            addr, length = self._segs[self._i]
            if length - self._off >= n:
                # Fits in the current buffer (status bytes, small headers): one checked write.
                self._mem.write(addr + self._off, data)
                self._advance(length, n)
                return
        mv = memoryview(data)
        pos = 0
        for v in self.take_views(len(mv)):
            k = len(v)
            v[:] = mv[pos : pos + k]
            pos += k

    def split_tail_writer(self, n: int) -> ChainWriter:
        """Split off the last ``n`` writable bytes (e.g. virtio-blk's status byte, §5.2.6) as their own writer."""
        return ChainWriter(self._mem, self.split_tail(n), n)


# One raw descriptor as read from the ring: (addr, len, flags, next). Kept as the tuple struct returns, so parsing
# creates no object per descriptor; Descriptor views of it are built only when someone asks.
_RawDesc = tuple[int, int, int, int]


class DescriptorChain:
    """A validated descriptor chain: zero or more readable descriptors, then zero or more writable ones."""

    __slots__ = ("mem", "head_index", "_raw", "readable_len", "writable_len", "_split")

    def __init__(
        self,
        mem: GuestMemory,
        head_index: int,
        raw: list[_RawDesc],
        split: int,
        readable_len: int | None = None,
        writable_len: int | None = None,
    ) -> None:
        self.mem = mem
        self.head_index = head_index
        self._raw = raw
        self._split = split  # index of the first writable descriptor
        self.readable_len = sum(d[1] for d in raw[:split]) if readable_len is None else readable_len
        self.writable_len = sum(d[1] for d in raw[split:]) if writable_len is None else writable_len

    @property
    def descriptors(self) -> list[Descriptor]:
        split = self._split
        return [Descriptor(a, n, f, i >= split) for i, (a, n, f, _nx) in enumerate(self._raw)]

    def __iter__(self) -> Iterator[Descriptor]:
        return iter(self.descriptors)

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head_index}, descs={len(self._raw)}, "
            f"readable={self.readable_len}, writable={self.writable_len})"
        )

    def readable(self) -> list[Descriptor]:
        return self.descriptors[: self._split]

    def writable(self) -> list[Descriptor]:
        return self.descriptors[self._split :]

    def readable_views(self) -> list[memoryview]:
        """Every device-readable buffer as a zero-copy view, in order (zero-length buffers omitted)."""
        view = self.mem.view
        return [view(a, n) for a, n, _f, _nx in self._raw[: self._split] if n]

    def writable_views(self) -> list[memoryview]:
        """Every device-writable buffer as a zero-copy view, in order (zero-length buffers omitted)."""
        view = self.mem.view
        return [view(a, n) for a, n, _f, _nx in self._raw[self._split :] if n]

    def segments(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(readable, writable) buffers as (gpa, len) pairs in order, zero-length ones omitted. Every range was
        checked against guest RAM by pop(); access them through GuestMemory (e.g. ``mem.view``)."""
        raw = self._raw
        split = self._split
        return (
            [(a, n) for a, n, _f, _nx in raw[:split] if n],
            [(a, n) for a, n, _f, _nx in raw[split:] if n],
        )

    def reader(self) -> ChainReader:
        return ChainReader(
            self.mem, [(a, n) for a, n, _f, _nx in self._raw[: self._split] if n], self.readable_len
        )

    def writer(self) -> ChainWriter:
        return ChainWriter(
            self.mem, [(a, n) for a, n, _f, _nx in self._raw[self._split :] if n], self.writable_len
        )


class SplitQueue:
    """One split virtqueue, device side. Call validate() (or is_valid()) before use; close() when done.

    Not thread-safe: one worker thread owns it while the device runs.
    """

    def __init__(self, mem: GuestMemory, cfg: QueueConfig, *, indirect: bool = True) -> None:
        self.mem = mem
        self.index = cfg.index
        self.size = cfg.size
        self.desc_table = cfg.desc_table
        self.avail_ring = cfg.avail_ring
        self.used_ring = cfg.used_ring
        self.kick_fd = cfg.kick_fd
        self.call_fd = cfg.call_fd
        self.event_idx = cfg.event_idx
        self.indirect = indirect  # VIRTIO_F_INDIRECT_DESC negotiated
        self.next_avail = 0  # free-running u16: next avail ring slot the device will consume
        self.next_used = 0  # free-running u16: next used ring slot the device will fill
        self._avail_idx = 0  # last avail idx read from the ring; re-read only when the batch is drained
        self._signalled_used = 0  # used idx at the last needs_notification() (vring_need_event's "old")
        self._num_added = 0  # used entries added since the last needs_notification()
        self._desc_view: memoryview | None = None
        self._avail_view: memoryview | None = None
        self._used_view: memoryview | None = None
        self._used16: memoryview | None = None
        self._used_event_off = 4 + 2 * self.size
        self._avail_event_off = 4 + 8 * self.size
        if cfg.next_avail or cfg.next_used:
            self.set_position(cfg.next_avail, cfg.next_used)

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise InvalidQueueConfig unless the size and the three rings are usable (§2.7), then map the rings."""
        size = self.size
        if not (isinstance(size, int) and 0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0):
            raise InvalidQueueConfig(
                f"queue {self.index}: size {size} is not a power of two <= {MAX_QUEUE_SIZE}"
            )
        parts = (
            ("descriptor table", self.desc_table, DESC_ALIGN, desc_table_size(size)),
            ("available ring", self.avail_ring, AVAIL_ALIGN, avail_ring_size(size)),
            ("used ring", self.used_ring, USED_ALIGN, used_ring_size(size)),
        )
        for name, gpa, align, length in parts:
            if gpa % align:
                raise InvalidQueueConfig(
                    f"queue {self.index}: {name} at 0x{gpa:x} is not {align}-byte aligned"
                )
            if not self.mem.check_range(gpa, length):
                raise InvalidQueueConfig(
                    f"queue {self.index}: {name} 0x{gpa:x}+0x{length:x} is not in guest RAM"
                )
        self._desc_view = self.mem.view(self.desc_table, desc_table_size(size))
        self._avail_view = self.mem.view(self.avail_ring, avail_ring_size(size))
        self._used_view = self.mem.view(self.used_ring, used_ring_size(size))
        self._used16 = self._used_view.cast("H")  # flags [0], idx [1], ring, avail_event [2 + 4 * size]

    def is_valid(self) -> bool:
        try:
            self.validate()
        except InvalidQueueConfig:
            return False
        return True

    def close(self) -> None:
        """Drop the ring views so the guest memory can be unmapped."""
        if self._used16 is not None:
            self._used16.release()
            self._used16 = None
        for v in (self._desc_view, self._avail_view, self._used_view):
            if v is not None:
                v.release()
        self._desc_view = self._avail_view = self._used_view = None

    def _views(self) -> tuple[memoryview, memoryview, memoryview]:
        if self._desc_view is None or self._avail_view is None or self._used_view is None:
            raise RuntimeError(f"queue {self.index} used before validate() or after close()")  # device bug
        return self._desc_view, self._avail_view, self._used_view

    def set_position(self, next_avail: int, next_used: int) -> None:
        """Resume at given ring positions (snapshot restore, vhost-user SET_VRING_BASE; tests of wraparound)."""
        self.next_avail = self._avail_idx = next_avail & 0xFFFF
        self.next_used = self._signalled_used = next_used & 0xFFFF
        self._num_added = 0

    # ----------------------------------------------------------------- available ring
    def _read_avail_idx(self) -> int:
        avail = self._avail_view
        if avail is None:
            self._views()  # raises the "used before validate()" device bug
        idx: int = _IDX16.unpack_from(avail, 2)[0]  # type: ignore[arg-type]
        # (A weakly ordered CPU needs an acquire fence here, before ring entries are read; x86 does not.)
        if (idx - self.next_avail) & 0xFFFF > self.size:
            raise AvailRingOverflow(
                f"queue {self.index}: avail idx {idx} is more than {self.size} ahead of {self.next_avail}"
            )
        return idx

    def avail_pending(self) -> int:
        """Chains the driver has published and the device has not popped, read fresh from the ring."""
        self._avail_idx = self._read_avail_idx()
        return (self._avail_idx - self.next_avail) & 0xFFFF

    def pop(self) -> DescriptorChain | None:
        """Next available chain, fully validated, or None. Raises only pv.errors.VirtqueueError subclasses."""
        if self.next_avail == self._avail_idx:
            # Batch drained: read idx once for the next batch.
            self._avail_idx = self._read_avail_idx()
            if self.next_avail == self._avail_idx:
                return None
        avail = self._avail_view
        if avail is None:
            self._views()  # raises the "used before validate()" device bug
        head: int = _IDX16.unpack_from(avail, 4 + 2 * (self.next_avail & (self.size - 1)))[0]  # type: ignore[arg-type]
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return self._parse_chain(head)

    def undo_pop(self) -> None:
        """Give the last popped chain back (it is re-read and re-validated on the next pop). For throttling."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    def _parse_chain(self, head: int) -> DescriptorChain:
        """Walk and validate the chain at ``head``. Every rule below is checked for every descriptor:

        - TTL: at most ``size`` descriptors (or the indirect table's entry count) are visited (§2.7.5.3.1), which
          is also what makes a looping chain terminate (ChainTooLong);
        - head and every ``next`` index inside the table being walked (DescriptorIndexOutOfRange);
        - indirect: negotiated, not nested, not combined with NEXT, length a non-zero multiple of 16 and at most
          ``size`` entries, table inside guest RAM (§2.7.5.3.1);
        - no readable descriptor after a writable one (§2.7.4.2, ReadableAfterWritable);
        - every non-empty buffer inside guest RAM, checked through GuestMemory (InvalidDescriptorRange);
        - total length at most 2^32 (§2.7.5.2, ChainLengthOverflow).

        Descriptors are kept as the raw tuples ``struct`` returns (no object per descriptor) and the readable and
        writable byte counts are summed on the way, so the common 2-4 descriptor chain costs one loop pass.
        """
        size = self.size
        if head >= size:
            raise DescriptorIndexOutOfRange(f"queue {self.index}: chain head {head} >= queue size {size}")
        table: memoryview | bytes | None = self._desc_view
        if table is None:
            self._views()  # raises the "used before validate()" device bug
        mem = self.mem
        check = mem.check_range
        unpack = _DESC.unpack_from
        table_len = size
        ttl = size  # §2.7.5.3.1: no chain longer than the queue size; also what makes loops terminate
        idx = head
        in_indirect = False
        split = -1
        rlen = wlen = 0
        descs: list[_RawDesc] = []
        append = descs.append
        while True:
            if ttl == 0:
                raise ChainTooLong(
                    f"queue {self.index}: chain at head {head} exceeds {table_len} descriptors"
                )
            ttl -= 1
            desc = unpack(table, idx * DESC_SIZE)  # type: ignore[arg-type]
            addr, length, flags, nxt = desc
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise NestedIndirect(f"queue {self.index}: head {head}")
                if not self.indirect:
                    raise IndirectNotNegotiated(f"queue {self.index}: head {head}")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise IndirectWithNext(f"queue {self.index}: head {head}")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > size:
                    raise InvalidIndirectLength(f"queue {self.index}: head {head}: table length {length}")
                if not check(addr, length):
                    raise InvalidDescriptorRange(
                        f"queue {self.index}: indirect table 0x{addr:x}+0x{length:x}"
                    )
                # Snapshot the table so the driver cannot change it between validation and use. (§2.7.5.3.2:
                # the device ignores the WRITE flag of the descriptor that refers to the table.)
                table = mem.read(addr, length)
                table_len = ttl = length // DESC_SIZE
                idx = 0
                in_indirect = True
                continue
            if flags & VIRTQ_DESC_F_WRITE:
                if split < 0:
                    split = len(descs)
                wlen += length
            else:
                if split >= 0:
                    raise ReadableAfterWritable(f"queue {self.index}: head {head}, descriptor {len(descs)}")
                rlen += length
            if length and not check(addr, length):
                raise InvalidDescriptorRange(f"queue {self.index}: buffer 0x{addr:x}+0x{length:x}")
            append(desc)
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= table_len:
                raise DescriptorIndexOutOfRange(f"queue {self.index}: next {nxt} >= table size {table_len}")
            idx = nxt
        if rlen + wlen > MAX_CHAIN_BYTES:
            raise ChainLengthOverflow(f"queue {self.index}: head {head}: {rlen + wlen} bytes")
        return DescriptorChain(mem, head, descs, len(descs) if split < 0 else split, rlen, wlen)

    # ----------------------------------------------------------------- used ring
    def add_used(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes written into its writable buffers (§2.7.8)."""
        used = self._used_view
        if used is None:
            self._views()  # raises the "used before validate()" device bug
        size = self.size
        if not 0 <= head < size or not 0 <= written < MAX_CHAIN_BYTES:
            raise ValueError(f"add_used({head}, {written}) on a queue of size {size}")  # device bug
        slot = self.next_used
        _USED_ELEM.pack_into(used, 4 + 8 * (slot & (size - 1)), head, written)  # type: ignore[arg-type]
        # (A weakly ordered CPU needs a release fence here: the element must be visible before idx. x86: TSO.)
        slot = (slot + 1) & 0xFFFF
        self.next_used = slot
        self._used16[1] = slot  # type: ignore[index]
        self._num_added += 1

    def add_used_many(self, elems: Sequence[tuple[int, int]]) -> None:
        """Several used elements published with one used-idx store, so the driver sees them together (virtio-net
        mergeable rx, §5.1.6.3.2: Linux drops a packet whose num_buffers chains are not all there yet)."""
        _d, _a, used = self._views()
        slot = self.next_used
        for head, written in elems:
            if not 0 <= head < self.size or not 0 <= written < MAX_CHAIN_BYTES:
                raise ValueError(f"add_used({head}, {written}) on a queue of size {self.size}")  # device bug
            _USED_ELEM.pack_into(used, 4 + 8 * (slot & (self.size - 1)), head, written)
            slot = (slot + 1) & 0xFFFF
        # (A weakly ordered CPU needs a release fence here: the elements must be visible before idx. x86: TSO.)
        self.next_used = slot
        self._used16[1] = slot  # type: ignore[index]
        self._num_added += len(elems)

    def needs_notification(self) -> bool:
        """Whether the driver wants a used-buffer notification for what was added since the last call (§2.7.7)."""
        added = self._num_added
        new = self.next_used
        old = self._signalled_used
        self._num_added = 0
        self._signalled_used = new
        if added == 0:
            return False
        avail = self._avail_view
        if avail is None:
            self._views()  # raises the "used before validate()" device bug
        # Our used idx store must be visible before we read the driver's suppression state, or the driver may
        # have just decided to wait for an interrupt we then skip (§2.7.7 race): store-load barrier.
        full_fence()
        if self.event_idx:
            if added >= 0x10000:  # the u16 window wrapped: the event index was certainly crossed
                return True
            used_event: int = _IDX16.unpack_from(avail, self._used_event_off)[0]  # type: ignore[arg-type]
            # vring_need_event(): notify iff used_event lies in the window (old, new] of entries just written.
            return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        flags: int = _IDX16.unpack_from(avail, 0)[0]  # type: ignore[arg-type]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def signal_used(self) -> bool:
        """Write the call eventfd if the driver wants a notification; True if it was written."""
        if not self.needs_notification():
            return False
        if self.call_fd >= 0:
            os.eventfd_write(self.call_fd, 1)
        return True

    # ----------------------------------------------------------------- available-buffer notification suppression
    def set_avail_event(self) -> None:
        """EVENT_IDX: ask the driver to kick when it publishes the slot we will pop next (§2.7.10)."""
        if self.event_idx:
            _d, _a, used = self._views()
            self._used16[self._avail_event_off >> 1] = self.next_avail  # type: ignore[index]

    def disable_notification(self) -> None:
        """While draining, ask the driver not to kick (VIRTQ_USED_F_NO_NOTIFY; with EVENT_IDX nothing to do)."""
        if not self.event_idx:
            _d, _a, used = self._views()
            self._used16[0] = VIRTQ_USED_F_NO_NOTIFY  # type: ignore[index]

    def enable_notification(self) -> bool:
        """Re-enable kicks, then re-check the ring: True if chains arrived meanwhile (process them, §2.7.10)."""
        _d, _a, used = self._views()
        if self.event_idx:
            self.set_avail_event()
        else:
            self._used16[0] = 0  # type: ignore[index]
        # Store (avail_event / flags) then load (avail idx): the driver may have published after our last read and
        # checked suppression before our store landed; without this barrier neither side would act.
        full_fence()
        return self.avail_pending() != 0
