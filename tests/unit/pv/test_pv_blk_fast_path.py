"""virtio-blk's fast IN/OUT path must be indistinguishable from the general path (the reference).

Twin rigs (same seed, so the same guest layout; same image bytes) serve the same random requests, one through
``Block.process_request`` (fast path when the layout allows it) and one through ``Block._process_general``; the
used length, all of guest RAM, the image file and the metrics must come out identical.
"""

from __future__ import annotations

import dataclasses
import os
import random
import struct
from pathlib import Path

import pytest

from pv.blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    Block,
)
from pv.queue import SplitQueue
from pv.testing import MockSplitQueue, make_guest_memory

IMAGE_SECTORS = 64
MAIN = 1 << 20
HDR = struct.Struct("<IIQ")


class Twin:
    def __init__(self, tmp: Path, name: str, image: bytes, *, read_only: bool) -> None:
        path = tmp / f"{name}.raw"
        path.write_bytes(image)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.mem = make_guest_memory(MAIN)
        self.mock = MockSplitQueue(self.mem, 64, seed=3)
        self.q = SplitQueue(self.mem, self.mock.config())
        self.q.validate()
        self.dev = Block(self.fd, serial="twin", read_only=read_only)
        self.dev.ack_features(self.dev.device_features())
        self.last_head = -1

    def serve(self, segments: list[bytes | int], indirect: bool, general: bool) -> int:
        self.mock.reset_data()
        self.last_head = self.mock.add_chain(segments, indirect=indirect)
        chain = self.q.pop()
        assert chain is not None
        written = self.dev._process_general(chain) if general else self.dev.process_request(chain)
        self.q.add_used(chain.head_index, written)
        self.mock.read_used()
        return written

    def close(self) -> None:
        self.q.close()
        self.mem.close()
        os.close(self.fd)


def random_request(rng: random.Random) -> list[bytes | int]:
    rtype = rng.choice(
        [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] * 3 + [VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, 77]
    )
    sector = rng.choice(
        [0, 1, rng.randrange(IMAGE_SECTORS), IMAGE_SECTORS - 1, IMAGE_SECTORS, IMAGE_SECTORS + 3]
    )
    hdr = HDR.pack(rtype, rng.randrange(3), sector)
    lengths = [rng.choice([512, 1024, 4096, 100, 1]) for _ in range(rng.randrange(4))]
    if rng.random() < 0.2:  # header split over two buffers, or glued to the first data buffer
        segs: list[bytes | int] = [hdr[:8], hdr[8:]] if rng.random() < 0.5 else [hdr + bytes(512)]
    else:
        segs = [hdr]
    if rtype == VIRTIO_BLK_T_OUT:
        segs += [rng.randbytes(n) for n in lengths]
        writable: list[int] = []
    else:
        writable = lengths
    status = rng.choice(
        [1, 1, 1, 2, 0]
    )  # 2: status shares its buffer; 0: status glued to the last data buffer
    if status == 0 and writable:
        writable = [*writable[:-1], writable[-1] + 1]
    elif status:
        writable = [*writable, status]
    return segs + writable


@pytest.mark.parametrize("read_only", [False, True])
def test_fast_path_and_general_path_leave_identical_guest_memory_image_and_metrics(
    tmp_path: Path, read_only: bool
) -> None:
    image = random.Random(5).randbytes(IMAGE_SECTORS * 512)
    fast = Twin(tmp_path, "fast", image, read_only=read_only)
    ref = Twin(tmp_path, "ref", image, read_only=read_only)
    rng = random.Random(11 + read_only)
    try:
        for i in range(400):
            segments = random_request(rng)
            indirect = rng.random() < 0.3
            got = fast.serve(segments, indirect, general=False)
            want = ref.serve(segments, indirect, general=True)
            assert got == want, (i, segments)
            assert fast.mem.read(0, MAIN) == ref.mem.read(0, MAIN), (i, segments)
        assert fast.path.read_bytes() == ref.path.read_bytes()
        assert dataclasses.asdict(fast.dev.metrics) == dataclasses.asdict(ref.dev.metrics)
        m = fast.dev.metrics
        # The comparison meant something: both outcomes happened, and writes changed the image (unless RO).
        assert m.reads > 20 and m.io_errors > 20
        assert (m.writes == 0) == read_only and (fast.path.read_bytes() != image) != read_only
    finally:
        fast.close()
        ref.close()


def test_linux_request_layout_is_served_without_the_general_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Header alone in the first buffer, status alone in the last: what Linux's virtio_blk always sends."""
    image = bytes(range(256)) * (IMAGE_SECTORS * 2)
    t = Twin(tmp_path, "d", image, read_only=False)
    monkeypatch.setattr(t.dev, "_process_general", lambda chain: pytest.fail("general path used"))
    try:
        for indirect in (False, True):
            assert t.serve([HDR.pack(VIRTIO_BLK_T_IN, 0, 2), 512, 512, 1], indirect, general=False) == 1025
            bufs = t.mock.buffers(t.last_head)
            assert t.mem.read(bufs[1].addr, 512) + t.mem.read(bufs[2].addr, 512) == image[1024:2048]
            assert t.mem.read(bufs[3].addr, 1)[0] == VIRTIO_BLK_S_OK
            data = os.urandom(1024)
            assert t.serve([HDR.pack(VIRTIO_BLK_T_OUT, 0, 4), data, 1], indirect, general=False) == 1
        assert t.path.read_bytes()[2048:3072] == data
    finally:
        t.close()


def test_fast_path_hands_out_of_range_reads_to_the_general_path_which_reports_ioerr(tmp_path: Path) -> None:
    t = Twin(tmp_path, "d", bytes(IMAGE_SECTORS * 512), read_only=False)
    try:
        assert t.serve([HDR.pack(VIRTIO_BLK_T_IN, 0, IMAGE_SECTORS - 1), 1024, 1], False, general=False) == 1
        status_buf = t.mock.buffers(t.last_head)[-1]
        assert t.mem.read(status_buf.addr, 1)[0] == VIRTIO_BLK_S_IOERR
        assert t.dev.metrics.io_errors == 1 and t.dev.metrics.reads == 0
    finally:
        t.close()
