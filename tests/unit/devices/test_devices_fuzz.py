"""Random guest accesses through a devices.bus.Bus: no device raises and no device's memory grows unbounded.

One hypothesis test per device. Each feeds a sequence of (address, size, data) reads and writes around and
inside the device's range, with offsets and sizes the bus may or may not accept, interleaved with host-side
events where the device has them.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from devices import i8042 as k
from devices import serial as s
from devices.bus import Bus, BusDevice, mmio_bus, pio_bus
from devices.debug_exit import DebugExit
from devices.i8042 import I8042
from devices.irq import CountingTrigger
from devices.rtc import CMOS_SIZE, Rtc
from devices.serial import Serial
from devices.testdev import IOMEM_BASE, IOMEM_LEN, TestDevIoport, TestDevMmio

SIZES = st.sampled_from([1, 2, 3, 4, 8])


def accesses(span: int) -> st.SearchStrategy[list[tuple[bool, int, int, bytes]]]:
    """(is_write, offset relative to the base, size, data), offsets a little outside the range too."""
    access = st.tuples(st.booleans(), st.integers(-4, span + 4), SIZES, st.binary(min_size=8, max_size=8))
    return st.lists(access.map(lambda a: (a[0], a[1], a[2], a[3][: a[2]])), max_size=200)


def run(bus: Bus, base: int, ops: list[tuple[bool, int, int, bytes]]) -> None:
    for is_write, offset, size, data in ops:
        addr = base + offset
        if is_write:
            bus.write(addr, data)
        else:
            buf = bytearray(size)
            bus.read(addr, memoryview(buf))
            assert len(buf) == size


def placed(dev: BusDevice, base: int, length: int, bus: Bus | None = None) -> Bus:
    bus = bus or pio_bus()
    bus.insert(dev, base, length)
    return bus


class BoundedSink:
    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> None:
        self.count += len(data)


@settings(max_examples=300, deadline=None)
@given(ops=accesses(8), host_input=st.lists(st.binary(max_size=40), max_size=20))
def test_serial_survives_random_accesses(
    ops: list[tuple[bool, int, int, bytes]], host_input: list[bytes]
) -> None:
    sink = BoundedSink()
    uart = Serial(CountingTrigger(), sink)
    bus = placed(uart, 0x3F8, 8)
    chunk = max(1, len(ops) // (len(host_input) + 1))
    for i in range(0, max(len(ops), 1), chunk):
        run(bus, 0x3F8, ops[i : i + chunk])
        if host_input:
            taken = uart.enqueue_input(host_input.pop())
            assert taken >= 0
        state = uart.snapshot()
        state.validate()  # every reachable state is one restore accepts
        assert len(state.rx_fifo) <= s.FIFO_CAPACITY
    assert sink.count <= len(ops)
    Serial.restore(uart.snapshot(), CountingTrigger())


@settings(max_examples=300, deadline=None)
@given(ops=accesses(5))
def test_i8042_survives_random_accesses(ops: list[tuple[bool, int, int, bytes]]) -> None:
    resets: list[int] = []
    kbc = I8042(lambda: resets.append(1), CountingTrigger())
    run(placed(kbc, 0x60, k.RANGE_LENGTH), 0x60, ops)
    assert len(kbc._out) <= k.OUTPUT_QUEUE_LIMIT
    assert kbc.metrics.resets == len(resets)


@settings(max_examples=300, deadline=None)
@given(ops=accesses(2), t=st.floats(0, 4_000_000_000, allow_nan=False))
def test_rtc_survives_random_accesses(ops: list[tuple[bool, int, int, bytes]], t: float) -> None:
    rtc = Rtc(lambda: t)
    run(placed(rtc, 0x70, 2), 0x70, ops)
    assert len(rtc.cmos) == CMOS_SIZE
    assert 0 <= rtc.index < CMOS_SIZE
    for index in range(CMOS_SIZE):  # every register stays readable whatever the guest left in B
        rtc.write(0, bytes((index,)))
        rtc.read(1, memoryview(bytearray(1)))


@settings(max_examples=200, deadline=None)
@given(ops=accesses(2))
def test_debug_exit_survives_random_accesses(ops: list[tuple[bool, int, int, bytes]]) -> None:
    statuses: list[int] = []
    dev = DebugExit(statuses.append)
    run(placed(dev, 0x501, 2), 0x501, ops)
    assert all(st_ & 1 for st_ in statuses)


@settings(max_examples=200, deadline=None)
@given(ops=accesses(4))
def test_testdev_ioport_survives_random_accesses(ops: list[tuple[bool, int, int, bytes]]) -> None:
    dev = TestDevIoport()
    run(placed(dev, 0xE0, 4), 0xE0, ops)
    assert 0 <= dev.data <= 0xFFFF_FFFF


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.booleans(),
            st.sampled_from(
                [-8, -1, 0, 1, 7, 0x8000, IOMEM_LEN - 8, IOMEM_LEN - 1, IOMEM_LEN, IOMEM_LEN + 4]
            ),
            SIZES,
            st.binary(min_size=8, max_size=8),
        ).map(lambda a: (a[0], a[1], a[2], a[3][: a[2]])),
        max_size=200,
    )
)
def test_testdev_mmio_survives_random_accesses(ops: list[tuple[bool, int, int, bytes]]) -> None:
    dev = TestDevMmio()
    run(placed(dev, IOMEM_BASE, IOMEM_LEN, mmio_bus()), IOMEM_BASE, ops)
    assert len(dev.mem) == IOMEM_LEN
    # Direct calls (no bus clipping) past the end must not raise or grow either.
    for is_write, offset, size, data in ops:
        if is_write:
            dev.write(offset, data)
        else:
            dev.read(offset, memoryview(bytearray(size)))
    assert len(dev.mem) == IOMEM_LEN
