"""devices.debugcon: QEMU's isa-debugcon byte port, and the whole-line watch the firmware boot uses to notice
SeaBIOS's "No bootable device." (issue 10)."""

from __future__ import annotations

from devices.debugcon import MAX_WATCHED_LINE, READBACK, Debugcon


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


def test_reads_return_the_readback_value_seabios_probes_for() -> None:
    buf = bytearray(2)
    Debugcon(None).read(0, memoryview(buf))
    assert buf == bytes([READBACK, READBACK])


def test_every_byte_reaches_the_sink_in_order_whatever_the_width() -> None:
    sink = Sink()
    d = Debugcon(sink)
    for chunk in (b"Se", b"a", b"BIOS\n"):
        d.write(0, chunk)
    assert sink.data == b"SeaBIOS\n" and d.metrics.bytes_out == 8


def test_on_line_sees_whole_lines_across_byte_writes() -> None:
    lines: list[bytes] = []
    sink = Sink()
    d = Debugcon(sink, on_line=lines.append)
    for b in b"No bootable device.  Retrying in 5 seconds.\nBoot":
        d.write(0, bytes([b]))
    assert lines == [b"No bootable device.  Retrying in 5 seconds."]
    d.write(0, b" failed\na\nb")
    assert lines[1:] == [b"Boot failed", b"a"]
    assert sink.data.endswith(b"a\nb")  # the sink is not held back by the watch


def test_a_line_longer_than_the_cap_is_cut_not_buffered() -> None:
    lines: list[bytes] = []
    d = Debugcon(None, on_line=lines.append)
    d.write(0, b"x" * (MAX_WATCHED_LINE * 4))
    d.write(0, b"y" * 10 + b"\n")
    assert lines == [b"x" * MAX_WATCHED_LINE]


def test_a_failing_sink_is_counted_and_the_watch_still_runs() -> None:
    class Broken:
        def write(self, data: bytes) -> None:
            raise OSError("gone")

    lines: list[bytes] = []
    d = Debugcon(Broken(), on_line=lines.append)
    d.write(0, b"hi\n")
    assert d.metrics.sink_errors == 1 and lines == [b"hi"]
