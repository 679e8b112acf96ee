"""Guest RAM: the only door through which any code reads or writes guest memory.

Every access is a checked (gpa, length) pair that must lie inside exactly one region; nothing hands out raw
pointers except :meth:`GuestMemory.slots`, which exists for the KVM memory-slot ioctl and for sharing the
backing file descriptors with vhost-user backends.

Two backings, chosen by the caller (:meth:`GuestMemory.create`): a sealed memfd when another process must map the
very same pages (vhost-user SET_MEM_TABLE passes fds, not addresses), else anonymous private memory — what QEMU and
Firecracker use by default, and the only kind that gets transparent huge pages on a stock kernel (shmem THP is
off by default, ``/sys/kernel/mm/transparent_hugepage/shmem_enabled``). Both are advised MADV_HUGEPAGE and mapped
at a 2 MiB-aligned host address, so KVM can back the guest with 2 MiB pages: with 4 KiB pages a Linux guest
unpacking its initramfs took 2.3x as long under nested paging (bench.linux, the real-KVM lane).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

PAGE_SIZE = 4096
HUGE_PAGE = 2 << 20

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemoryError(Exception):
    """Base of every guest-memory failure; guest-caused ones are recoverable by the caller."""


class InvalidGuestAddress(GuestMemoryError):
    """The range [gpa, gpa + length) is not entirely inside one guest RAM region."""

    def __init__(self, gpa: int, length: int) -> None:
        super().__init__(f"guest range 0x{gpa:x}+0x{length:x} is not backed by guest RAM")
        self.gpa = gpa
        self.length = length


class GuestAddressOverflow(GuestMemoryError):
    """gpa + length wraps around the 64-bit guest-physical address space (or is negative)."""

    def __init__(self, gpa: int, length: int) -> None:
        super().__init__(f"guest range 0x{gpa:x}+0x{length:x} overflows the address space")
        self.gpa = gpa
        self.length = length


class MemoryLayoutError(GuestMemoryError):
    """A host-side layout request is malformed (unaligned, overlapping, empty). A config error, not a guest one."""


@dataclass(frozen=True)
class MemorySlot:
    """What KVM_SET_USER_MEMORY_REGION and vhost-user SET_MEM_TABLE need to know about one region."""

    slot: int
    gpa: int
    size: int
    host_addr: int
    fd: int
    fd_offset: int


class _Region:
    """One region: ``view`` is exactly its bytes, a window at ``base`` into ``mm`` (which may be larger, for
    alignment). Every access goes through ``view``; ``mm`` is kept only to unmap it."""

    __slots__ = ("gpa", "end", "size", "mm", "view", "fd", "fd_offset", "base")

    def __init__(self, gpa: int, size: int, fd: int, fd_offset: int, mm: mmap.mmap, base: int = 0) -> None:
        self.gpa = gpa
        self.size = size
        self.end = gpa + size
        self.fd = fd
        self.fd_offset = fd_offset
        self.mm = mm
        self.base = base
        self.view = memoryview(mm)[base : base + size]


_U64_MAX = (1 << 64) - 1


def _map_region(gpa: int, size: int, fd: int, off: int, huge_pages: bool) -> _Region:
    """Map one region. With ``huge_pages`` the mapping is over-allocated by 2 MiB and the region starts at the
    first host address congruent to its gpa modulo 2 MiB: KVM maps a guest huge page only when host and guest
    addresses agree in their low 21 bits, and Linux before 6.7 does not align large anonymous mappings."""
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if fd < 0:
        pad = HUGE_PAGE if huge_pages else 0
        mm = mmap.mmap(-1, size + pad, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot)
        base = 0
        if huge_pages:
            addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            base = (gpa - addr) % HUGE_PAGE
            with contextlib.suppress(OSError):
                mm.madvise(mmap.MADV_HUGEPAGE, 0, len(mm))  # the kernel's THP mode may be "never": then 4 KiB
        return _Region(gpa, size, fd, off, mm, base)
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot, offset=off)
    if huge_pages:
        # shmem places huge-capable mappings at aligned addresses itself; THP for shmem needs shmem_enabled.
        with contextlib.suppress(OSError):
            mm.madvise(mmap.MADV_HUGEPAGE)
    return _Region(gpa, size, fd, off, mm)


class GuestMemory:
    """Guest-physical RAM made of non-overlapping page-aligned regions.

    Construct with :meth:`create` (one fresh memfd for all regions) or :meth:`from_fds` (regions received from
    elsewhere, e.g. a vhost-user memory table).
    """

    def __init__(self, regions: Sequence[tuple[int, int, int, int]], *, owns_fds: bool,
                 huge_pages: bool = False) -> None:
        """regions: (gpa, size, fd, fd_offset) tuples, validated here; fd -1 is anonymous private memory.
        ``huge_pages``: map at a 2 MiB-aligned address and advise MADV_HUGEPAGE (guest RAM; not a backend's
        view of someone else's memory)."""
        ordered = sorted(regions)
        prev_end = -1
        for gpa, size, _fd, off in ordered:
            if size <= 0 or gpa < 0 or gpa + size - 1 > _U64_MAX:
                raise MemoryLayoutError(f"bad region gpa=0x{gpa:x} size=0x{size:x}")
            if gpa % PAGE_SIZE or size % PAGE_SIZE or off % PAGE_SIZE:
                raise MemoryLayoutError(f"region gpa=0x{gpa:x} size=0x{size:x} is not page aligned")
            if gpa < prev_end:
                raise MemoryLayoutError(f"region gpa=0x{gpa:x} overlaps the previous region")
            prev_end = gpa + size
        self._owns_fds = owns_fds
        self._regions: list[_Region] = []
        try:
            for gpa, size, fd, off in ordered:
                self._regions.append(_map_region(gpa, size, fd, off, huge_pages))
        except BaseException:
            # Construction failed, so the fds still belong to the caller (create() closes its memfd itself):
            # closing them here as well closed the memfd twice and masked the real error with EBADF.
            self._owns_fds = False
            self.close()
            raise
        self._last = self._regions[0] if self._regions else None

    # ----------------------------------------------------------------- construction
    @classmethod
    def create(cls, layout: Iterable[tuple[int, int]], name: str = "kvmdm-guest-ram", *,
               shared: bool = True) -> GuestMemory:
        """Allocate zeroed RAM for [(gpa, size), ...]: in one memfd (sealed against shrinking) when ``shared``,
        so vhost-user back-ends can map it, else anonymous private memory (no fd: :meth:`slots` report -1)."""
        layout = list(layout)
        total = sum(size for _gpa, size in layout)
        if not layout or total <= 0:
            raise MemoryLayoutError("guest memory layout is empty")
        if not shared:
            return cls([(gpa, size, -1, 0) for gpa, size in layout], owns_fds=False, huge_pages=True)
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, total)
            # A backend that gets this fd must not be able to shrink it under our mappings (SIGBUS in the DM).
            import fcntl

            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            regions = []
            off = 0
            for gpa, size in layout:
                regions.append((gpa, size, fd, off))
                off += size
            mem = cls(regions, owns_fds=True, huge_pages=True)
        except BaseException:
            os.close(fd)
            raise
        return mem

    @classmethod
    def from_fds(cls, regions: Sequence[tuple[int, int, int, int]]) -> GuestMemory:
        """Map regions whose fds someone else handed us; the caller keeps ownership of the fds."""
        return cls(regions, owns_fds=False)

    def close(self) -> None:
        fds = set()
        for r in self._regions:
            r.view.release()
            try:
                r.mm.close()
            except BufferError:
                # A view() handed out earlier is still alive. Unmapping now is refused (it would leave that view
                # dangling); the mapping goes away when the last view is dropped. Without this, close() raised
                # half-way and left released views behind that made later accesses fail with ValueError.
                pass
            if r.fd >= 0:
                fds.add(r.fd)
        self._regions = []
        self._last = None
        if self._owns_fds:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- introspection
    @property
    def size(self) -> int:
        return sum(r.size for r in self._regions)

    def regions(self) -> Iterator[tuple[int, int]]:
        """(gpa, size) of each region, in address order."""
        for r in self._regions:
            yield r.gpa, r.size

    def slots(self) -> list[MemorySlot]:
        """Host-side facts for KVM memory slots and vhost-user memory tables. Not for data access."""
        out = []
        for i, r in enumerate(self._regions):
            addr = ctypes.addressof(ctypes.c_char.from_buffer(r.mm)) + r.base
            out.append(MemorySlot(i, r.gpa, r.size, addr, r.fd, r.fd_offset))
        return out

    def host_views(self) -> list[tuple[int, memoryview]]:
        """(gpa, writable view of the whole region) per region, for a C data path (pv.netring) that applies the
        same one-region rule to every buffer itself. Holding a view pins the mapping: close() cannot unmap it."""
        return [(r.gpa, memoryview(r.mm)[r.base : r.base + r.size]) for r in self._regions]

    @property
    def shareable(self) -> bool:
        """Every region has an fd another process can map (vhost-user)."""
        return all(r.fd >= 0 for r in self._regions)

    # ----------------------------------------------------------------- checking
    def _find(self, gpa: int, length: int) -> tuple[_Region, int]:
        """Region and offset for a range that must lie inside one region; raises otherwise."""
        if gpa < 0 or length < 0 or gpa + length > _U64_MAX + 1:
            raise GuestAddressOverflow(gpa, length)
        r = self._last
        if r is not None and r.gpa <= gpa and gpa + length <= r.end:
            return r, gpa - r.gpa
        for r in self._regions:
            if r.gpa <= gpa < r.end or (length == 0 and gpa == r.end):
                if gpa + length <= r.end:
                    self._last = r
                    return r, gpa - r.gpa
                break
        raise InvalidGuestAddress(gpa, length)

    def check_range(self, gpa: int, length: int) -> bool:
        """True if [gpa, gpa+length) is inside one region (what any access would require)."""
        r = self._last  # hot path: virtqueue descriptors almost always fall in the region used last
        if r is not None and r.gpa <= gpa and length >= 0 and gpa + length <= r.end:
            return True
        try:
            self._find(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def contains(self, gpa: int) -> bool:
        return self.check_range(gpa, 1)

    # ----------------------------------------------------------------- access
    def read(self, gpa: int, length: int) -> bytes:
        r, off = self._find(gpa, length)
        return bytes(r.view[off : off + length])

    def read_into(self, gpa: int, buf: bytearray | memoryview) -> None:
        n = len(buf)
        r, off = self._find(gpa, n)
        buf[:] = r.view[off : off + n]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        r, off = self._find(gpa, n)
        r.view[off : off + n] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        r, off = self._find(gpa, length)
        r.view[off : off + length] = bytes([byte]) * length

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy writable view of [gpa, gpa+length); valid until close(). For preadv/pwritev."""
        r, off = self._find(gpa, length)
        return r.view[off : off + length]

    def unpack_from(self, st: struct.Struct, gpa: int) -> tuple:
        r, off = self._find(gpa, st.size)
        return st.unpack_from(r.view, off)

    def pack_into(self, st: struct.Struct, gpa: int, *values: object) -> None:
        r, off = self._find(gpa, st.size)
        st.pack_into(r.view, off, *values)

    def read_u8(self, gpa: int) -> int:
        return self.unpack_from(_U8, gpa)[0]

    def read_u16(self, gpa: int) -> int:
        return self.unpack_from(_U16, gpa)[0]

    def read_u32(self, gpa: int) -> int:
        return self.unpack_from(_U32, gpa)[0]

    def read_u64(self, gpa: int) -> int:
        return self.unpack_from(_U64, gpa)[0]

    def write_u8(self, gpa: int, value: int) -> None:
        self.pack_into(_U8, gpa, value)

    def write_u16(self, gpa: int, value: int) -> None:
        self.pack_into(_U16, gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self.pack_into(_U32, gpa, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self.pack_into(_U64, gpa, value)
