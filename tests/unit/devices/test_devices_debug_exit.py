"""isa-debug-exit compatibility (devices/debug_exit.py): status = (value << 1) | 1, as QEMU debugexit.c."""

from __future__ import annotations

import pytest

from devices.bus import pio_bus
from devices.debug_exit import DEFAULT_IOBASE, DEFAULT_IOSIZE, DebugExit


class Exits:
    def __init__(self) -> None:
        self.statuses: list[int] = []

    def __call__(self, status: int) -> None:
        self.statuses.append(status)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x00", 0x01),
        (b"\x10", 0x21),
        (b"\xff", 0x1FF),
        (b"\x34\x12", 0x2469),
        (b"\xef\xbe\xad\xde", (0xDEADBEEF << 1) | 1),
    ],
)
def test_write_calls_on_exit_with_qemu_status(data: bytes, status: int) -> None:
    exits = Exits()
    DebugExit(exits).write(0, data)
    assert exits.statuses == [status]


def test_any_offset_in_the_range_exits() -> None:
    exits = Exits()
    bus = pio_bus()
    dev = DebugExit(exits)
    bus.insert(dev, DEFAULT_IOBASE, DEFAULT_IOSIZE)
    bus.write(DEFAULT_IOBASE + 1, b"\x02")
    assert exits.statuses == [5]
    assert dev.metrics.exits == 1


def test_low_byte_of_status_is_what_a_process_exit_keeps() -> None:
    exits = Exits()
    DebugExit(exits).write(0, b"\x80")
    assert exits.statuses[0] & 0xFF == 0x01


def test_reads_return_zero_and_do_not_exit() -> None:
    exits = Exits()
    dev = DebugExit(exits)
    buf = bytearray(b"\xff\xff")
    dev.read(0, memoryview(buf))
    assert buf == b"\x00\x00"
    assert exits.statuses == []


def test_writes_wider_than_4_bytes_are_counted_and_ignored() -> None:
    exits = Exits()
    dev = DebugExit(exits)
    dev.write(0, bytes(8))
    assert exits.statuses == []
    assert dev.metrics.invalid_access == 1
