"""SplitQueue: chain parsing, one negative test per validation rule (names quote virtio 1.2 §2.7), used ring."""

from __future__ import annotations

import os

import pytest

from kvmcore.memory import GuestMemory
from pv import errors
from pv.device import QueueConfig
from pv.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    SplitQueue,
)
from pv.testing import MockSplitQueue, make_guest_memory

N, W, IND = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
HOLE = (1 << 20) + 0x1000  # inside the unbacked gap of make_guest_memory()


def cfg(mock: MockSplitQueue, **kw: int) -> QueueConfig:
    c = mock.config()
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def raw_chain(mock: MockSplitQueue, descs: list[tuple[int, int, int, int]], head: int = 0) -> None:
    """Write descriptors 0..n-1 verbatim and publish ``head``."""
    for i, d in enumerate(descs):
        mock.write_desc(i, *d)
    mock.publish(head)


# ----------------------------------------------------------------------------- happy paths
def test_pop_returns_none_when_driver_published_nothing(queue: SplitQueue) -> None:
    assert queue.pop() is None


def test_pop_direct_chain_yields_descriptors_in_order(mock: MockSplitQueue, queue: SplitQueue) -> None:
    head = mock.add_chain([b"hello", b"world!", 7, 9])
    chain = queue.pop()
    assert chain is not None and chain.head_index == head
    bufs = mock.buffers(head)
    assert [(d.addr, d.len, d.writable) for d in chain] == [(b.addr, b.len, b.writable) for b in bufs]
    assert chain.readable_len == 11 and chain.writable_len == 16
    assert [bytes(v) for v in chain.readable_views()] == [b"hello", b"world!"]
    assert [len(v) for v in chain.writable_views()] == [7, 9]
    assert queue.pop() is None


def test_pop_indirect_chain_yields_table_descriptors(mock: MockSplitQueue, queue: SplitQueue) -> None:
    head = mock.add_chain([b"abc", 4, 5], indirect=True)
    chain = queue.pop()
    assert chain is not None and chain.head_index == head
    assert [(d.len, d.writable) for d in chain] == [(3, False), (4, True), (5, True)]


def test_direct_descriptors_followed_by_one_indirect_are_accepted(
    mock: MockSplitQueue, queue: SplitQueue
) -> None:
    """§2.7.5.3.2: The device MUST handle the case of zero or more normal chained descriptors followed by a
    single descriptor with flags&VIRTQ_DESC_F_INDIRECT."""
    hdr = mock.alloc(8)
    mock.mem.write(hdr, b"HEADER!!")
    table = mock.alloc(32, 16)
    data = mock.alloc(16)
    mock.write_desc(0, data, 16, W, 0, table=table)
    mock.write_desc(0, hdr, 8, N, 3)
    mock.write_desc(3, table, 16, IND)
    mock.publish(0)
    chain = queue.pop()
    assert chain is not None
    assert [(d.addr, d.len, d.writable) for d in chain] == [(hdr, 8, False), (data, 16, True)]


def test_write_flag_of_the_descriptor_pointing_at_an_indirect_table_is_ignored(
    mock: MockSplitQueue, queue: SplitQueue
) -> None:
    """§2.7.5.3.2: The device MUST ignore the write-only flag in the descriptor that refers to an indirect table."""
    table = mock.alloc(16, 16)
    buf = mock.alloc(4)
    mock.write_desc(0, buf, 4, 0, 0, table=table)  # readable
    raw_chain(mock, [(table, 16, IND | W, 0)])
    chain = queue.pop()
    assert chain is not None and [d.writable for d in chain] == [False]


def test_indirect_table_is_snapshotted_so_later_driver_writes_do_not_change_the_chain(
    mock: MockSplitQueue, queue: SplitQueue
) -> None:
    table = mock.alloc(16, 16)
    mock.write_desc(0, 0x2000, 4, W, 0, table=table)
    raw_chain(mock, [(table, 16, IND, 0)])
    chain = queue.pop()
    mock.write_desc(0, HOLE, 4, W, 0, table=table)  # TOCTOU attempt
    assert chain is not None and chain.descriptors[0].addr == 0x2000


def test_zero_length_descriptor_is_accepted_and_omitted_from_views(
    mock: MockSplitQueue, queue: SplitQueue
) -> None:
    raw_chain(mock, [(HOLE, 0, N, 1), (0x2000, 8, W, 0)])
    chain = queue.pop()
    assert chain is not None and len(chain) == 2
    assert [len(v) for v in chain.writable_views()] == [8]
    assert chain.readable_views() == []


def test_add_used_writes_element_then_idx(mock: MockSplitQueue, queue: SplitQueue) -> None:
    h1 = mock.add_chain([4])
    h2 = mock.add_chain([4])
    c1, c2 = queue.pop(), queue.pop()
    assert c1 is not None and c2 is not None
    queue.add_used(c2.head_index, 3)
    queue.add_used(c1.head_index, 4)
    assert mock.read_used() == [(h2, 3), (h1, 4)]
    assert mock.used_idx() == 2


def test_add_used_rejects_a_head_outside_the_queue_as_a_device_bug(queue: SplitQueue) -> None:
    with pytest.raises(ValueError):
        queue.add_used(16, 0)


def test_indices_wrap_at_2_16(mock: MockSplitQueue, mem: GuestMemory) -> None:
    """§2.7.13.3: idx always increments, and wraps naturally at 65536."""
    mock.set_avail_idx(0xFFFE)
    mock.set_used_idx(0xFFFE)
    q = SplitQueue(mem, mock.config())
    q.validate()
    q.set_position(0xFFFE, 0xFFFE)
    heads = [mock.add_chain([4]) for _ in range(4)]
    got = []
    while (c := q.pop()) is not None:
        got.append(c.head_index)
        q.add_used(c.head_index, 1)
    assert got == heads
    assert q.next_avail == 2 and mock.used_idx() == 2
    assert [h for h, _ in mock.read_used()] == heads
    q.close()


def test_reader_and_writer_cursors_span_descriptors(mock: MockSplitQueue, queue: SplitQueue) -> None:
    mock.add_chain([b"0123", b"456789", 3, 2, 5])
    chain = queue.pop()
    assert chain is not None
    r = chain.reader()
    assert r.read(6) == b"012345"
    assert [bytes(v) for v in r.take_views(4)] == [b"6789"]
    assert r.remaining == 0
    w = chain.writer()
    tail = w.split_tail_writer(6)  # last 6 bytes: 1 of the 2-byte buffer + the 5-byte one
    assert w.remaining == 4 and tail.remaining == 6
    w.write(b"abcd")
    tail.write(b"TUVWXY")
    bufs = [mock.read_buffer(b) for b in mock.buffers(chain.head_index)[2:]]
    assert bufs == [b"abc", b"dT", b"UVWXY"]
    with pytest.raises(ValueError):
        w.take_views(1)


def test_undo_pop_gives_the_chain_back(mock: MockSplitQueue, queue: SplitQueue) -> None:
    head = mock.add_chain([4])
    c = queue.pop()
    queue.undo_pop()
    c2 = queue.pop()
    assert c is not None and c2 is not None and c2.head_index == head


# ----------------------------------------------------------------------------- is_valid (§2.7)
@pytest.mark.parametrize("size", [0, 3, 12, 65536, 32768 * 2])
def test_queue_size_must_be_a_power_of_2_at_most_32768(
    mem: GuestMemory, mock: MockSplitQueue, size: int
) -> None:
    """§2.7: Queue Size value is always a power of 2. The maximum Queue Size value is 32768."""
    assert not SplitQueue(mem, cfg(mock, size=size)).is_valid()


def test_queue_size_32768_is_valid() -> None:
    with make_guest_memory(2 << 20) as mem:
        m = MockSplitQueue(mem, 32768, max_gap=0)
        q = SplitQueue(mem, m.config())
        q.validate()
        assert q.is_valid()
        q.close()


@pytest.mark.parametrize(
    "part,misalign",
    [("desc_table", 8), ("desc_table", 1), ("avail_ring", 1), ("used_ring", 2), ("used_ring", 1)],
)
def test_driver_must_align_each_virtqueue_part(
    mem: GuestMemory, mock: MockSplitQueue, part: str, misalign: int
) -> None:
    """§2.7.1: The driver MUST ensure that the physical address of the first byte of each virtqueue part is a
    multiple of the specified alignment value (desc 16, avail 2, used 4)."""
    q = SplitQueue(mem, cfg(mock, **{part: getattr(mock, part) + misalign}))
    with pytest.raises(errors.InvalidQueueConfig, match="aligned"):
        q.validate()
    assert not q.is_valid()


@pytest.mark.parametrize("part", ["desc_table", "avail_ring", "used_ring"])
def test_ring_in_unbacked_gpa_is_invalid(mem: GuestMemory, mock: MockSplitQueue, part: str) -> None:
    assert not SplitQueue(mem, cfg(mock, **{part: HOLE})).is_valid()


@pytest.mark.parametrize("part", ["desc_table", "avail_ring", "used_ring"])
def test_ring_straddling_the_end_of_guest_ram_is_invalid(
    mem: GuestMemory, mock: MockSplitQueue, part: str
) -> None:
    assert not SplitQueue(mem, cfg(mock, **{part: (1 << 20) - 16})).is_valid()


def test_aligned_rings_inside_ram_are_valid(mem: GuestMemory, mock: MockSplitQueue) -> None:
    assert SplitQueue(mem, mock.config()).is_valid()


# ----------------------------------------------------------------------------- pop: one test per rule
def test_avail_idx_more_than_queue_size_ahead_is_driver_made_the_ring_overflow(
    mock: MockSplitQueue, queue: SplitQueue
) -> None:
    """§2.7.13: the available ring cannot hold more than Queue Size heads, so idx can't run further ahead."""
    mock.set_avail_idx(17)
    with pytest.raises(errors.AvailRingOverflow):
        queue.pop()


def test_avail_idx_exactly_queue_size_ahead_is_a_full_ring_not_an_error(
    mock: MockSplitQueue, queue: SplitQueue
) -> None:
    for _ in range(16):
        mock.add_chain([1])
    assert sum(1 for _ in iter(queue.pop, None)) == 16


def test_driver_must_not_decrement_avail_idx(mock: MockSplitQueue, queue: SplitQueue) -> None:
    """§2.7.6.1: A driver MUST NOT decrement the available idx (seen as a jump of ~65535 ahead)."""
    mock.add_chain([1])
    assert queue.pop() is not None
    mock.set_avail_idx(0)
    with pytest.raises(errors.AvailRingOverflow):
        queue.pop()


def test_chain_head_must_be_a_descriptor_index_below_queue_size(
    mock: MockSplitQueue, queue: SplitQueue
) -> None:
    """§2.7.5: The number of descriptors in the table is defined by the queue size for this virtqueue."""
    mock.publish(16)
    with pytest.raises(errors.DescriptorIndexOutOfRange):
        queue.pop()


def test_next_field_must_be_a_descriptor_index_below_queue_size(
    mock: MockSplitQueue, queue: SplitQueue
) -> None:
    raw_chain(mock, [(0x2000, 4, N, 16)])
    with pytest.raises(errors.DescriptorIndexOutOfRange):
        queue.pop()


def test_next_field_in_an_indirect_table_must_be_below_the_table_entries(
    mock: MockSplitQueue, queue: SplitQueue
) -> None:
    table = mock.alloc(32, 16)
    mock.write_desc(0, 0x2000, 4, N, 2, table=table)  # table has 2 entries
    raw_chain(mock, [(table, 32, IND, 0)])
    with pytest.raises(errors.DescriptorIndexOutOfRange):
        queue.pop()


@pytest.mark.parametrize(
    "addr,length",
    [
        (HOLE, 16),  # unbacked
        ((1 << 20) - 8, 16),  # straddles the end of a region
        ((1 << 64) - 8, 16),  # wraps the 64-bit address space
        (3 << 20, 1),  # beyond all RAM
    ],
)
def test_buffer_must_be_inside_guest_ram(
    mock: MockSplitQueue, queue: SplitQueue, addr: int, length: int
) -> None:
    """§2.7.5: addr is a guest-physical address: the whole buffer must be RAM the device can access."""
    raw_chain(mock, [(0x2000, 4, N, 1), (addr, length, W, 0)])
    with pytest.raises(errors.InvalidDescriptorRange):
        queue.pop()


def test_indirect_table_must_be_inside_guest_ram(mock: MockSplitQueue, queue: SplitQueue) -> None:
    raw_chain(mock, [(HOLE, 32, IND, 0)])
    with pytest.raises(errors.InvalidDescriptorRange):
        queue.pop()


def test_driver_must_not_create_a_chain_longer_than_queue_size_loop(
    mock: MockSplitQueue, queue: SplitQueue
) -> None:
    """§2.7.5.3.1: A driver MUST NOT create a descriptor chain longer than the Queue Size (so loops are caught)."""
    raw_chain(mock, [(0x2000, 4, N, 1), (0x2000, 4, N, 0)])
    with pytest.raises(errors.ChainTooLong):
        queue.pop()


def test_driver_must_not_create_a_chain_longer_than_queue_size_self_loop(
    mock: MockSplitQueue, queue: SplitQueue
) -> None:
    raw_chain(mock, [(0x2000, 4, N, 0)])
    with pytest.raises(errors.ChainTooLong):
        queue.pop()


def test_chain_of_exactly_queue_size_descriptors_is_accepted(mock: MockSplitQueue, queue: SplitQueue) -> None:
    raw_chain(mock, [(0x2000, 4, N, i + 1) for i in range(15)] + [(0x2000, 4, 0, 0)])
    chain = queue.pop()
    assert chain is not None and len(chain) == 16


def test_loop_inside_an_indirect_table_is_rejected(mock: MockSplitQueue, queue: SplitQueue) -> None:
    table = mock.alloc(32, 16)
    mock.write_desc(0, 0x2000, 4, N, 1, table=table)
    mock.write_desc(1, 0x2000, 4, N, 0, table=table)
    raw_chain(mock, [(table, 32, IND, 0)])
    with pytest.raises(errors.ChainTooLong):
        queue.pop()


def test_driver_must_not_add_a_chain_longer_than_2_32_bytes_in_total() -> None:
    """§2.7.5.2: Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total."""
    with make_guest_memory(16 << 20) as mem:
        mock = MockSplitQueue(mem, 512, base=0, max_gap=0)
        q = SplitQueue(mem, mock.config())
        q.validate()
        big = 16 << 20  # every descriptor covers all of RAM: 257 of them exceed 2**32 bytes
        raw_chain(mock, [(0, big, N, i + 1) for i in range(256)] + [(0, big, 0, 0)])
        with pytest.raises(errors.ChainLengthOverflow):
            q.pop()
        q.close()


def test_chain_of_exactly_2_32_bytes_is_accepted() -> None:
    with make_guest_memory(16 << 20) as mem:
        mock = MockSplitQueue(mem, 512, base=0, max_gap=0)
        q = SplitQueue(mem, mock.config())
        q.validate()
        big = 16 << 20
        raw_chain(mock, [(0, big, N, i + 1) for i in range(255)] + [(0, big, 0, 0)])
        chain = q.pop()
        assert chain is not None and chain.readable_len == 1 << 32
        q.close()


def test_driver_must_not_set_indirect_unless_indirect_desc_was_negotiated(
    mem: GuestMemory, mock: MockSplitQueue
) -> None:
    """§2.7.5.3.1: The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag unless the VIRTIO_F_INDIRECT_DESC
    feature was negotiated."""
    q = SplitQueue(mem, mock.config(), indirect=False)
    q.validate()
    mock.add_chain([4], indirect=True)
    with pytest.raises(errors.IndirectNotNegotiated):
        q.pop()
    q.close()


def test_driver_must_not_set_indirect_within_an_indirect_descriptor(
    mock: MockSplitQueue, queue: SplitQueue
) -> None:
    """§2.7.5.3.1: The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag within an indirect descriptor."""
    inner = mock.alloc(16, 16)
    mock.write_desc(0, 0x2000, 4, 0, 0, table=inner)
    table = mock.alloc(16, 16)
    mock.write_desc(0, inner, 16, IND, 0, table=table)
    raw_chain(mock, [(table, 16, IND, 0)])
    with pytest.raises(errors.NestedIndirect):
        queue.pop()


def test_driver_must_not_set_both_indirect_and_next(mock: MockSplitQueue, queue: SplitQueue) -> None:
    """§2.7.5.3.1: A driver MUST NOT set both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT in flags."""
    table = mock.alloc(16, 16)
    mock.write_desc(0, 0x2000, 4, 0, 0, table=table)
    raw_chain(mock, [(table, 16, IND | N, 1), (0x2000, 4, 0, 0)])
    with pytest.raises(errors.IndirectWithNext):
        queue.pop()


@pytest.mark.parametrize("length", [0, 8, 17, 16 * 17])
def test_indirect_table_length_must_be_a_nonzero_multiple_of_16_and_at_most_queue_size_entries(
    mock: MockSplitQueue, queue: SplitQueue, length: int
) -> None:
    """§2.7.5.3: desc[len / 16]; §2.7.5.3.1: no chain longer than the Queue Size (16 here)."""
    table = mock.alloc(max(length, 16), 16)
    raw_chain(mock, [(table, length, IND, 0)])
    with pytest.raises(errors.InvalidIndirectLength):
        queue.pop()


def test_driver_must_place_device_writable_descriptors_after_device_readable_ones(
    mock: MockSplitQueue, queue: SplitQueue
) -> None:
    """§2.7.4.2: The driver MUST place any device-writable descriptor elements after any device-readable
    descriptor elements."""
    raw_chain(mock, [(0x2000, 4, W | N, 1), (0x2000, 4, 0, 0)])
    with pytest.raises(errors.ReadableAfterWritable):
        queue.pop()


def test_readable_after_writable_is_rejected_across_the_indirect_boundary(
    mock: MockSplitQueue, queue: SplitQueue
) -> None:
    table = mock.alloc(16, 16)
    mock.write_desc(0, 0x2000, 4, 0, 0, table=table)  # readable inside the table
    raw_chain(mock, [(0x2000, 4, W | N, 1), (table, 16, IND, 0)])
    with pytest.raises(errors.ReadableAfterWritable):
        queue.pop()


def test_every_queue_error_is_a_virtqueue_error_with_a_spec_rule() -> None:
    classes = [
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.VirtqueueError)
    ]
    assert len(classes) >= 12
    for c in classes:
        if c is not errors.VirtqueueError:
            assert c.rule.startswith("§2.7"), c
            assert c.__doc__


# ----------------------------------------------------------------------------- notifications
def test_without_event_idx_notify_unless_driver_set_no_interrupt(
    mock: MockSplitQueue, queue: SplitQueue
) -> None:
    """§2.7.7.2: If flags is 1, the device SHOULD NOT send a notification; if 0, it MUST."""
    mock.add_chain([1])
    mock.add_chain([1])
    c = queue.pop()
    assert c is not None
    queue.add_used(c.head_index, 1)
    assert queue.needs_notification()
    mock.set_avail_flags(1)
    c = queue.pop()
    assert c is not None
    queue.add_used(c.head_index, 1)
    assert not queue.needs_notification()


def test_no_notification_when_nothing_was_used(queue: SplitQueue) -> None:
    assert not queue.needs_notification()


def _event_queue(mem: GuestMemory, start: int) -> tuple[MockSplitQueue, SplitQueue]:
    mock = MockSplitQueue(mem, 16, event_idx=True, seed=3)
    q = SplitQueue(mem, mock.config())
    q.validate()
    q.set_position(0, start)  # as if the device had last checked for notifications at `start`
    return mock, q


@pytest.mark.parametrize(
    "start,added,used_event,expected",
    [
        (0, 1, 0, True),  # §2.7.7.2 note: used_event 0 -> notify after the first buffer
        (1, 1, 0, False),  # ... and not again until the 65536th
        (0, 3, 5, False),
        (0, 6, 5, True),  # entry 5 written
        (5, 1, 5, True),
        (6, 3, 5, False),
        (0xFFFE, 2, 0xFFFF, True),  # wraparound: entries 0xFFFE, 0xFFFF written
        (0xFFFE, 2, 0, False),  # entry 0 not yet written
        (0xFFFE, 3, 0, True),
        (0xFFF0, 0x20, 0x0005, True),
    ],
)
def test_event_idx_notify_iff_an_entry_at_used_event_was_written(
    mem: GuestMemory, start: int, added: int, used_event: int, expected: bool
) -> None:
    """§2.7.7.2: If the idx field in the used ring (which determined where that descriptor index was placed) was
    equal to used_event, the device MUST send a notification; otherwise it SHOULD NOT."""
    mock, q = _event_queue(mem, start)
    mock.set_used_event(used_event)
    mock.set_avail_flags(1)  # §2.7.7.2: with EVENT_IDX the device MUST ignore the lower bit of flags
    for _ in range(added):
        q.add_used(0, 0)
    assert q.needs_notification() is expected
    q.close()


def test_event_idx_more_than_65535_entries_since_last_check_always_notifies(mem: GuestMemory) -> None:
    mock, q = _event_queue(mem, 0)
    mock.set_used_event(0x7777)
    for _ in range(0x10000):
        q.add_used(0, 0)
    assert q.needs_notification()
    q.close()


def test_signal_used_writes_the_call_eventfd_only_when_needed(mem: GuestMemory, eventfd: int) -> None:
    mock = MockSplitQueue(mem, 16, call_fd=eventfd, event_idx=True)
    q = SplitQueue(mem, mock.config())
    q.validate()
    mock.set_used_event(1)
    q.add_used(0, 0)
    assert not q.signal_used()
    with pytest.raises(BlockingIOError):
        os.eventfd_read(eventfd)
    q.add_used(0, 0)
    assert q.signal_used()
    assert os.eventfd_read(eventfd) == 1
    q.close()


def test_set_avail_event_publishes_next_avail(mem: GuestMemory) -> None:
    """§2.7.10: the device MAY use avail_event to ask for a kick when the driver writes that ring entry."""
    mock = MockSplitQueue(mem, 16, event_idx=True)
    q = SplitQueue(mem, mock.config())
    q.validate()
    for _ in range(3):
        mock.add_chain([1])
    while q.pop() is not None:
        pass
    q.set_avail_event()
    assert mock.avail_event() == 3
    q.close()


def test_enable_notification_rechecks_avail_idx_to_close_the_race(mem: GuestMemory) -> None:
    """§2.7.10: a chain published after the last pop but before avail_event was stored must not be missed."""
    mock = MockSplitQueue(mem, 16, event_idx=True)
    q = SplitQueue(mem, mock.config())
    q.validate()
    mock.add_chain([1])
    assert q.pop() is not None and q.pop() is None
    mock.add_chain([1])  # published, no kick yet seen
    assert q.enable_notification() is True
    assert q.pop() is not None
    assert q.enable_notification() is False
    q.close()


def test_without_event_idx_disable_notification_sets_used_flags_no_notify(
    mock: MockSplitQueue, queue: SplitQueue
) -> None:
    """§2.7.10.2: without EVENT_IDX the device MAY set flags to 1 to advise the driver not to notify."""
    queue.disable_notification()
    assert mock.used_flags() == VIRTQ_USED_F_NO_NOTIFY
    assert queue.enable_notification() is False
    assert mock.used_flags() == 0


def test_with_event_idx_device_keeps_used_flags_zero(mem: GuestMemory) -> None:
    """§2.7.10.2: with EVENT_IDX the device MUST set flags to 0."""
    mock = MockSplitQueue(mem, 16, event_idx=True)
    q = SplitQueue(mem, mock.config())
    q.validate()
    q.disable_notification()
    q.enable_notification()
    assert mock.used_flags() == 0
    q.close()


def test_pop_never_writes_guest_memory(mock: MockSplitQueue, queue: SplitQueue, mem: GuestMemory) -> None:
    mock.add_chain([b"abc", 5])
    mock.add_chain([b"x", 1], indirect=True)
    before = mem.read(0, 1 << 20)
    while queue.pop() is not None:
        pass
    assert mem.read(0, 1 << 20) == before


def test_using_a_queue_before_validate_is_a_device_bug(mem: GuestMemory, mock: MockSplitQueue) -> None:
    q = SplitQueue(mem, mock.config())
    with pytest.raises(RuntimeError):
        q.pop()
    q.validate()
    q.close()
    with pytest.raises(RuntimeError):
        q.add_used(0, 0)
