"""QEMU's ``isa-debugcon`` (hw/char/debugcon.c): a write-only byte port firmware prints its debug log to.

SeaBIOS writes its log to port 0x402 (CONFIG_DEBUG_IO, src/hw/serialio.c) once a read of that port returns the
readback value 0xE9 (QEMU_DEBUGCON_READBACK); without it SeaBIOS stays silent there. Writes of any width send their
bytes in order to ``sink``; reads return 0xE9 in every byte. The sink is usually a line-oriented stream of the
console log (pv.console.SharedConsoleLog), so the log's lines stay whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from devices.bus import BusDevice

SEABIOS_DEBUG_PORT = 0x402
READBACK = 0xE9


class ByteSink(Protocol):
    def write(self, data: bytes) -> object: ...


@dataclass
class DebugconMetrics:
    bytes_out: int = 0
    sink_errors: int = 0


class Debugcon(BusDevice):
    def __init__(self, sink: ByteSink | None) -> None:
        self._sink = sink
        self.metrics = DebugconMetrics()

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes([READBACK]) * len(data)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.metrics.bytes_out += len(data)
        if self._sink is None:
            return
        try:
            self._sink.write(bytes(data))
        except Exception:  # a console log that failed must not take the vCPU down
            self.metrics.sink_errors += 1
