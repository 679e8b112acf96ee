"""virtio-blk requests against a temporary raw image (virtio 1.2 §5.2)."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmcore.memory import GuestMemory
from pv import _libc, blk
from pv.blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_GET_LIFETIME,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    Block,
)
from pv.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK
from pv.queue import SplitQueue
from pv.testing import POISON, MockSplitQueue, make_guest_memory

IMAGE_SECTORS = 256  # 128 KiB
HDR = struct.Struct("<IIQ")
SEG = struct.Struct("<QII")


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


@pytest.fixture
def image(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "disk.raw"
    path.write_bytes(pattern(IMAGE_SECTORS * 512))
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    yield fd
    os.close(fd)


def make_block(fd: int, **kw: object) -> Block:
    dev = Block(fd, serial="kvmdm-serial-0001", **kw)  # type: ignore[arg-type]
    dev.ack_features(dev.device_features())
    return dev


@pytest.fixture
def dev(image: int) -> Block:
    return make_block(image)


class Rig:
    """A driver (MockSplitQueue) + device queue; submit() runs one request synchronously."""

    def __init__(self, mem: GuestMemory, dev: Block, size: int = 64) -> None:
        self.mock = MockSplitQueue(mem, size, seed=7)
        self.q = SplitQueue(mem, self.mock.config())
        self.q.validate()
        self.dev = dev

    def submit(self, segments: list[bytes | int], *, indirect: bool = False) -> tuple[int, int]:
        """Returns (used len, status byte)."""
        head = self.mock.add_chain(segments, indirect=indirect)
        chain = self.q.pop()
        assert chain is not None and chain.head_index == head
        written = self.dev.process_request(chain)
        self.q.add_used(chain.head_index, written)
        [(h, used_len)] = self.mock.read_used()
        assert h == head
        w = [b for b in self.mock.buffers(head) if b.writable]
        status = self.mock.mem.read(w[-1].addr + w[-1].len - 1, 1)[0] if w else -1
        self.last_head = head
        return used_len, status

    def writable_data(self) -> bytes:
        w = [b for b in self.mock.buffers(self.last_head) if b.writable]
        return b"".join(self.mock.read_buffer(b) for b in w)[:-1]


@pytest.fixture
def rig(mem: GuestMemory, dev: Block) -> Iterator[Rig]:
    r = Rig(mem, dev)
    yield r
    r.q.close()


def hdr(rtype: int, sector: int = 0) -> bytes:
    return HDR.pack(rtype, 0, sector)


def read_image(fd: int, sector: int, n: int) -> bytes:
    return os.pread(fd, n, sector * 512)


# ----------------------------------------------------------------------------- config & features
def test_features_offer_the_required_set(dev: Block) -> None:
    f = dev.device_features()
    for bit in (VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, 2, 6, 9, 12, 13, 14):
        assert f >> bit & 1, bit
    assert not f >> blk.VIRTIO_BLK_F_RO & 1
    assert dev.device_type == VIRTIO_ID_BLOCK


def test_read_only_disk_offers_ro_and_no_discard_or_write_zeroes(image: int) -> None:
    f = Block(image, read_only=True).device_features()
    assert f >> blk.VIRTIO_BLK_F_RO & 1
    assert not f >> blk.VIRTIO_BLK_F_DISCARD & 1 and not f >> blk.VIRTIO_BLK_F_WRITE_ZEROES & 1


def test_config_space_layout_is_little_endian_per_5_2_4(image: int) -> None:
    dev = Block(image, num_queues=4, queue_size=128)
    buf = bytearray(64)
    dev.read_config(0, memoryview(buf))
    assert struct.unpack_from("<Q", buf, 0)[0] == IMAGE_SECTORS  # capacity
    assert struct.unpack_from("<I", buf, 12)[0] == 126  # seg_max
    assert struct.unpack_from("<I", buf, 20)[0] == 512  # blk_size
    assert struct.unpack_from("<H", buf, 34)[0] == 4  # num_queues
    assert struct.unpack_from("<III", buf, 36) == (blk.MAX_DISCARD_SECTORS, blk.MAX_DISCARD_SEG, 8)
    assert struct.unpack_from("<II", buf, 48) == (blk.MAX_WRITE_ZEROES_SECTORS, blk.MAX_WRITE_ZEROES_SEG)
    assert buf[56] == 1  # write_zeroes_may_unmap
    assert buf[33] == 0 and buf[57:64] == bytes(7)  # unused0/unused1 zero (§5.2.5.2), beyond the end zero
    assert dev.queue_max_sizes == (128,) * 4


def test_config_partial_and_out_of_range_reads(dev: Block) -> None:
    b = bytearray(b"\xff" * 4)
    dev.read_config(1000, memoryview(b))
    assert b == bytes(4)
    b = bytearray(b"\xff" * 2)
    dev.read_config(0, memoryview(b))
    assert b == struct.pack("<H", IMAGE_SECTORS)


def test_capacity_ignores_a_partial_last_sector(tmp_path: Path) -> None:
    p = tmp_path / "odd.raw"
    p.write_bytes(bytes(1000))
    fd = os.open(p, os.O_RDONLY)
    try:
        assert Block(fd, read_only=True).capacity == 1
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "kw", [{"serial": "x" * 21}, {"queue_size": 100}, {"num_queues": 0}, {"queue_size": 1}]
)
def test_bad_host_config_fails_fast(image: int, kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Block(image, **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- IN / OUT
def test_read_scatters_into_odd_sized_buffers(rig: Rig, image: int) -> None:
    used, status = rig.submit([hdr(VIRTIO_BLK_T_IN, 3), 100, 412, 512, 1])
    assert status == VIRTIO_BLK_S_OK
    assert used == 1024 + 1  # data + status (§2.7.8: total bytes written)
    assert rig.writable_data() == read_image(image, 3, 1024)
    assert rig.dev.metrics.reads == 1 and rig.dev.metrics.bytes_read == 1024


def test_status_byte_is_the_last_writable_byte_even_inside_a_data_buffer(rig: Rig, image: int) -> None:
    used, status = rig.submit([hdr(VIRTIO_BLK_T_IN, 0), 513], indirect=True)
    assert status == VIRTIO_BLK_S_OK and used == 513
    assert rig.writable_data() == read_image(image, 0, 512)


def test_write_gathers_from_buffers(rig: Rig, image: int) -> None:
    data = pattern(1536, seed=99)
    used, status = rig.submit([hdr(VIRTIO_BLK_T_OUT, 10), data[:7], data[7:1000], data[1000:], 1])
    assert status == VIRTIO_BLK_S_OK and used == 1
    assert read_image(image, 10, 1536) == data
    assert (
        read_image(image, 9, 512) == pattern(IMAGE_SECTORS * 512)[9 * 512 : 10 * 512]
    )  # neighbours untouched


def test_header_split_across_descriptors_is_parsed(rig: Rig, image: int) -> None:
    h = hdr(VIRTIO_BLK_T_IN, 1)
    used, status = rig.submit([h[:5], h[5:], 512, 1])
    assert status == VIRTIO_BLK_S_OK and rig.writable_data() == read_image(image, 1, 512)


def test_read_of_the_last_sector_is_allowed(rig: Rig) -> None:
    _used, status = rig.submit([hdr(VIRTIO_BLK_T_IN, IMAGE_SECTORS - 1), 512, 1])
    assert status == VIRTIO_BLK_S_OK


@pytest.mark.parametrize("sector", [IMAGE_SECTORS, IMAGE_SECTORS - 1 + 1, (1 << 64) - 1, IMAGE_SECTORS + 5])
def test_read_beyond_capacity_is_ioerr_and_writes_no_data(rig: Rig, sector: int) -> None:
    """§5.2.6.1: A driver MUST NOT submit a request which would cause a read or write beyond capacity."""
    used, status = rig.submit([hdr(VIRTIO_BLK_T_IN, sector), 512, 1])
    assert status == VIRTIO_BLK_S_IOERR and used == 1
    assert rig.writable_data() == bytes([POISON]) * 512


def test_read_straddling_capacity_is_ioerr(rig: Rig) -> None:
    _used, status = rig.submit([hdr(VIRTIO_BLK_T_IN, IMAGE_SECTORS - 1), 1024, 1])
    assert status == VIRTIO_BLK_S_IOERR


def test_write_beyond_capacity_is_ioerr_and_image_unchanged(rig: Rig, image: int) -> None:
    before = read_image(image, 0, IMAGE_SECTORS * 512)
    _used, status = rig.submit([hdr(VIRTIO_BLK_T_OUT, IMAGE_SECTORS - 1), bytes(1024), 1])
    assert status == VIRTIO_BLK_S_IOERR
    assert read_image(image, 0, IMAGE_SECTORS * 512) == before
    assert os.fstat(image).st_size == IMAGE_SECTORS * 512


@pytest.mark.parametrize("rtype", [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT])
def test_data_length_must_be_a_multiple_of_512(rig: Rig, rtype: int) -> None:
    """§5.2.6.1: The length of data MUST be a multiple of 512 bytes for VIRTIO_BLK_T_IN and VIRTIO_BLK_T_OUT."""
    segs: list[bytes | int] = (
        [hdr(rtype, 0), 100, 1] if rtype == VIRTIO_BLK_T_IN else [hdr(rtype, 0), bytes(100), 1]
    )
    _used, status = rig.submit(segs)
    assert status == VIRTIO_BLK_S_IOERR


def test_short_header_is_ioerr(rig: Rig) -> None:
    used, status = rig.submit([b"\x00" * 15, 1])
    assert status == VIRTIO_BLK_S_IOERR and used == 1
    assert rig.dev.metrics.io_errors == 1


def test_chain_without_a_writable_status_byte_is_returned_with_len_0(rig: Rig) -> None:
    used, status = rig.submit([hdr(VIRTIO_BLK_T_IN, 0)])
    assert used == 0 and status == -1
    assert rig.dev.metrics.no_status == 1


def test_read_only_disk_rejects_writes_with_ioerr_and_writes_nothing(mem: GuestMemory, image: int) -> None:
    """§5.2.6.2: A device MUST set the status byte to VIRTIO_BLK_S_IOERR for a write request if the
    VIRTIO_BLK_F_RO feature if offered, and MUST NOT write any data."""
    rig = Rig(mem, make_block(image, read_only=True))
    before = read_image(image, 0, 4096)
    _used, status = rig.submit([hdr(VIRTIO_BLK_T_OUT, 0), bytes(4096), 1])
    assert status == VIRTIO_BLK_S_IOERR
    assert read_image(image, 0, 4096) == before
    for rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        _used, status = rig.submit([hdr(rtype), SEG.pack(0, 8, 0), 1])
        assert status == VIRTIO_BLK_S_IOERR
    assert read_image(image, 0, 4096) == before
    _used, status = rig.submit([hdr(VIRTIO_BLK_T_IN, 0), 512, 1])
    assert status == VIRTIO_BLK_S_OK
    rig.q.close()


def test_more_segments_than_iov_max_are_transferred(image: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blk, "_IOV_MAX", 8)
    with make_guest_memory(1 << 20) as mem:
        rig = Rig(mem, make_block(image), size=64)
        segs: list[bytes | int] = [hdr(VIRTIO_BLK_T_IN, 0)] + [512] * 20 + [1]
        used, status = rig.submit(segs, indirect=True)
        assert status == VIRTIO_BLK_S_OK and used == 20 * 512 + 1
        assert rig.writable_data() == read_image(image, 0, 20 * 512)
        rig.q.close()


def test_short_transfers_are_resumed_mid_buffer() -> None:
    calls: list[int] = []
    src = pattern(3000)

    def fake_preadv(fd: int, views: list[memoryview], offset: int) -> int:
        n = min(700, sum(len(v) for v in views))  # never more than 700 bytes per call
        calls.append(offset)
        pos, left = offset, n
        for v in views:
            k = min(len(v), left)
            v[:k] = src[pos : pos + k]
            pos += k
            left -= k
            if not left:
                break
        return n

    bufs = [bytearray(1000), bytearray(1000), bytearray(1000)]
    assert blk._io_full(fake_preadv, 0, [memoryview(b) for b in bufs], 0) == 3000
    assert b"".join(bufs) == src
    assert calls == [0, 700, 1400, 2100, 2800]


def test_unexpected_eof_is_an_error_not_a_hang() -> None:
    with pytest.raises(OSError):
        blk._io_full(lambda fd, v, off: 0, 0, [memoryview(bytearray(10))], 0)


def test_host_io_error_becomes_ioerr_status(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*_a: object) -> int:
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(os, "preadv", failing)
    _used, status = rig.submit([hdr(VIRTIO_BLK_T_IN, 0), 512, 1])
    assert status == VIRTIO_BLK_S_IOERR


# ----------------------------------------------------------------------------- FLUSH / GET_ID / unsupported
def test_flush_calls_fdatasync_on_the_image(rig: Rig, image: int, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    used, status = rig.submit([hdr(VIRTIO_BLK_T_FLUSH), 1])
    assert status == VIRTIO_BLK_S_OK and used == 1 and synced == [image]


def test_flush_failure_is_ioerr(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(fd: int) -> None:
        raise OSError(errno.EIO, "lost")

    monkeypatch.setattr(os, "fdatasync", boom)
    _used, status = rig.submit([hdr(VIRTIO_BLK_T_FLUSH), 1])
    assert status == VIRTIO_BLK_S_IOERR


def test_flush_really_syncs(rig: Rig) -> None:
    _used, status = rig.submit([hdr(VIRTIO_BLK_T_FLUSH), 1])
    assert status == VIRTIO_BLK_S_OK and rig.dev.metrics.flushes == 1


def test_get_id_returns_the_20_byte_serial(rig: Rig) -> None:
    used, status = rig.submit([hdr(VIRTIO_BLK_T_GET_ID), 20, 1])
    assert status == VIRTIO_BLK_S_OK and used == 21
    assert rig.writable_data() == b"kvmdm-serial-0001\0\0\0"


def test_get_id_with_a_20_char_serial_has_no_terminator(mem: GuestMemory, image: int) -> None:
    dev = Block(image, serial="A" * 20)
    rig = Rig(mem, dev)
    _used, status = rig.submit([hdr(VIRTIO_BLK_T_GET_ID), 21])
    assert status == VIRTIO_BLK_S_OK and rig.writable_data() == b"A" * 20
    rig.q.close()


@pytest.mark.parametrize("rtype", [VIRTIO_BLK_T_GET_LIFETIME, 14, 15, 99, 0xFFFFFFFF])
def test_unsupported_request_types_get_unsupp(rig: Rig, rtype: int) -> None:
    used, status = rig.submit([hdr(rtype), 64, 1])
    assert status == VIRTIO_BLK_S_UNSUPP and used == 1
    assert rig.writable_data() == bytes([POISON]) * 64


def test_discard_not_negotiated_is_unsupp(mem: GuestMemory, image: int) -> None:
    dev = Block(image)
    dev.ack_features(dev.device_features() & ~(1 << blk.VIRTIO_BLK_F_DISCARD))
    rig = Rig(mem, dev)
    _used, status = rig.submit([hdr(VIRTIO_BLK_T_DISCARD), SEG.pack(0, 8, 0), 1])
    assert status == VIRTIO_BLK_S_UNSUPP
    rig.q.close()


# ----------------------------------------------------------------------------- DISCARD / WRITE_ZEROES
def _fs_can_punch(fd: int) -> bool:
    try:
        _libc.fallocate(fd, _libc.FALLOC_FL_PUNCH_HOLE | _libc.FALLOC_FL_KEEP_SIZE, 0, 0)
    except OSError as e:
        return e.errno == errno.EINVAL  # len 0 -> EINVAL means the mode itself is supported
    return True


def test_write_zeroes_zeroes_the_range(rig: Rig, image: int) -> None:
    """§5.2.6.2: After a write zeroes command is completed, reads of the specified ranges MUST return zeroes."""
    used, status = rig.submit([hdr(VIRTIO_BLK_T_WRITE_ZEROES), SEG.pack(4, 3, 0) + SEG.pack(20, 1, 0), 1])
    assert status == VIRTIO_BLK_S_OK and used == 1
    assert read_image(image, 4, 3 * 512) == bytes(3 * 512)
    assert read_image(image, 20, 512) == bytes(512)
    assert read_image(image, 3, 512) == pattern(IMAGE_SECTORS * 512)[3 * 512 : 4 * 512]
    assert read_image(image, 7, 512) == pattern(IMAGE_SECTORS * 512)[7 * 512 : 8 * 512]
    assert os.fstat(image).st_size == IMAGE_SECTORS * 512


def test_write_zeroes_with_unmap_also_reads_back_zeroes(rig: Rig, image: int) -> None:
    _used, status = rig.submit([hdr(VIRTIO_BLK_T_WRITE_ZEROES), SEG.pack(8, 16, 1), 1])
    assert status == VIRTIO_BLK_S_OK
    assert read_image(image, 8, 16 * 512) == bytes(16 * 512)
    assert os.fstat(image).st_size == IMAGE_SECTORS * 512


def test_write_zeroes_falls_back_to_writing_zeroes(
    rig: Rig, image: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(*_a: object) -> None:
        raise OSError(errno.EOPNOTSUPP, "no")

    monkeypatch.setattr(_libc, "fallocate", unsupported)
    for flags in (0, 1):
        _used, status = rig.submit([hdr(VIRTIO_BLK_T_WRITE_ZEROES), SEG.pack(30 + flags * 10, 5, flags), 1])
        assert status == VIRTIO_BLK_S_OK
        assert read_image(image, 30 + flags * 10, 5 * 512) == bytes(5 * 512)


def test_discard_deallocates_when_the_filesystem_can(rig: Rig, image: int) -> None:
    _used, status = rig.submit([hdr(VIRTIO_BLK_T_DISCARD), SEG.pack(0, 64, 0), 1])
    assert status == VIRTIO_BLK_S_OK and rig.dev.metrics.discards == 1
    if _fs_can_punch(image):
        assert read_image(image, 0, 64 * 512) == bytes(64 * 512)
    assert os.fstat(image).st_size == IMAGE_SECTORS * 512


def test_discard_on_a_filesystem_without_punch_hole_still_succeeds(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """§5.2.6.2: For discard commands, the device MAY deallocate the specified range (advisory)."""

    def unsupported(*_a: object) -> None:
        raise OSError(errno.EOPNOTSUPP, "no")

    monkeypatch.setattr(_libc, "fallocate", unsupported)
    _used, status = rig.submit([hdr(VIRTIO_BLK_T_DISCARD), SEG.pack(0, 8, 0), 1])
    assert status == VIRTIO_BLK_S_OK


def test_device_must_set_unsupp_for_discard_with_unmap(rig: Rig) -> None:
    """§5.2.6.2: the device MUST set the status byte to VIRTIO_BLK_S_UNSUPP for discard commands if the unmap
    flag is set."""
    _used, status = rig.submit([hdr(VIRTIO_BLK_T_DISCARD), SEG.pack(0, 8, 1), 1])
    assert status == VIRTIO_BLK_S_UNSUPP


@pytest.mark.parametrize("rtype", [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES])
def test_device_must_set_unsupp_if_any_unknown_flag_is_set(rig: Rig, image: int, rtype: int) -> None:
    """§5.2.6.2: The device MUST set the status byte to VIRTIO_BLK_S_UNSUPP for discard, secure erase and write
    zeroes commands if any unknown flag is set."""
    before = read_image(image, 0, 8 * 512)
    _used, status = rig.submit([hdr(rtype), SEG.pack(0, 8, 2), 1])
    assert status == VIRTIO_BLK_S_UNSUPP
    assert read_image(image, 0, 8 * 512) == before


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # no segment
        bytes(15),  # not a multiple of 16 (§5.2.6.1)
        SEG.pack(IMAGE_SECTORS - 1, 2, 0),  # beyond capacity
        SEG.pack((1 << 64) - 1, 1, 0),
        SEG.pack(0, blk.MAX_WRITE_ZEROES_SECTORS + 1, 0),  # more than max_*_sectors
        SEG.pack(0, 1, 0) * (blk.MAX_WRITE_ZEROES_SEG + 1),  # more than max_*_seg (§5.2.6.1)
    ],
)
def test_malformed_write_zeroes_is_ioerr_and_image_unchanged(rig: Rig, image: int, payload: bytes) -> None:
    before = read_image(image, 0, IMAGE_SECTORS * 512)
    segs: list[bytes | int] = [hdr(VIRTIO_BLK_T_WRITE_ZEROES)] + ([payload] if payload else []) + [1]
    _used, status = rig.submit(segs)
    assert status == VIRTIO_BLK_S_IOERR
    assert read_image(image, 0, IMAGE_SECTORS * 512) == before


def test_a_bad_segment_after_a_good_one_changes_nothing(rig: Rig, image: int) -> None:
    before = read_image(image, 0, 16 * 512)
    _used, status = rig.submit(
        [hdr(VIRTIO_BLK_T_WRITE_ZEROES), SEG.pack(0, 16, 0) + SEG.pack(IMAGE_SECTORS, 1, 0), 1]
    )
    assert status == VIRTIO_BLK_S_IOERR
    assert read_image(image, 0, 16 * 512) == before
