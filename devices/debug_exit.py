"""QEMU ``isa-debug-exit`` compatible port: a guest write ends the VM with status ``(value << 1) | 1``.

QEMU ``hw/misc/debugexit.c``: ``debug_exit_write`` calls ``exit((val << 1) | 1)`` for any write of 1 to 4 bytes
(``valid.min/max_access_size`` 1 and 4, little-endian), at any offset in its range (default iobase 0x501,
iosize 2). It has no read handler; reads here return 0. We hand the status to ``on_exit`` unmodified; like any
process exit status, a caller that uses it as one keeps only the low 8 bits (``status & 0xff``), as QEMU's
``exit()`` does. Accesses wider than 4 bytes are invalid in QEMU too: counted and ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from devices.bus import BusDevice
from devices.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

DEFAULT_IOBASE = 0x501
DEFAULT_IOSIZE = 2
MAX_ACCESS = 4


def exit_status(value: int) -> int:
    """The status QEMU exits with for a written ``value``."""
    return (value << 1) | 1


@dataclass
class DebugExitMetrics:
    exits: int = 0
    invalid_access: int = 0


class DebugExit(BusDevice):
    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit
        self.metrics = DebugExitMetrics()
        self._log = RateLimitedLog(log, per_second=5)

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if not 1 <= len(data) <= MAX_ACCESS:
            self.metrics.invalid_access += 1
            self._log.warning("debug-exit: ignored %d-byte write", len(data))
            return
        value = int.from_bytes(data, "little")
        self.metrics.exits += 1
        self._on_exit(exit_status(value))
