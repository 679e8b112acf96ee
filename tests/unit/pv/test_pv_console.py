"""virtio-console (virtio 1.2 §5.3): one port, receiveq 0 / transmitq 1, driven by MockSplitQueue in real memory."""

from __future__ import annotations

import os
import select
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from kvmcore.memory import GuestMemory
from pv.console import (
    EMERG_WR_OFFSET,
    VIRTIO_CONSOLE_F_EMERG_WRITE,
    VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_F_SIZE,
    Console,
    SharedConsoleLog,
)
from pv.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_ID_CONSOLE
from pv.testing import POISON, FakeHealth, MockSplitQueue

TIMEOUT = 5.0


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            self.data += data


class BrokenSink:
    def write(self, data: bytes) -> None:
        raise OSError(28, "No space left on device")


def wait_until(pred: object, timeout: float = TIMEOUT) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.002)
    return False


def wait_call(fd: int, timeout: float = TIMEOUT) -> bool:
    r, _w, _x = select.select([fd], [], [], timeout)
    if r:
        os.eventfd_read(fd)
    return bool(r)


class Rig:
    """A console with both queues laid out by MockSplitQueue, each with its own kick and call eventfds."""

    def __init__(self, mem: GuestMemory, dev: Console, *, event_idx: bool = False, health: FakeHealth | None = None,
                 features: int | None = None) -> None:
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]
        self.rx = MockSplitQueue(mem, 16, base=0x1000, limit=0x40000, seed=2, index=0, event_idx=event_idx,
                                 kick_fd=self.fds[0], call_fd=self.fds[1])
        self.tx = MockSplitQueue(mem, 16, base=0x40000, limit=0x80000, seed=3, index=1, event_idx=event_idx,
                                 kick_fd=self.fds[2], call_fd=self.fds[3])
        self.dev = dev
        self.mem = mem
        self.health = health if health is not None else FakeHealth()
        dev.ack_features(dev.device_features() if features is None else features)

    def activate(self) -> None:
        self.dev.activate(self.mem, [self.rx.config(), self.tx.config()], self.health)

    def close(self) -> None:
        self.dev.reset()
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def rig(mem: GuestMemory, sink: Sink) -> Iterator[Rig]:
    r = Rig(mem, Console(sink))
    yield r
    r.close()


# ------------------------------------------------------------------------------------------ identity and config
def test_device_type_is_3_and_features_offer_no_multiport() -> None:
    dev = Console()
    f = dev.device_features()
    assert dev.device_type == VIRTIO_ID_CONSOLE == 3
    assert f & (1 << VIRTIO_F_VERSION_1) and f & (1 << VIRTIO_F_EVENT_IDX) and f & (1 << VIRTIO_F_INDIRECT_DESC)
    assert f & (1 << VIRTIO_CONSOLE_F_EMERG_WRITE)
    assert not f & (1 << VIRTIO_CONSOLE_F_MULTIPORT)
    assert not f & (1 << VIRTIO_CONSOLE_F_SIZE)  # no size configured
    assert dev.queue_max_sizes == (256, 256)  # §5.3.2: receiveq0, transmitq0 only


def test_config_space_has_cols_rows_and_one_port_when_size_is_set() -> None:
    dev = Console(size=(132, 43))
    assert dev.device_features() & (1 << VIRTIO_CONSOLE_F_SIZE)
    buf = bytearray(b"\xff" * 12)
    dev.read_config(0, memoryview(buf))
    assert struct.unpack("<HHII", buf) == (132, 43, 1, 0)
    two = bytearray(2)
    dev.read_config(2, memoryview(two))
    assert struct.unpack("<H", two) == (43,)


def test_config_read_out_of_range_is_zero_not_an_error() -> None:
    dev = Console(size=(80, 25))
    buf = bytearray(b"\xff" * 8)
    dev.read_config(10, memoryview(buf))  # 2 bytes of emerg_wr, then past the end
    assert buf == bytes(8)
    dev.read_config(4096, memoryview(buf))
    assert buf == bytes(8)


@pytest.mark.parametrize("kwargs", [dict(queue_size=3), dict(queue_size=65536), dict(size=(70000, 1)),
                                    dict(max_pending_input=0), dict(budget=0)])
def test_constructor_rejects_bad_host_configuration(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Console(**kwargs)  # type: ignore[arg-type]


def test_emergency_write_outputs_one_character(sink: Sink) -> None:
    dev = Console(sink)
    dev.write_config(EMERG_WR_OFFSET, struct.pack("<I", 0x41))
    assert sink.data == b"A" and dev.metrics.emerg_writes == 1


def test_writes_to_read_only_config_fields_are_ignored(sink: Sink) -> None:
    dev = Console(sink, size=(80, 25))
    dev.write_config(0, struct.pack("<H", 1))
    dev.write_config(EMERG_WR_OFFSET, b"\x41" * 3)  # not a 1/2/4-byte access
    buf = bytearray(4)
    dev.read_config(0, memoryview(buf))
    assert struct.unpack("<HH", buf) == (80, 25) and sink.data == b""


# ------------------------------------------------------------------------------------------ transmitq
@pytest.mark.parametrize("event_idx", [False, True])
def test_transmitq_bytes_reach_the_sink_in_order(mem: GuestMemory, sink: Sink, event_idx: bool) -> None:
    r = Rig(mem, Console(sink), event_idx=event_idx)
    try:
        r.activate()
        h1 = r.tx.add_chain([b"hello, ", b"world"])
        h2 = r.tx.add_chain([b"!\n"], indirect=True)
        r.tx.kick()
        assert wait_call(r.fds[3])
        assert wait_until(lambda: r.tx.used_idx() == 2)
        assert sink.data == b"hello, world!\n"
        assert r.tx.read_used() == [(h1, 0), (h2, 0)]
        assert r.dev.metrics.tx_chains == 2 and r.dev.metrics.tx_bytes == 14
    finally:
        r.close()
    assert r.health.resets == []


def test_transmitq_used_length_is_zero(rig: Rig, sink: Sink) -> None:
    rig.activate()
    head = rig.tx.add_chain([b"abc"])
    rig.tx.kick()
    assert wait_call(rig.fds[3])
    assert rig.tx.read_used() == [(head, 0)]  # §5.3.6.2: the device writes nothing into tx buffers


def test_sink_failure_is_counted_and_the_device_keeps_running(mem: GuestMemory) -> None:
    r = Rig(mem, Console(BrokenSink()))
    try:
        r.activate()
        head = r.tx.add_chain([b"lost"])
        r.tx.kick()
        assert wait_call(r.fds[3])
        assert r.tx.read_used() == [(head, 0)]
        assert r.dev.metrics.sink_errors == 1
    finally:
        r.close()
    assert r.health.resets == []


def test_more_output_than_the_budget_is_all_delivered(mem: GuestMemory, sink: Sink) -> None:
    r = Rig(mem, Console(sink, budget=2))
    try:
        r.activate()
        for i in range(10):
            r.tx.add_chain([b"%d," % i])
        r.tx.kick()
        assert wait_until(lambda: r.dev.metrics.tx_chains == 10)
        assert sink.data == b"0,1,2,3,4,5,6,7,8,9,"
    finally:
        r.close()


# ------------------------------------------------------------------------------------------ receiveq
@pytest.mark.parametrize("event_idx", [False, True])
def test_input_fills_posted_receive_buffers(mem: GuestMemory, event_idx: bool) -> None:
    r = Rig(mem, Console(), event_idx=event_idx)
    try:
        r.activate()
        head = r.rx.add_chain([8])
        r.rx.kick()
        assert r.dev.enqueue_input(b"ls -l\n") == 6
        assert wait_call(r.fds[1])
        assert r.rx.read_used() == [(head, 6)]
        buf = r.rx.buffers(head)[0]
        assert r.rx.read_buffer(buf) == b"ls -l\n" + bytes([POISON]) * 2
    finally:
        r.close()


def test_input_larger_than_one_buffer_spans_chains_in_order(rig: Rig) -> None:
    rig.activate()
    heads = [rig.rx.add_chain([4]), rig.rx.add_chain([2, 2])]
    rig.rx.kick()
    rig.dev.enqueue_input(b"abcdefgh")
    assert wait_until(lambda: rig.dev.metrics.rx_chains == 2)
    used = rig.rx.read_used()
    assert used == [(heads[0], 4), (heads[1], 4)]
    got = b"".join(rig.rx.read_buffer(b) for h in heads for b in rig.rx.buffers(h))
    assert got == b"abcdefgh"


def test_input_without_receive_buffers_is_kept_until_the_driver_posts_some(rig: Rig) -> None:
    rig.activate()
    assert rig.dev.enqueue_input(b"early") == 5
    time.sleep(0.05)
    assert rig.dev.pending_input() == 5 and rig.rx.used_idx() == 0  # nothing consumed, nothing dropped
    head = rig.rx.add_chain([16])
    rig.rx.kick()
    assert wait_call(rig.fds[1])
    assert rig.rx.read_used() == [(head, 5)]
    assert rig.dev.pending_input() == 0


def test_receive_buffers_are_not_consumed_without_input(rig: Rig) -> None:
    rig.activate()
    rig.rx.add_chain([16])
    rig.rx.kick()
    time.sleep(0.05)
    assert rig.rx.used_idx() == 0 and rig.dev.metrics.rx_chains == 0


def test_enqueue_input_applies_backpressure_when_the_buffer_is_full(mem: GuestMemory) -> None:
    dev = Console(max_pending_input=8)
    assert dev.enqueue_input(b"0123456") == 7
    assert dev.enqueue_input(b"789") == 1  # only one byte of room left
    assert dev.enqueue_input(b"x") == 0
    assert dev.pending_input() == 8 and dev.metrics.input_refused == 3
    r = Rig(mem, dev)
    try:
        r.activate()  # input buffered before DRIVER_OK is delivered once buffers exist
        head = r.rx.add_chain([32])
        r.rx.kick()
        assert wait_call(r.fds[1])
        assert r.rx.read_used() == [(head, 8)]
        assert r.rx.read_buffer(r.rx.buffers(head)[0])[:8] == b"01234567"
        assert dev.enqueue_input(b"9") == 1  # room again
    finally:
        r.close()


def test_input_survives_a_device_reset(mem: GuestMemory) -> None:
    dev = Console()
    r = Rig(mem, dev)
    try:
        r.activate()
        dev.enqueue_input(b"typed ahead")
        dev.reset()
        assert dev.pending_input() == 11
    finally:
        r.close()


# ------------------------------------------------------------------------------------------ hostile driver
def test_writable_buffer_in_transmitq_sets_needs_reset(rig: Rig, sink: Sink) -> None:
    rig.activate()
    rig.tx.add_chain([b"data", 4])
    rig.tx.kick()
    assert wait_until(lambda: rig.health.resets)
    assert "transmitq" in rig.health.resets[0] or "queue 1" in rig.health.resets[0]
    assert rig.dev.metrics.guest_errors == 1


def test_readable_buffer_in_receiveq_sets_needs_reset(rig: Rig) -> None:
    rig.activate()
    rig.rx.add_chain([b"not for the device to read", 8])
    rig.rx.kick()
    rig.dev.enqueue_input(b"x")
    assert wait_until(lambda: rig.health.resets)
    assert "queue 0" in rig.health.resets[0]
    assert rig.rx.used_idx() == 0  # the bad chain was not completed


def test_out_of_range_head_sets_needs_reset(rig: Rig) -> None:
    rig.activate()
    rig.tx.publish(16)  # head == queue size
    rig.tx.kick()
    assert wait_until(lambda: rig.health.resets)


def test_descriptor_outside_guest_memory_sets_needs_reset(rig: Rig, mem: GuestMemory) -> None:
    rig.activate()
    head = rig.tx.add_chain([b"x"])
    rig.tx.write_desc(head, 0x10_0000 + 0x100, 16, 0)  # in the unbacked hole after RAM
    rig.tx.kick()
    assert wait_until(lambda: rig.health.resets)
    assert rig.dev.metrics.guest_errors == 1


def test_avail_index_running_ahead_sets_needs_reset(rig: Rig) -> None:
    rig.activate()
    rig.tx.set_avail_idx(100)  # more than queue size ahead of the device
    rig.tx.kick()
    assert wait_until(lambda: rig.health.resets)


def test_unknown_queue_index_at_activate_sets_needs_reset_and_starts_nothing(mem: GuestMemory) -> None:
    r = Rig(mem, Console())
    cfg = r.tx.config()
    cfg.index = 2  # a control queue, only with MULTIPORT
    try:
        r.dev.activate(mem, [r.rx.config(), cfg], r.health)
        assert r.health.resets and "no queue 2" in r.health.resets[0]
        assert r.dev._loop is None
    finally:
        r.close()


def test_misaligned_ring_at_activate_sets_needs_reset(mem: GuestMemory) -> None:
    r = Rig(mem, Console())
    cfg = r.rx.config()
    cfg.desc_table += 1
    try:
        r.dev.activate(mem, [cfg, r.tx.config()], r.health)
        assert r.health.resets and r.dev._loop is None
    finally:
        r.close()


def test_queue_larger_than_the_maximum_at_activate_sets_needs_reset(mem: GuestMemory) -> None:
    r = Rig(mem, Console(queue_size=8))
    try:
        r.activate()  # the mock queues have 16 entries
        assert r.health.resets and "size 16" in r.health.resets[0]
    finally:
        r.close()


def test_reset_called_back_from_needs_reset_inside_the_worker_does_not_deadlock(mem: GuestMemory) -> None:
    dev = Console()

    class ResettingHealth(FakeHealth):
        def needs_reset(self, reason: str) -> None:
            super().needs_reset(reason)
            dev.reset()  # a transport that resets synchronously, from the worker thread

    r = Rig(mem, dev, health=ResettingHealth())
    try:
        r.activate()
        loop = dev._loop
        assert loop is not None and loop._thread is not None
        thread = loop._thread
        r.tx.publish(16)
        r.tx.kick()
        assert wait_until(lambda: len(r.health.resets) == 1)
        assert wait_until(lambda: not thread.is_alive())
        assert dev._loop is None and loop._stop_fd == -1 and loop._input_fd == -1
        assert dev.enqueue_input(b"after reset") == 11  # buffered, no write to a closed eventfd
    finally:
        r.close()


def test_reset_stops_the_thread_and_closes_its_eventfds(rig: Rig) -> None:
    rig.activate()
    loop = rig.dev._loop
    assert loop is not None and loop._thread is not None
    rig.dev.reset()
    assert not loop._thread.is_alive() and loop._stop_fd == -1 and loop._input_fd == -1


def test_reactivation_after_reset_serves_again(mem: GuestMemory, sink: Sink) -> None:
    r = Rig(mem, Console(sink))
    try:
        r.activate()
        r.dev.reset()
        r.tx = MockSplitQueue(mem, 16, base=0x40000, limit=0x80000, seed=9, index=1, kick_fd=r.fds[2],
                              call_fd=r.fds[3])
        r.activate()
        r.tx.add_chain([b"again"])
        r.tx.kick()
        assert wait_until(lambda: sink.data == b"again")
    finally:
        r.close()


# ------------------------------------------------------------------------------------------ SharedConsoleLog
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeTimers:
    """Records the one-shot timers the log arms; ``fire`` runs them as the timer thread would."""

    def __init__(self) -> None:
        self.armed: list[tuple[float, object]] = []

    def __call__(self, delay: float, fn: object) -> FakeTimers:
        self.armed.append((delay, fn))
        return self

    def cancel(self) -> None:
        self.armed.clear()

    def fire(self) -> None:
        armed, self.armed = self.armed, []
        for _, fn in armed:
            fn()  # type: ignore[operator]


@pytest.fixture
def shared(sink: Sink) -> tuple[SharedConsoleLog, FakeClock, FakeTimers]:
    clock, timers = FakeClock(), FakeTimers()
    return SharedConsoleLog(sink, b"[hvc0] ", clock=clock, timer=timers), clock, timers


def test_shared_log_prefixes_every_secondary_line_across_partial_writes(
        sink: Sink, shared: tuple[SharedConsoleLog, FakeClock, FakeTimers]) -> None:
    log, _, _ = shared
    log.secondary.write(b"one\ntw")
    log.secondary.write(b"o\n\nthree")
    log.secondary.write(b"")
    assert bytes(sink.data) == b"[hvc0] one\n[hvc0] two\n[hvc0] \n"  # "three" is not finished yet
    log.close()
    assert bytes(sink.data) == b"[hvc0] one\n[hvc0] two\n[hvc0] \n[hvc0] three\n"


def test_a_secondary_line_waits_for_the_end_of_the_com1_line_the_uart_is_still_sending(
        sink: Sink, shared: tuple[SharedConsoleLog, FakeClock, FakeTimers]) -> None:
    # The realkvm lane's failure: the guest's tty was still sending "CHK hwrng_bytes=64" to COM1 byte by byte
    # when its next command wrote to hvc0; the hvc0 line used to land inside the COM1 line.
    log, clock, _ = shared
    for b in b"CHK hwrng_":
        log.primary.write(bytes([b]))
        clock.now += 0.001
    log.secondary.write(b"hello from hvc0\n")
    for b in b"bytes=64\r\n":
        log.primary.write(bytes([b]))
    assert bytes(sink.data) == b"CHK hwrng_bytes=64\r\n[hvc0] hello from hvc0\n"


def test_a_quiet_com1_prompt_gets_a_line_break_before_the_held_secondary_line(
        sink: Sink, shared: tuple[SharedConsoleLog, FakeClock, FakeTimers]) -> None:
    log, clock, timers = shared
    log.primary.write(b"login: ")
    clock.now += 0.1
    log.secondary.write(b"late\n")
    assert bytes(sink.data) == b"login: " and [round(d, 3) for d, _ in timers.armed] == [0.15]
    clock.now += 0.15
    timers.fire()  # COM1 stayed quiet: the held line goes out on its own line
    assert bytes(sink.data) == b"login: \n[hvc0] late\n"
    log.primary.write(b"root\r\n")
    assert bytes(sink.data) == b"login: \n[hvc0] late\nroot\r\n"


def test_a_secondary_write_after_com1_went_quiet_breaks_the_line_at_once(
        sink: Sink, shared: tuple[SharedConsoleLog, FakeClock, FakeTimers]) -> None:
    log, clock, timers = shared
    log.primary.write(b"# ")
    clock.now += 5
    log.secondary.write(b"x\n")
    assert bytes(sink.data) == b"# \n[hvc0] x\n" and not timers.armed


def test_an_endless_secondary_line_is_cut_at_max_line(sink: Sink) -> None:
    log = SharedConsoleLog(sink, b"> ", max_line=8, timer=FakeTimers())
    log.secondary.write(b"0123456789")
    assert bytes(sink.data) == b"> 0123456789\n"


def test_a_failing_sink_on_the_secondary_path_is_counted_and_com1_errors_still_reach_the_uart() -> None:
    log = SharedConsoleLog(BrokenSink(), b"[hvc0] ", timer=FakeTimers())
    log.secondary.write(b"lost\n")
    assert log.dropped == len(b"[hvc0] lost\n")
    with pytest.raises(OSError):
        log.primary.write(b"x")


def test_the_shared_log_keeps_lines_whole_under_concurrent_writers(sink: Sink) -> None:
    log = SharedConsoleLog(sink, b"[hvc0] ", hold=10.0)

    def com1() -> None:
        for i in range(300):
            for b in f"com1 line {i}\r\n".encode():
                log.primary.write(bytes([b]))

    def hvc0() -> None:
        for i in range(300):
            log.secondary.write(f"hvc0 line {i}\n".encode())

    threads = [threading.Thread(target=com1), threading.Thread(target=hvc0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    lines = bytes(sink.data).decode().splitlines()
    assert sorted(lines) == sorted([f"com1 line {i}" for i in range(300)] + [f"[hvc0] hvc0 line {i}" for i in range(300)])
