"""The UART's C half (kvmcore.fastrun.UartAccel, driven by devices.serial.Serial.attach_accel) against the plain
Python Serial, its reference: the same access sequences, random and targeted, hostile ones included (odd sizes,
offsets past the 8 registers, DLAB and loopback flips, line errors, host input interleaved, a failing sink), go
through both; every access returns the same bytes, and after each step both UARTs have the same snapshot, metrics,
pending-interrupt state, interrupt edge count and sink output. Each access is offered to the C handler first
(exactly what kvmdm_run does on a port exit) and reaches the Python device only when C declines. No /dev/kvm."""

from __future__ import annotations

import contextlib
import os
import random
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices import serial as S
from devices.irq import CountingTrigger
from kvmcore import fastrun

pytestmark = pytest.mark.skipif(not fastrun.AVAILABLE, reason="the C fast path could not be built")


class RecSink:
    def __init__(self, failing: bool = False) -> None:
        self.data = bytearray()
        self.failing = failing

    def write(self, data: bytes) -> None:
        if self.failing:
            raise OSError(5, "console gone")
        self.data += data


class Pair:
    """One reference UART and one with a C half, fed the same accesses."""

    def __init__(self, *, sink: bool = True, failing: bool = False) -> None:
        self.ref_irq, self.fast_irq = CountingTrigger(), CountingTrigger()
        self.ref_sink, self.fast_sink = RecSink(failing), RecSink(failing)
        self.ref = S.Serial(self.ref_irq, self.ref_sink if sink else None)
        self.fast = S.Serial(self.fast_irq, self.fast_sink if sink else None)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.acc = fastrun.UartAccel(irq_fd=self.efd)
        self.fast.attach_accel(self.acc)
        self.c_irqs = 0
        self.c_reads = self.c_writes = 0

    def close(self) -> None:
        os.close(self.efd)

    def read(self, off: int, size: int = 1) -> bytes:
        a = bytearray(size)
        self.ref.read(off, memoryview(a))
        b = bytearray(size)
        if self.acc.io(off, False, b):
            self.c_reads += 1
        else:
            self.fast.read(off, memoryview(b))
        assert a == b, f"read off={off} size={size}: ref {a.hex()} C/Python {b.hex()}"
        return bytes(a)

    def write(self, off: int, data: bytes) -> None:
        self.ref.write(off, data)
        if self.acc.io(off, True, bytearray(data)):
            self.c_writes += 1
        else:
            self.fast.write(off, data)

    def enqueue(self, data: bytes) -> None:
        assert self.ref.enqueue_input(data) == self.fast.enqueue_input(data)

    def check(self) -> None:
        self.fast.flush_tx()
        with contextlib.suppress(BlockingIOError):
            self.c_irqs += os.eventfd_read(self.efd)
        assert self.fast.snapshot() == self.ref.snapshot()
        assert vars(self.fast.metrics) == vars(self.ref.metrics)
        assert self.fast._last_pending == self.ref._last_pending  # decides every future interrupt edge
        assert self.fast_irq.count + self.c_irqs == self.ref_irq.count
        assert self.fast_sink.data == self.ref_sink.data


@pytest.fixture
def pair() -> Pair:
    p = Pair()
    yield p
    p.close()


# ---------------------------------------------------------------- targeted

def test_linux_console_write_pattern_is_served_in_c_byte_for_byte(pair: Pair) -> None:
    # serial8250_console_write: IER off, then per character poll LSR for THRE and write THR; IER restored.
    pair.write(S.LCR, b"\x03")
    pair.write(S.FCR, b"\xc7")
    pair.write(S.IER, b"\x00")
    text = b"Linux version 6.1.0 (debian-kernel@lists.debian.org)\n"
    for ch in text:
        assert pair.read(S.LSR)[0] & S.LSR_THRE
        pair.write(S.DATA, bytes((ch,)))
    pair.write(S.IER, b"\x05")
    pair.check()
    assert pair.fast_sink.data == text
    assert pair.c_reads == len(text) and pair.c_writes == len(text)  # all of it in C, none through Python


def test_interrupt_driven_tx_signals_one_thre_edge_per_byte_from_c(pair: Pair) -> None:
    pair.write(S.IER, bytes((S.IER_ETBEI | S.IER_ERBFI,)))  # THRE pending at once: that edge comes from Python
    pair.check()
    assert pair.read(S.IIR)[0] & 0x0F == S.IIR_THRE  # reading IIR=THRE clears it: a side effect, Python's
    pair.check()
    pair.write(S.DATA, b"a")  # THRE newly pending again: IIR changes, so Python handles this write
    assert pair.c_writes == 0
    for ch in b"bcdefgh":  # THRE already pending: each write is one more edge, signalled by C on the irqfd
        pair.write(S.DATA, bytes((ch,)))
    pair.check()
    assert pair.c_writes == 7 and pair.c_irqs == 7
    assert pair.fast_sink.data == b"abcdefgh"


def test_lsr_with_line_errors_goes_to_python_and_clears_them(pair: Pair) -> None:
    pair.write(S.MCR, bytes((S.MCR_LOOP,)))
    for ch in b"xy":  # 16450 mode: a 1-byte RBR, the second byte overruns
        pair.write(S.DATA, bytes((ch,)))
    assert pair.c_writes == 0  # loopback is Python's
    before = pair.c_reads
    lsr = pair.read(S.LSR)[0]
    assert lsr & S.LSR_OE and pair.c_reads == before  # side effect: not answered from the published table
    assert not pair.read(S.LSR)[0] & S.LSR_OE and pair.c_reads == before + 1  # now side-effect free again
    pair.check()


def test_received_bytes_are_read_by_python_and_the_empty_rbr_by_c(pair: Pair) -> None:
    pair.write(S.FCR, b"\x01")
    pair.write(S.IER, bytes((S.IER_ERBFI,)))
    pair.enqueue(b"hello")
    assert pair.read(S.LSR)[0] & S.LSR_DR
    got = bytes(pair.read(S.DATA)[0] for _ in range(5))
    assert got == b"hello"
    n = pair.c_reads
    assert pair.read(S.DATA) == b"\x00" and pair.c_reads == n + 1
    pair.check()


def test_dlab_reads_and_writes_reach_the_divisor_latch(pair: Pair) -> None:
    pair.write(S.LCR, bytes((S.LCR_DLAB | 3,)))
    pair.write(S.DATA, b"\x01")  # DLL, not THR: Python
    pair.write(S.IER, b"\x00")  # DLM
    assert pair.c_writes == 0
    assert pair.read(S.DATA) == b"\x01" and pair.read(S.IER) == b"\x00"
    pair.write(S.LCR, b"\x03")
    pair.check()
    assert pair.fast.divisor == 1


@pytest.mark.parametrize("size", [0, 2, 3, 4, 8])
def test_wide_and_empty_accesses_are_declined_by_c_and_counted_by_python(pair: Pair, size: int) -> None:
    for off in range(S.NUM_REGS):
        pair.read(off, size)
        pair.write(off, bytes(range(size)))
    assert pair.c_reads == pair.c_writes == 0
    pair.check()
    assert pair.fast.metrics.invalid_access == 2 * S.NUM_REGS


def test_offsets_past_the_registers_are_declined_by_c(pair: Pair) -> None:
    for off in (8, 9, 15, 255, 0xFFFF):
        pair.read(off)
        pair.write(off, b"\x41")
    assert pair.c_reads == pair.c_writes == 0
    pair.check()


def test_without_a_sink_thr_writes_stay_in_python_and_count_as_dropped() -> None:
    p = Pair(sink=False)
    try:
        p.write(S.DATA, b"z")
        assert p.c_writes == 0
        p.check()
        assert p.fast.metrics.dropped == 1
    finally:
        p.close()


def test_a_failing_sink_drops_the_c_queued_bytes_as_the_reference_drops_its_own() -> None:
    p = Pair(failing=True)
    try:
        for ch in b"lost":
            p.write(S.DATA, bytes((ch,)))
        assert p.c_writes == 4
        p.check()
        assert p.fast.metrics.dropped == 4 and p.fast.metrics.tx_bytes == 0
    finally:
        p.close()


def test_a_full_tx_ring_hands_the_write_to_python_which_keeps_the_order(pair: Pair) -> None:
    data = bytes(random.Random(1).randrange(256) for _ in range(fastrun.TX_RING + 10))
    for ch in data:
        pair.write(S.DATA, bytes((ch,)))
    # Exactly one write found the ring full and went through Python, which drained the ring before sending it.
    assert pair.c_writes == len(data) - 1
    pair.check()
    assert pair.fast_sink.data == data


def test_the_pending_ring_is_signalled_on_its_notify_eventfd_once_per_batch() -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    note = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        sink = RecSink()
        uart = S.Serial(CountingTrigger(), sink)
        acc = fastrun.UartAccel(irq_fd=efd, notify_fd=note)
        uart.attach_accel(acc)
        for ch in b"abc":
            assert acc.io(S.DATA, True, bytearray((ch,)))
        assert os.eventfd_read(note) == 1  # empty -> non-empty once
        assert acc.needs_flush()
        uart.flush_tx()
        assert sink.data == b"abc" and not acc.needs_flush()
        assert acc.io(S.DATA, True, bytearray(b"d"))
        assert os.eventfd_read(note) == 1
    finally:
        os.close(efd)
        os.close(note)


def test_c_writers_and_a_python_drainer_running_at_once_lose_and_reorder_nothing() -> None:
    # cffi releases the GIL in the C handler: these threads really run concurrently with the drainer.
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        sink = RecSink()
        uart = S.Serial(CountingTrigger(), sink)
        acc = fastrun.UartAccel(irq_fd=efd)
        uart.attach_accel(acc)
        lock = threading.Lock()
        stop = threading.Event()
        n = 20000
        data = bytes(i % 251 for i in range(n))

        def writer() -> None:
            for ch in data:
                buf = bytearray((ch,))
                if not acc.io(S.DATA, True, buf):
                    with lock:  # what the vCPU loop does with a declined access
                        uart.write(S.DATA, buf)

        def drainer() -> None:
            while not stop.is_set():
                with lock:
                    uart.flush_tx()

        d = threading.Thread(target=drainer)
        d.start()
        w = threading.Thread(target=writer)
        w.start()
        w.join()
        stop.set()
        d.join()
        uart.flush_tx()
        assert bytes(sink.data) == data
        assert uart.metrics.tx_bytes == n
    finally:
        os.close(efd)


# ---------------------------------------------------------------- random

# Values that steer the UART through its modes often; the rest are random bytes.
_INTERESTING = {
    S.LCR: [0x03, 0x83, 0x80, 0x1B, 0x00],
    S.MCR: [0x0B, 0x1F, 0x10, 0x08, 0x00, 0x13],
    S.IER: [0x00, 0x01, 0x02, 0x03, 0x05, 0x0F, 0xFF],
    S.FCR: [0x00, 0x01, 0x07, 0xC7, 0x47, 0x87, 0x06],
}


def _random_op(rng: random.Random, pair: Pair) -> None:
    r = rng.random()
    if r < 0.04:
        pair.enqueue(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20))))
        return
    size = 1 if rng.random() < 0.93 else rng.choice([0, 2, 4, 8])
    off = rng.randrange(S.NUM_REGS) if rng.random() < 0.97 else rng.choice([8, 9, 12, 100])
    if r < 0.55:
        pair.read(off, size)
        return
    if off in _INTERESTING and rng.random() < 0.7:
        value = rng.choice(_INTERESTING[off])
    else:
        value = rng.randrange(256)
    pair.write(off, bytes([value] * size) if size != 1 else bytes((value,)))


@pytest.mark.parametrize("seed", range(6))
def test_random_sequences_match_the_reference_after_every_access(seed: int) -> None:
    rng = random.Random(seed)
    p = Pair(failing=seed == 5)
    try:
        for _ in range(3000):
            _random_op(rng, p)
            p.check()
        # Not a vacuous comparison: C answered a real share of both reads and writes.
        assert p.c_reads > 300 and p.c_writes > 20
    finally:
        p.close()


_op = st.one_of(
    st.tuples(st.just("r"), st.integers(0, 9), st.sampled_from([1, 1, 1, 1, 2, 0])),
    st.tuples(st.just("w"), st.integers(0, 9), st.integers(0, 255)),
    st.tuples(st.just("in"), st.binary(min_size=1, max_size=17), st.just(0)),
)


# KVMDM_FUZZ_EXAMPLES=20000 for a deep run; CI runs the default.
@settings(max_examples=int(os.environ.get("KVMDM_FUZZ_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_op, max_size=80))
def test_generated_sequences_match_the_reference(ops: list[tuple[str, object, int]]) -> None:
    p = Pair()
    try:
        for kind, a, b in ops:
            if kind == "r":
                assert isinstance(a, int)
                p.read(a, b)
            elif kind == "w":
                assert isinstance(a, int)
                p.write(a, bytes((b,)))
            else:
                assert isinstance(a, bytes)
                p.enqueue(a)
            p.check()
    finally:
        p.close()


def test_a_synchronous_sink_gets_every_byte_from_python_at_the_write() -> None:
    class Timestamping(RecSink):
        synchronous = True

    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        sink = Timestamping()
        uart = S.Serial(CountingTrigger(), sink)
        acc = fastrun.UartAccel(irq_fd=efd)
        uart.attach_accel(acc)
        for ch in b"<>":
            assert not acc.io(S.DATA, True, bytearray((ch,)))  # declined: the vCPU loop hands it to Python
            uart.write(S.DATA, bytes((ch,)))
            assert sink.data[-1] == ch  # delivered by the write itself, not by a later flush
        assert acc.io(S.LSR, False, bytearray(1))  # reads are still C's
    finally:
        os.close(efd)
