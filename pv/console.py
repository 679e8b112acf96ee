"""virtio-console (virtio 1.2 §5.3): the guest's second console, one port, no MULTIPORT.

Queues (§5.3.2, without VIRTIO_CONSOLE_F_MULTIPORT): 0 = receiveq (port 0, host -> guest), 1 = transmitq
(port 0, guest -> host). Output goes to a sink with the SerialSink protocol of devices/serial.py
(``write(bytes)``); input arrives through :meth:`Console.enqueue_input`, which takes what fits in a bounded
host-side buffer and returns how much it took (backpressure: the caller keeps the rest and retries). Buffered
input waits until the driver posts receive buffers; nothing is dropped.

Features: VERSION_1, EVENT_IDX, INDIRECT_DESC, VIRTIO_CONSOLE_F_EMERG_WRITE (a config-space write of one
character, §5.3.4) and, when a size is configured, VIRTIO_CONSOLE_F_SIZE (cols/rows in config space).
MULTIPORT is never offered, so ``max_nr_ports`` is not meaningful to the driver (§5.3.4 "exists only if
VIRTIO_CONSOLE_F_MULTIPORT is set"); it reads as 1, the number of ports there are.

Guest errors: besides every ring-level violation pv.queue detects, a device-readable buffer in the receiveq or a
device-writable one in the transmitq breaks §5.3.6.1 ("The driver MUST NOT put a device-readable buffer in a
receiveq. The driver MUST NOT put a device-writable buffer in a transmitq.") and resets the device
(DEVICE_NEEDS_RESET via DeviceHealth). Nothing raises out of the worker thread.

One thread per device (like pv/net.py, not pv/worker.py: the receiveq must only be popped when there is input,
which the generic chain-at-a-time worker cannot express): epoll on a stop eventfd, the two kick eventfds and an
input eventfd that :meth:`Console.enqueue_input` writes.
"""

from __future__ import annotations

import logging
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from kvmcore.memory import GuestMemory, GuestMemoryError
from kvmcore.util.ratelimit import RateLimitedLog
from pv.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_CONSOLE,
    DeviceHealth,
    QueueConfig,
    VirtioDevice,
)
from pv.devthread import DeviceThread, drain_eventfd
from pv.errors import InvalidQueueConfig, VirtqueueError
from pv.queue import MAX_QUEUE_SIZE, DescriptorChain, SplitQueue

log = logging.getLogger(__name__)

# Feature bits (§5.3.3).
VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

RECEIVEQ = 0
TRANSMITQ = 1

# struct virtio_console_config (§5.3.4): le16 cols, le16 rows, le32 max_nr_ports, le32 emerg_wr.
_CONFIG = struct.Struct("<HHII")
EMERG_WR_OFFSET = 8

DEFAULT_MAX_PENDING_INPUT = 64 * 1024
DEFAULT_BUDGET = 256  # chains per queue per round, so output cannot starve input and vice versa


class ConsoleGuestError(VirtqueueError):
    """The driver broke a virtio-console rule (§5.3.6.1)."""


class TxChainWritable(ConsoleGuestError):
    """A transmitq chain has a device-writable buffer."""

    rule = "§5.3.6.1: The driver MUST NOT put a device-writable buffer in a transmitq"


class RxChainReadable(ConsoleGuestError):
    """A receiveq chain has a device-readable buffer."""

    rule = "§5.3.6.1: The driver MUST NOT put a device-readable buffer in a receiveq"


class ConsoleSink(Protocol):
    """What the console writes to (devices.serial.SerialSink has the same shape)."""

    def write(self, data: bytes) -> None: ...


class SharedConsoleLog:
    """COM1 and the virtio console in one console log, never mixed within a line.

    COM1 (``primary``) is the interactive console and arrives byte by byte from the UART, so it is written through
    at once. The virtio console (``secondary``) goes in whole lines, each starting with ``prefix``, and only
    between COM1's lines: while COM1 is mid-line its lines wait for COM1's newline, or for COM1 to stay quiet for
    ``hold`` seconds (a prompt), when the log gets a line break first. Without this a line the guest wrote to
    hvc0 lands inside a COM1 line that the UART is still transmitting (the guest's tty drains asynchronously),
    and whoever parses the log loses both. A secondary line longer than ``max_line`` is cut there.

    Thread-safe: COM1 writes from vCPU threads, the console from its device thread, a held line from a timer.
    A primary sink error propagates to the UART (which counts it); a secondary one is counted in ``dropped``.
    """

    def __init__(self, sink: ConsoleSink, prefix: bytes = b"[hvc0] ", *, hold: float = 0.25,
                 max_line: int = 4096, clock: Callable[[], float] = time.monotonic,
                 timer: Callable[[float, Callable[[], None]], Any] | None = None) -> None:
        self.sink = sink
        self.prefix = prefix
        self.hold = hold
        self.max_line = max_line
        self.dropped = 0
        self._clock = clock
        self._timer_factory = timer if timer is not None else _daemon_timer
        self._timer: Any = None
        self._lock = threading.Lock()
        self._mid_line = False  # the log's last byte is not a newline: COM1 owns the line
        self._last_primary = 0.0
        self._partial = bytearray()  # the secondary's unfinished line
        self._held = bytearray()  # the secondary's finished lines, prefixed, waiting for a line start
        self.primary: ConsoleSink = _Stream(self._write_primary)
        self.secondary: ConsoleSink = _Stream(self._write_secondary)

    def _write_primary(self, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            self.sink.write(data)
            self._last_primary = self._clock()
            self._mid_line = not data.endswith(b"\n")
            if not self._mid_line:
                self._flush_held()

    def _write_secondary(self, data: bytes) -> None:
        with self._lock:
            self._partial += data
            cut = self._partial.rfind(b"\n") + 1
            if not cut and len(self._partial) >= self.max_line:
                self._partial += b"\n"
                cut = len(self._partial)
            if cut:
                self._held += self._prefixed(self._partial[:cut])
                del self._partial[:cut]
            self._pump()

    def _prefixed(self, lines: bytearray) -> bytes:
        out = bytearray()
        start = 0
        while start < len(lines):
            end = lines.index(b"\n", start) + 1
            out += self.prefix + lines[start:end]
            start = end
        return bytes(out)

    def _pump(self) -> None:
        """Under the lock: write what is held if COM1 is at a line start or has been quiet long enough."""
        if not self._held:
            return
        if self._mid_line:
            quiet = self._clock() - self._last_primary
            if quiet < self.hold:
                if self._timer is None:
                    self._timer = self._timer_factory(self.hold - quiet, self._expire)
                return
            self._emit(b"\n")  # break COM1's quiet partial line; its next bytes start a new line
            self._mid_line = False
        self._flush_held()

    def _expire(self) -> None:
        with self._lock:
            self._timer = None
            self._pump()

    def _flush_held(self) -> None:
        if self._held:
            data = bytes(self._held)
            self._held.clear()
            self._emit(data)

    def _emit(self, data: bytes) -> None:
        try:
            self.sink.write(data)
        except OSError:
            self.dropped += len(data)

    def close(self) -> None:
        """Write out whatever is still held or unfinished (the guest is gone)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._partial:
                self._held += self._prefixed(self._partial + b"\n")
                self._partial.clear()
            if self._held and self._mid_line:
                self._emit(b"\n")
                self._mid_line = False
            self._flush_held()


class _Stream:
    def __init__(self, write: Callable[[bytes], None]) -> None:
        self.write = write


def _daemon_timer(delay: float, fn: Callable[[], None]) -> threading.Timer:
    t = threading.Timer(delay, fn)
    t.daemon = True
    t.start()
    return t


@dataclass
class ConsoleMetrics:
    tx_chains: int = 0
    tx_bytes: int = 0
    rx_chains: int = 0
    rx_bytes: int = 0
    emerg_writes: int = 0
    input_refused: int = 0  # bytes enqueue_input could not take (buffer full)
    guest_errors: int = 0
    sink_errors: int = 0  # the sink raised (host problem); output lost, device keeps running


class Console(VirtioDevice):
    """virtio-console with a single port (§5.3)."""

    device_type = VIRTIO_ID_CONSOLE

    def __init__(
        self,
        sink: ConsoleSink | None = None,
        *,
        size: tuple[int, int] | None = None,
        queue_size: int = 256,
        max_pending_input: int = DEFAULT_MAX_PENDING_INPUT,
        budget: int = DEFAULT_BUDGET,
    ) -> None:
        if not (2 <= queue_size <= MAX_QUEUE_SIZE and queue_size & (queue_size - 1) == 0):
            raise ValueError(f"queue_size must be a power of two in 2..{MAX_QUEUE_SIZE}, got {queue_size}")
        if size is not None and not all(0 <= v <= 0xFFFF for v in size):
            raise ValueError(f"size (cols, rows) must be two u16 values, got {size}")
        if max_pending_input <= 0:
            raise ValueError(f"max_pending_input must be positive, got {max_pending_input}")
        if budget <= 0:
            raise ValueError(f"budget must be positive, got {budget}")
        self.sink = sink
        self.size = size
        self.queue_max_sizes = (queue_size, queue_size)
        self.max_pending_input = max_pending_input
        self.budget = budget
        self.acked_features = 0
        self.metrics = ConsoleMetrics()
        self._pending = bytearray()
        self._lock = threading.Lock()  # guards _pending and _loop against enqueue_input from other threads
        self._loop: _ConsoleLoop | None = None
        self._queues: list[SplitQueue] = []
        self._rlog = RateLimitedLog(log)

    @property
    def name(self) -> str:
        return "console"

    # ----------------------------------------------------------------- VirtioDevice
    def device_features(self) -> int:
        feats = (
            (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_EVENT_IDX)
            | (1 << VIRTIO_F_INDIRECT_DESC)
            | (1 << VIRTIO_CONSOLE_F_EMERG_WRITE)
        )
        if self.size is not None:
            feats |= 1 << VIRTIO_CONSOLE_F_SIZE
        return feats

    def config_bytes(self) -> bytes:
        cols, rows = self.size if self.size is not None else (0, 0)
        return _CONFIG.pack(cols, rows, 1, 0)  # emerg_wr reads as 0 (it is write-only in effect)

    def read_config(self, offset: int, data: memoryview) -> None:
        cfg = self.config_bytes()
        n = len(data)
        chunk = cfg[offset : offset + n] if 0 <= offset < len(cfg) else b""
        data[: len(chunk)] = chunk
        data[len(chunk) :] = bytes(n - len(chunk))

    def write_config(self, offset: int, data: bytes | memoryview) -> None:
        """§5.3.4: writing emerg_wr outputs its low byte as a character (only if EMERG_WRITE was offered, which
        it always is here; §5.3.5.1 lets the driver use it before DRIVER_OK). Other fields are read-only."""
        if offset == EMERG_WR_OFFSET and len(data) in (1, 2, 4):
            self.metrics.emerg_writes += 1
            self._emit(bytes(data[:1]))
        else:
            self._rlog.info("virtio-console: ignored config write at %d (%d bytes)", offset, len(data))

    def activate(self, mem: GuestMemory, queues: list[QueueConfig], health: DeviceHealth) -> None:
        self.reset()
        indirect = bool(self.acked_features & (1 << VIRTIO_F_INDIRECT_DESC))
        by_index: dict[int, SplitQueue] = {}
        try:
            for cfg in queues:
                q = SplitQueue(mem, cfg, indirect=indirect)
                self._queues.append(q)
                if cfg.index not in (RECEIVEQ, TRANSMITQ):
                    raise InvalidQueueConfig(f"console has no queue {cfg.index} (MULTIPORT not offered)")
                if cfg.size > self.queue_max_sizes[cfg.index]:
                    raise InvalidQueueConfig(f"queue {cfg.index}: size {cfg.size} > {self.queue_max_sizes[0]}")
                q.validate()
                by_index[cfg.index] = q
        except InvalidQueueConfig as e:
            self.metrics.guest_errors += 1
            health.needs_reset(f"console: {e}")
            self._close_queues()
            return
        loop = _ConsoleLoop(self, by_index.get(RECEIVEQ), by_index.get(TRANSMITQ), health)
        loop.start()
        with self._lock:
            self._loop = loop
            if self._pending:
                loop.wake()

    def reset(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            own = loop.in_thread()
            loop.stop()
            if own:
                self._queues = []  # the loop still holds the ring views until it unwinds
                return
        self._close_queues()

    def _close_queues(self) -> None:
        for q in self._queues:
            q.close()
        self._queues = []

    # ----------------------------------------------------------------- host side
    def enqueue_input(self, data: bytes) -> int:
        """Buffer input for the guest; returns how many leading bytes were taken (0 when the buffer is full).
        Thread-safe. Bytes taken are delivered in order as the driver posts receive buffers."""
        with self._lock:
            take = min(len(data), self.max_pending_input - len(self._pending))
            if take > 0:
                self._pending += data[:take]
            self.metrics.input_refused += len(data) - max(take, 0)
            # Woken under the lock: reset() detaches the loop under it too, so its eventfds are still open here.
            if take > 0 and self._loop is not None:
                self._loop.wake()
        return max(take, 0)

    def pending_input(self) -> int:
        with self._lock:
            return len(self._pending)

    def _emit(self, data: bytes) -> None:
        if self.sink is None or not data:
            return
        try:
            self.sink.write(data)
        except Exception as e:  # a host-side sink failure must not take the device down
            self.metrics.sink_errors += 1
            self._rlog.warning("virtio-console: sink failed: %r", e)

    # ----------------------------------------------------------------- chain handlers (worker thread)
    def handle_tx(self, chain: DescriptorChain) -> int:
        """Send a transmitq chain's bytes to the sink; returns 0 (the device writes nothing back, §5.3.6.2)."""
        if chain.writable_len:
            raise TxChainWritable(f"head {chain.head_index}")
        for view in chain.readable_views():
            self._emit(bytes(view))
        self.metrics.tx_chains += 1
        self.metrics.tx_bytes += chain.readable_len
        return 0

    def fill_rx(self, chain: DescriptorChain) -> int:
        """Copy pending input into a receiveq chain; returns the bytes written (> 0: only called with input)."""
        if chain.readable_len:
            raise RxChainReadable(f"head {chain.head_index}")
        w = chain.writer()
        with self._lock:
            n = min(w.remaining, len(self._pending))
            data = bytes(self._pending[:n])
            del self._pending[:n]
        w.write(data)
        self.metrics.rx_chains += 1
        self.metrics.rx_bytes += n
        return n

    def has_input(self) -> bool:
        with self._lock:
            return bool(self._pending)


class _ConsoleLoop(DeviceThread):
    """The device's worker thread: serve transmitq on kicks, receiveq whenever there is input and buffers."""

    def __init__(
        self, dev: Console, rxq: SplitQueue | None, txq: SplitQueue | None, health: DeviceHealth
    ) -> None:
        super().__init__("virtio-console", health)
        self.dev = dev
        self.rxq = rxq
        self.txq = txq
        self._input_fd = self.new_eventfd()
        self.dead = False

    def wake(self) -> None:
        try:
            os.eventfd_write(self._input_fd, 1)
        except OSError:
            pass  # closed by a concurrent stop(): nothing to wake

    def _close_fds(self) -> None:
        super()._close_fds()
        self._input_fd = -1

    def loop(self, ep: select.epoll, stop_fd: int) -> None:
        ep.register(self._input_fd, select.EPOLLIN)
        for q in (self.rxq, self.txq):
            if q is not None:
                ep.register(q.kick_fd, select.EPOLLIN)
        # Serve once at start: the driver may have queued output (or we input) before DRIVER_OK.
        again = True
        while not self._stopping and not self.dead:
            if not again:
                for fd, _ev in ep.poll(-1):
                    if fd == stop_fd:
                        return
                    drain_eventfd(fd)
                if self._stopping:
                    return
            again = False
            if self.txq is not None:
                again |= self._serve(self.txq, self.dev.handle_tx, lambda: True)
            if self.rxq is not None and not self.dead:
                again |= self._serve(self.rxq, self.dev.fill_rx, self.dev.has_input)

    def _serve(self, q: SplitQueue, handler: object, want: object) -> bool:
        """Pop and handle chains while ``want()``; True if the budget ran out (come back without a kick)."""
        budget = self.dev.budget
        try:
            while True:
                q.disable_notification()
                while budget and want() and not self._stopping:  # type: ignore[operator]
                    chain = q.pop()
                    if chain is None:
                        break
                    q.add_used(chain.head_index, handler(chain))  # type: ignore[operator]
                    budget -= 1
                if self._stopping:
                    return False
                if not budget:
                    q.signal_used()
                    return True
                # Out of chains or out of input. Re-arm kicks; with input still pending, re-check for chains
                # the driver published meanwhile (§2.7.10 race). Without input we do not care about new ones.
                if not q.enable_notification() or not want():  # type: ignore[operator]
                    break
            q.signal_used()
        except (VirtqueueError, GuestMemoryError) as e:
            self.dev.metrics.guest_errors += 1
            self.dev._rlog.warning("virtio-console queue %d: %s", q.index, e)
            self.fail(f"console queue {q.index}: {e}", [q])
        return False

    def fail(self, reason: str, queues: Iterable[SplitQueue | None] = ()) -> None:
        self.dead = True
        super().fail(reason, queues)
