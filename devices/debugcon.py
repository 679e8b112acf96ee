"""QEMU's ``isa-debugcon`` (hw/char/debugcon.c): a write-only byte port firmware prints its debug log to.

SeaBIOS writes its log to port 0x402 (CONFIG_DEBUG_IO, src/hw/serialio.c) once a read of that port returns the
readback value 0xE9 (QEMU_DEBUGCON_READBACK); without it SeaBIOS stays silent there. Writes of any width send their
bytes in order to ``sink``; reads return 0xE9 in every byte. The sink is usually a line-oriented stream of the
console log (pv.console.SharedConsoleLog), so the log's lines stay whole.

``on_line``, when given, also sees each whole line (without its newline; at most ``MAX_WATCHED_LINE`` bytes of
it, the rest of a longer line dropped): the firmware's status reports the host acts on (daemon.firmware_boot
notes SeaBIOS's "No bootable device." this way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from devices.bus import BusDevice

SEABIOS_DEBUG_PORT = 0x402
READBACK = 0xE9
MAX_WATCHED_LINE = 256  # bytes of a line on_line sees: a status line is short, a guest cannot make us buffer more


class ByteSink(Protocol):
    def write(self, data: bytes) -> object: ...


@dataclass
class DebugconMetrics:
    bytes_out: int = 0
    sink_errors: int = 0


class Debugcon(BusDevice):
    def __init__(self, sink: ByteSink | None, on_line: Callable[[bytes], None] | None = None) -> None:
        self._sink = sink
        self._on_line = on_line
        self._line = bytearray()
        self.metrics = DebugconMetrics()

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes([READBACK]) * len(data)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.metrics.bytes_out += len(data)
        raw = bytes(data)
        if self._on_line is not None:
            self._watch(raw)
        if self._sink is None:
            return
        try:
            self._sink.write(raw)
        except Exception:  # a console log that failed must not take the vCPU down
            self.metrics.sink_errors += 1

    def _watch(self, data: bytes) -> None:
        assert self._on_line is not None
        *lines, rest = data.split(b"\n")
        for piece in lines:
            self._line += piece[:max(0, MAX_WATCHED_LINE - len(self._line))]
            line = bytes(self._line)
            self._line.clear()
            self._on_line(line)
        self._line += rest[:max(0, MAX_WATCHED_LINE - len(self._line))]
