"""virtio-blk backend over a raw image file descriptor (virtio 1.2 §5.2).

Requests are served synchronously in the queue worker thread with ``os.preadv``/``os.pwritev`` straight between
the image fd and guest-memory views (no copy through Python bytes). A request the driver got wrong completes with
VIRTIO_BLK_S_IOERR or VIRTIO_BLK_S_UNSUPP (§5.2.6); only ring-level violations (pv.errors) reset the device.
Modelled on Firecracker ``devices/virtio/block`` (request.rs) and QEMU ``hw/block/virtio-blk.c``.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from dataclasses import dataclass

from kvmcore.util.ratelimit import RateLimitedLog
from pv import _libc
from pv.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
)
from pv.queue import MAX_QUEUE_SIZE, ChainReader, ChainWriter, DescriptorChain
from pv.worker import ChainHandler, WorkerDevice

log = logging.getLogger(__name__)

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT

# Feature bits (§5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types (§5.2.6).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

# Status values (§5.2.6).
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20  # §5.2.6: "The length of data MUST be 20 bytes for VIRTIO_BLK_T_GET_ID requests"
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1  # struct virtio_blk_discard_write_zeroes.flags bit 0

# Limits we advertise (§5.2.4) and enforce.
MAX_DISCARD_SECTORS = 0x3F_FFFF  # ~2 GiB per segment
MAX_DISCARD_SEG = 32
DISCARD_SECTOR_ALIGNMENT = 8  # 4 KiB: punch-hole granularity of common filesystems
MAX_WRITE_ZEROES_SECTORS = 0x3F_FFFF
MAX_WRITE_ZEROES_SEG = 32
BLK_SIZE = SECTOR_SIZE

_REQ_HDR = struct.Struct("<IIQ")  # struct virtio_blk_req: le32 type, le32 reserved, le64 sector
_DWZ_SEG = struct.Struct("<QII")  # struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags
# struct virtio_blk_config up to unused1 (§5.2.4): capacity, size_max, seg_max, geometry(c,h,s), blk_size,
# topology(physical_block_exp, alignment_offset, min_io_size, opt_io_size), writeback, unused0, num_queues,
# max_discard_sectors, max_discard_seg, discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
# write_zeroes_may_unmap, unused1[3].
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
assert _CONFIG.size == 60

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_ZERO_CHUNK = bytes(1 << 20)
_STATUS_BYTE = {s: bytes((s,)) for s in (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP)}


@dataclass
class BlockMetrics:
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    get_ids: int = 0
    discards: int = 0
    write_zeroes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    io_errors: int = 0  # requests completed with VIRTIO_BLK_S_IOERR
    unsupported: int = 0  # requests completed with VIRTIO_BLK_S_UNSUPP
    no_status: int = 0  # chains without a writable status byte: returned with len 0


class _RequestError(Exception):
    """A request-level failure: complete the request with ``status`` (not a queue error)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def _io_full(fn: object, fd: int, views: list[memoryview], offset: int, want: int | None = None) -> int:
    """preadv/pwritev all of ``views`` (``want`` bytes, if the caller knows the sum) at ``offset``: chunks of
    IOV_MAX, resumes short transfers; EOF -> OSError."""
    io = fn  # os.preadv or os.pwritev
    if not views:
        return 0
    if want is None:
        want = sum(len(v) for v in views)
    done = 0
    while True:
        # The usual case is one call that moves everything: no slicing, no summing.
        n = io(fd, views if len(views) <= _IOV_MAX else views[:_IOV_MAX], offset + done)  # type: ignore[operator]
        if n <= 0:
            raise OSError(errno.EIO, "short transfer at end of image")
        done += n
        if done >= want:
            return done
        views = _drop_front(views, n)


def _drop_front(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes (after a short or IOV_MAX-limited transfer)."""
    i = 0
    while n >= len(views[i]):
        n -= len(views[i])
        i += 1
    return [views[i][n:], *views[i + 1 :]] if n else views[i:]


class Block(WorkerDevice):
    """virtio-blk over ``fd`` (a raw image file or block device, opened by the caller: pass fds, not paths)."""

    device_type = VIRTIO_ID_BLOCK

    def __init__(
        self,
        fd: int,
        *,
        read_only: bool = False,
        serial: str = "",
        num_queues: int = 1,
        queue_size: int = 256,
    ) -> None:
        super().__init__()
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues must be 1..65535, got {num_queues}")
        if not (2 <= queue_size <= MAX_QUEUE_SIZE and queue_size & (queue_size - 1) == 0):
            raise ValueError(f"queue_size must be a power of two in 2..{MAX_QUEUE_SIZE}, got {queue_size}")
        serial_bytes = serial.encode("ascii")
        if len(serial_bytes) > VIRTIO_BLK_ID_BYTES:
            raise ValueError(f"serial longer than {VIRTIO_BLK_ID_BYTES} bytes: {serial!r}")
        self.fd = fd
        self.read_only = read_only
        self.serial = serial_bytes.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self.num_queues = num_queues
        self.queue_max_sizes = (queue_size,) * num_queues
        # lseek works for regular files and block devices alike (st_size is 0 for the latter).
        self.size_bytes = os.lseek(fd, 0, os.SEEK_END)
        self.capacity = self.size_bytes >> SECTOR_SHIFT  # a partial last sector is not exposed
        self.seg_max = queue_size - 2  # room for the header and status descriptors (as QEMU/Firecracker)
        self.metrics = BlockMetrics()
        self._rlog = RateLimitedLog(log)
        self._config = _CONFIG.pack(
            self.capacity,
            0,  # size_max (VIRTIO_BLK_F_SIZE_MAX not offered)
            self.seg_max,
            0, 0, 0,  # geometry (not offered)
            BLK_SIZE,
            0, 0, 0, 0,  # topology (not offered)
            0,  # writeback (CONFIG_WCE not offered)
            0,  # unused0
            num_queues,
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            DISCARD_SECTOR_ALIGNMENT,
            MAX_WRITE_ZEROES_SECTORS,
            MAX_WRITE_ZEROES_SEG,
            1,  # write_zeroes_may_unmap: WRITE_ZEROES with UNMAP punches holes
        )  # fmt: skip

    # ----------------------------------------------------------------- VirtioDevice
    def device_features(self) -> int:
        feats = (
            (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_EVENT_IDX)
            | (1 << VIRTIO_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_MQ)
        )
        if self.read_only:
            feats |= 1 << VIRTIO_BLK_F_RO
        else:
            feats |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
        return feats

    def read_config(self, offset: int, data: memoryview) -> None:
        n = len(data)
        chunk = self._config[offset : offset + n] if 0 <= offset < len(self._config) else b""
        data[: len(chunk)] = chunk
        data[len(chunk) :] = bytes(n - len(chunk))

    def chain_handler(self, queue_index: int) -> ChainHandler:
        return self.process_request

    # ----------------------------------------------------------------- requests
    def process_request(self, chain: DescriptorChain) -> int:
        """Serve one request; returns the bytes written into the chain (data + status byte). Never raises."""
        done = self._fast_read_write(chain)
        if done is not None:
            return done
        return self._process_general(chain)

    def _fast_read_write(self, chain: DescriptorChain) -> int | None:
        """IN/OUT in the layout every driver uses: the 16-byte header alone in the first readable buffer, the
        status byte alone in the last writable one, data in between. Serves it without reader/writer cursors
        and returns what process_request would; returns None (having changed nothing) for anything else, or
        for a request that fails a check, so the general path handles and reports it. Same checks: ranges
        through GuestMemory, data length in whole sectors inside the capacity, no writes to a read-only disk."""
        readable, writable = chain.segments()
        if not readable or not writable or readable[0][1] != _REQ_HDR.size or writable[-1][1] != 1:
            return None
        mem = chain.mem
        rtype, _reserved, sector = mem.unpack_from(_REQ_HDR, readable[0][0])
        if rtype == VIRTIO_BLK_T_IN:
            data = writable[:-1]
            nbytes = chain.writable_len - 1
            io = os.preadv
        elif rtype == VIRTIO_BLK_T_OUT and not self.read_only:
            data = readable[1:]
            nbytes = chain.readable_len - _REQ_HDR.size
            io = os.pwritev
        else:
            return None
        if nbytes % SECTOR_SIZE or sector > self.capacity or nbytes >> SECTOR_SHIFT > self.capacity - sector:
            return None  # the general path completes it with IOERR and logs why
        view = mem.view
        try:
            _io_full(io, self.fd, [view(a, n) for a, n in data], sector << SECTOR_SHIFT, nbytes)
        except OSError as e:
            self.metrics.io_errors += 1
            self._rlog.info(
                "virtio-blk: request at head %d failed: %s: %s",
                chain.head_index,
                "read" if rtype == VIRTIO_BLK_T_IN else "write",
                e,
            )
            mem.write(writable[-1][0], _STATUS_BYTE[VIRTIO_BLK_S_IOERR])
            return 1
        m = self.metrics
        if rtype == VIRTIO_BLK_T_IN:
            m.reads += 1
            m.bytes_read += nbytes
        else:
            m.writes += 1
            m.bytes_written += nbytes
            nbytes = 0
        # Status byte written last, after all data (§5.2.6).
        mem.write(writable[-1][0], _STATUS_BYTE[VIRTIO_BLK_S_OK])
        return nbytes + 1

    def _process_general(self, chain: DescriptorChain) -> int:
        """Any layout: header and status may straddle buffers (§2.6.4, no assumptions about message framing)."""
        w = chain.writer()
        if w.remaining == 0:
            # No room for the status byte: nothing can be reported (§5.2.6 requires it); give the chain back.
            self.metrics.no_status += 1
            self._rlog.warning("virtio-blk: request at head %d has no status byte", chain.head_index)
            return 0
        status_w = w.split_tail_writer(1)  # status is the last writable byte (§5.2.6)
        r = chain.reader()
        written = 0
        try:
            if r.remaining < _REQ_HDR.size:
                raise _RequestError(VIRTIO_BLK_S_IOERR, f"header is {r.remaining} bytes")
            rtype, _reserved, sector = r.read_obj(_REQ_HDR)
            written = self._dispatch(rtype, sector, r, w)
            status = VIRTIO_BLK_S_OK
        except _RequestError as e:
            status = e.status
            if status == VIRTIO_BLK_S_UNSUPP:
                self.metrics.unsupported += 1
            else:
                self.metrics.io_errors += 1
            self._rlog.info("virtio-blk: request at head %d failed: %s", chain.head_index, e)
        # Status byte written last, after all data (§5.2.6).
        status_w.write(_STATUS_BYTE[status])
        return written + 1

    def _feature(self, bit: int) -> bool:
        return bool(self.acked_features & (1 << bit))

    def _check_range(self, sector: int, nbytes: int) -> int:
        """Byte offset of a transfer, or IOERR if any part lies beyond ``capacity`` (§5.2.6 driver rule)."""
        if nbytes % SECTOR_SIZE:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"data length {nbytes} is not a multiple of 512")
        if sector > self.capacity or nbytes >> SECTOR_SHIFT > self.capacity - sector:
            raise _RequestError(
                VIRTIO_BLK_S_IOERR, f"sector {sector}+{nbytes >> SECTOR_SHIFT} > {self.capacity}"
            )
        return sector << SECTOR_SHIFT

    def _dispatch(self, rtype: int, sector: int, r: ChainReader, w: ChainWriter) -> int:
        if rtype == VIRTIO_BLK_T_IN:
            nbytes = w.remaining
            offset = self._check_range(sector, nbytes)
            try:
                _io_full(os.preadv, self.fd, w.take_views(nbytes), offset, nbytes)
            except OSError as e:
                raise _RequestError(VIRTIO_BLK_S_IOERR, f"read: {e}") from None
            self.metrics.reads += 1
            self.metrics.bytes_read += nbytes
            return nbytes
        if rtype == VIRTIO_BLK_T_OUT:
            if self.read_only:  # §5.2.6: MUST set IOERR and MUST NOT write any data
                raise _RequestError(VIRTIO_BLK_S_IOERR, "write to a read-only disk")
            nbytes = r.remaining
            offset = self._check_range(sector, nbytes)
            try:
                _io_full(os.pwritev, self.fd, r.take_views(nbytes), offset, nbytes)
            except OSError as e:
                raise _RequestError(VIRTIO_BLK_S_IOERR, f"write: {e}") from None
            self.metrics.writes += 1
            self.metrics.bytes_written += nbytes
            return 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            if not self._feature(VIRTIO_BLK_F_FLUSH):
                raise _RequestError(VIRTIO_BLK_S_UNSUPP, "FLUSH not negotiated")
            try:
                os.fdatasync(self.fd)  # completion means durable (§5.2.6, "stable" writes)
            except OSError as e:
                raise _RequestError(VIRTIO_BLK_S_IOERR, f"fdatasync: {e}") from None
            self.metrics.flushes += 1
            return 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            n = min(w.remaining, VIRTIO_BLK_ID_BYTES)
            w.write(self.serial[:n])
            self.metrics.get_ids += 1
            return n
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and self.read_only:
            # Checked before negotiation: these are write requests, and §5.2.6 wants IOERR for any write to an
            # RO disk (which never offers DISCARD/WRITE_ZEROES in the first place).
            raise _RequestError(VIRTIO_BLK_S_IOERR, "discard/write-zeroes on a read-only disk")
        if rtype == VIRTIO_BLK_T_DISCARD:
            if not self._feature(VIRTIO_BLK_F_DISCARD):
                raise _RequestError(VIRTIO_BLK_S_UNSUPP, "DISCARD not negotiated")
            self._discard_write_zeroes(r, discard=True)
            self.metrics.discards += 1
            return 0
        if rtype == VIRTIO_BLK_T_WRITE_ZEROES:
            if not self._feature(VIRTIO_BLK_F_WRITE_ZEROES):
                raise _RequestError(VIRTIO_BLK_S_UNSUPP, "WRITE_ZEROES not negotiated")
            self._discard_write_zeroes(r, discard=False)
            self.metrics.write_zeroes += 1
            return 0
        raise _RequestError(VIRTIO_BLK_S_UNSUPP, f"request type {rtype}")

    def _discard_write_zeroes(self, r: ChainReader, *, discard: bool) -> None:
        nbytes = r.remaining
        max_seg = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        if nbytes == 0 or nbytes % _DWZ_SEG.size or nbytes // _DWZ_SEG.size > max_seg:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"{nbytes} bytes of segments (max {max_seg} segments)")
        # Validate every segment before touching the image: a failed request should change nothing we can avoid.
        segs = [
            _DWZ_SEG.unpack_from(raw, i) for raw in (r.read(nbytes),) for i in range(0, nbytes, _DWZ_SEG.size)
        ]
        for sector, num, flags in segs:
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:  # §5.2.6: unknown flag -> UNSUPP
                raise _RequestError(VIRTIO_BLK_S_UNSUPP, f"unknown flags 0x{flags:x}")
            if discard and flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:  # §5.2.6: unmap on discard -> UNSUPP
                raise _RequestError(VIRTIO_BLK_S_UNSUPP, "unmap flag on discard")
            if num > max_sectors:
                raise _RequestError(VIRTIO_BLK_S_IOERR, f"{num} sectors > {max_sectors}")
            self._check_range(sector, num << SECTOR_SHIFT)
        for sector, num, flags in segs:
            offset, length = sector << SECTOR_SHIFT, num << SECTOR_SHIFT
            if length == 0:
                continue
            try:
                if discard:
                    self._punch_hole(offset, length, required=False)
                elif flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP and self._punch_hole(
                    offset, length, required=False
                ):
                    pass  # deallocated: reads return zeroes (§5.2.6 "as if the discard command had been sent")
                else:
                    self._zero_range(offset, length)
            except OSError as e:
                raise _RequestError(VIRTIO_BLK_S_IOERR, f"discard/write-zeroes: {e}") from None

    def _punch_hole(self, offset: int, length: int, *, required: bool) -> bool:
        """Deallocate; False if the filesystem cannot (discard is advisory: §5.2.6 'MAY deallocate')."""
        try:
            _libc.fallocate(self.fd, _libc.FALLOC_FL_PUNCH_HOLE | _libc.FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV) and not required:
                return False
            raise
        return True

    def _zero_range(self, offset: int, length: int) -> None:
        """Make the range read as zeroes, keeping it allocated. posix_fallocate is no fallback: it does not zero."""
        try:
            _libc.fallocate(self.fd, _libc.FALLOC_FL_ZERO_RANGE | _libc.FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV):
                raise
        end = offset + length
        while offset < end:
            n = os.pwrite(self.fd, memoryview(_ZERO_CHUNK)[: min(len(_ZERO_CHUNK), end - offset)], offset)
            if n <= 0:
                raise OSError(errno.EIO, "short write while zeroing")
            offset += n
