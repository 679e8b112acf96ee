"""Property tests: arbitrary (hostile) rings never make the queue or the backends raise anything but pv.errors,
never yield a buffer outside guest RAM, and never make the queue write outside the used ring."""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmcore.memory import GuestMemory
from pv.blk import Block
from pv.device import QueueConfig
from pv.errors import VirtqueueError
from pv.queue import MAX_CHAIN_BYTES, SplitQueue, used_ring_size
from pv.rng import Rng
from pv.testing import make_guest_memory

MAIN = 1 << 18  # 256 KiB of RAM, then a 1 MiB hole, then a 64 KiB guard region
DESC, AVAIL, USED = 0x1000, 0x3000, 0x4000
TABLES = (0x8000, 0x9000, MAIN - 32)  # where hostile indirect tables are planted
_DESC = struct.Struct("<QIHH")


@st.composite
def mostly(
    draw: st.DrawFn, ok: st.SearchStrategy[int], hostile: st.SearchStrategy[int], pct: int = 15
) -> int:
    """``ok`` most of the time (so chains get deep enough to reach later rules), ``hostile`` ``pct``% of it."""
    return draw(hostile) if draw(st.integers(0, 99)) < pct else draw(ok)


addrs = mostly(
    st.one_of(st.integers(0, MAIN - 4096), st.sampled_from(TABLES)),
    st.one_of(
        st.sampled_from(
            [0, DESC, AVAIL, USED, MAIN - 1, MAIN, MAIN + (1 << 20), (1 << 64) - 1, (1 << 64) - 16]
        ),
        st.integers(0, (1 << 64) - 1),
    ),
)
lens = mostly(
    st.one_of(st.integers(0, 4096), st.sampled_from([16, 32, 48])),
    st.one_of(st.sampled_from([0, 1, 15, 17, 513, MAIN, (1 << 32) - 1]), st.integers(0, (1 << 32) - 1)),
)
flags = mostly(st.integers(0, 7), st.integers(0, 0xFFFF), pct=5)


@st.composite
def descriptor(draw: st.DrawFn, size: int) -> tuple[int, int, int, int]:
    nxt = draw(mostly(st.integers(0, size - 1), st.integers(0, 0xFFFF), pct=5))
    return draw(addrs), draw(lens), draw(flags), nxt


@dataclass
class Ring:
    size: int
    descs: list[tuple[int, int, int, int]]
    tables: list[list[tuple[int, int, int, int]]]
    avail_entries: list[int]
    avail_idx: int
    start: int
    used_event: int
    avail_flags: int
    event_idx: bool
    indirect: bool
    written: list[int]


@st.composite
def rings(draw: st.DrawFn) -> Ring:
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    start = draw(st.one_of(st.just(0), st.integers(0, 0xFFFF)))
    ahead = draw(mostly(st.integers(0, size), st.integers(0, 0xFFFF), pct=5))
    return Ring(
        size=size,
        descs=draw(st.lists(descriptor(size), min_size=size, max_size=size)),
        tables=[draw(st.lists(descriptor(2), min_size=2, max_size=2)) for _ in TABLES],
        avail_entries=draw(
            st.lists(
                mostly(st.integers(0, size - 1), st.integers(0, 0xFFFF), pct=5), min_size=size, max_size=size
            )
        ),
        avail_idx=(start + ahead) & 0xFFFF,
        start=start,
        used_event=draw(st.integers(0, 0xFFFF)),
        avail_flags=draw(st.integers(0, 0xFFFF)),
        event_idx=draw(st.booleans()),
        indirect=draw(st.booleans()),
        written=draw(st.lists(st.integers(0, (1 << 32) - 1), min_size=size, max_size=size)),
    )


def lay_out(mem: GuestMemory, r: Ring) -> QueueConfig:
    mem.fill(0, MAIN, 0)
    for i, d in enumerate(r.descs):
        mem.pack_into(_DESC, DESC + 16 * i, *d)
    for base, table in zip(TABLES, r.tables, strict=True):
        for i, d in enumerate(table):
            mem.pack_into(_DESC, base + 16 * i, *d)
    mem.write(AVAIL, struct.pack("<HH", r.avail_flags, r.avail_idx))
    for i, h in enumerate(r.avail_entries):
        mem.write(AVAIL + 4 + 2 * i, struct.pack("<H", h))
    mem.write(AVAIL + 4 + 2 * r.size, struct.pack("<H", r.used_event))
    mem.write(USED + 2, struct.pack("<H", r.start))
    return QueueConfig(0, r.size, DESC, AVAIL, USED, -1, -1, r.event_idx)


@pytest.fixture(scope="module")
def pmem() -> Iterator[GuestMemory]:
    m = make_guest_memory(MAIN)
    yield m
    m.close()


@pytest.fixture(scope="module")
def image_fd() -> Iterator[int]:
    with tempfile.TemporaryFile() as f:
        f.truncate(64 * 1024)
        yield os.dup(f.fileno())


def drain(q: SplitQueue, r: Ring, serve: object = None) -> int:
    """Pop until empty or a guest error; check every chain; returns chains served."""
    mem = q.mem
    served = 0
    try:
        for n in range(2 * r.size + 2):
            chain = q.pop()
            if chain is None:
                break
            seen_writable = False
            total = 0
            for d in chain:
                assert d.len == 0 or mem.check_range(d.addr, d.len), d
                assert not (seen_writable and not d.writable)
                seen_writable |= d.writable
                total += d.len
            assert total <= MAX_CHAIN_BYTES
            assert len(chain) <= 2 * r.size
            assert sum(map(len, chain.readable_views())) == chain.readable_len
            assert sum(map(len, chain.writable_views())) == chain.writable_len
            written = serve(chain) if serve is not None else r.written[n % r.size] % (chain.writable_len + 1)  # type: ignore[operator]
            assert 0 <= written <= chain.writable_len
            q.add_used(chain.head_index, written)
            served += 1
        q.needs_notification()
        q.enable_notification()
    except VirtqueueError:
        pass
    return served


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(r=rings())
def test_arbitrary_rings_raise_only_pv_errors_and_write_only_the_used_ring(
    pmem: GuestMemory, r: Ring
) -> None:
    cfg = lay_out(pmem, r)
    before = pmem.read(0, MAIN)
    q = SplitQueue(pmem, cfg, indirect=r.indirect)
    q.set_position(r.start, r.start)
    try:
        q.validate()
        drain(q, r)
    finally:
        q.close()
    after = pmem.read(0, MAIN)
    used_end = USED + used_ring_size(r.size)
    assert before[:USED] == after[:USED]
    assert before[used_end:] == after[used_end:]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(r=rings(), rtype=st.sampled_from([0, 1, 4, 8, 10, 11, 13, 14, 0xFFFFFFFF]), sector=st.integers(0, 200))
def test_block_and_rng_never_raise_on_arbitrary_chains(
    pmem: GuestMemory, image_fd: int, r: Ring, rtype: int, sector: int
) -> None:
    blk = Block(image_fd, serial="fuzz")
    blk.ack_features(blk.device_features())
    rng = Rng(max_bytes_per_request=4096)
    for dev in (blk, rng):
        cfg = lay_out(pmem, r)
        # Buffers that start at a planted address begin with a plausible request header.
        for base in TABLES[:2]:
            pmem.write(base + 32, struct.pack("<IIQ", rtype, 0, sector))
        q = SplitQueue(pmem, cfg, indirect=r.indirect)
        q.set_position(r.start, r.start)
        try:
            q.validate()
            drain(q, r, dev.process_request)
        finally:
            q.close()
