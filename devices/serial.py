"""16550A UART as a sans-I/O state machine (the COM1 console at port 0x3f8, 8 registers).

Modelled on rust-vmm vm-superio ``serial.rs`` and QEMU ``hw/char/serial.c``; register semantics follow the
TI/National PC16550D datasheet (sections "Register Descriptions" 8.1-8.9). What this model chooses:

* Transmission is instantaneous: a THR write goes straight to the sink (or, in loopback, to the RX side), so
  LSR.THRE and LSR.TEMT always read 1 and the THRE interrupt re-arms right after each write. (With a C half,
  :meth:`Serial.attach_accel`, bytes written in C reach the sink in order through a TX ring, up to ~1 ms later.)
* The RX FIFO holds 16 bytes with FCR.FE set and 1 byte (the 16450-mode RBR) without. Host input is flow
  controlled: :meth:`Serial.enqueue_input` takes only what fits and says how much, so host input never overruns.
  Overruns (LSR.OE) only happen in loopback, where the guest is both ends of the line.
* There are no timers. Host input arrives in batches, so once a batch is queued the line is idle: with FIFOs
  enabled and fewer bytes queued than the trigger level, IIR reports the character-timeout interrupt (0xC)
  at once instead of four character times later. Linux's 8250 driver treats 0x4 and 0xC alike.
* Interrupts are edges on an :class:`~devices.irq.IrqTrigger`: one edge whenever an enabled interrupt condition
  appears that was not pending before, plus one per batch of received bytes when IER.ERBFI is set (a guest
  that drained the FIFO in its handler may otherwise miss a batch that landed while it was running).
* Accesses wider than one byte are not UART accesses (Linux and SeaBIOS use ``inb``/``outb``): counted in
  ``invalid_access``, reads return zeros, writes vanish.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from devices.bus import BusDevice
from devices.irq import IrqTrigger
from devices.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

# Register offsets (16550D table 2). Offsets 0 and 1 switch to the divisor latch while LCR.DLAB is set.
DATA = 0  # read: RBR, write: THR; DLL under DLAB
IER = 1  # DLM under DLAB
IIR = 2  # read: IIR, write: FCR
FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
NUM_REGS = 8

# IER bits (16550D 8.4).
IER_ERBFI = 0x01  # received data available (and character timeout)
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status
IER_MASK = 0x0F  # bits 4-7 are always 0 on a 16550

# IIR interrupt identification codes, highest priority first (16550D table 4).
IIR_NONE = 0x01
IIR_RLS = 0x06
IIR_RDA = 0x04
IIR_CTI = 0x0C
IIR_THRE = 0x02
IIR_MS = 0x00
IIR_FIFO_ENABLED = 0xC0

# FCR bits (16550D 8.5).
FCR_FE = 0x01
FCR_RX_RESET = 0x02
FCR_TX_RESET = 0x04
FCR_DMA_MODE = 0x08
FCR_TRIGGER_MASK = 0xC0
FCR_STICKY = FCR_FE | FCR_DMA_MODE | FCR_TRIGGER_MASK  # the bits that are stored (reset bits self-clear)
RX_TRIGGER_LEVELS = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}

LCR_DLAB = 0x80

# MCR bits (16550D 8.7); bits 5-7 are always 0.
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

# LSR bits (16550D 8.6).
LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI  # the bits that raise the line-status interrupt

# MSR bits (16550D 8.8): low nibble are deltas, high nibble the modem input lines.
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F
# With no loopback we model a terminal that is always there: carrier, data set ready and clear to send.
MSR_LINES_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS

FIFO_CAPACITY = 16

# Power-on values (9600 baud 8N1 as QEMU and vm-superio; OUT2 set because PC UARTs gate the IRQ line on it).
DEFAULT_DIVISOR = 0x000C
DEFAULT_LCR = 0x03
DEFAULT_MCR = MCR_OUT2


class SerialSink(Protocol):
    """Where transmitted bytes go. With the UART's C half (attach_accel) bytes may arrive in batches, from the
    thread that drains its TX ring, up to about a millisecond after the guest wrote them; a sink that needs each
    byte at the exit that wrote it (a bench timestamping markers) sets a true ``synchronous`` attribute, and then
    every THR write is handled in Python."""

    def write(self, data: bytes) -> None:
        """Take bytes the guest transmitted. May raise OSError; the UART then counts the bytes as dropped."""


class SerialAccel(Protocol):
    """The C half of the UART (kvmcore.fastrun.UartAccel): ``with accel:`` excludes the C loop; ``publish`` tells it
    what each register read returns and which reads and THR writes it may answer; ``take`` reports what it did
    (a THR write happened; THRE edges it signalled); ``pop_tx`` takes the bytes it queued for the sink."""

    on_flush: Callable[[], None] | None

    def __enter__(self) -> None: ...

    def __exit__(self, *exc: object) -> None: ...

    def publish(self, values: bytes, rd_fast: int, thr_mode: int) -> None: ...

    def take(self) -> tuple[bool, int]: ...

    def pop_tx(self) -> bytes: ...


# SerialAccel.publish's thr_mode (kvmcore.fastrun's THR_* values): THR writes stay in Python; go to the TX ring;
# go to the ring and signal one THRE edge each.
THR_PYTHON, THR_RING, THR_RING_IRQ = 0, 1, 2
# Reads of IER/DLM, LCR, MCR and SCR never change state; RBR, IIR, LSR and MSR reads only in some states.
_ALWAYS_FAST_READS = (1 << IER) | (1 << LCR) | (1 << MCR) | (1 << SCR)


class InvalidSerialState(ValueError):
    """A SerialState snapshot has a field out of range or inconsistent with the others; it was not restored."""


@dataclass
class SerialMetrics:
    tx_bytes: int = 0  # bytes handed to the sink
    rx_bytes: int = 0  # bytes the guest read from RBR
    rx_enqueued: int = 0  # bytes the host queued through enqueue_input
    dropped: int = 0  # THR bytes with no sink, a failing sink, or lost to a loopback overrun
    overruns: int = 0
    irqs: int = 0
    invalid_access: int = 0


@dataclass
class SerialState:
    """Everything needed to recreate the UART. ``rx_fifo`` holds unread received bytes, oldest first."""

    divisor_low: int = DEFAULT_DIVISOR & 0xFF
    divisor_high: int = DEFAULT_DIVISOR >> 8
    ier: int = 0
    fcr: int = 0
    lcr: int = DEFAULT_LCR
    mcr: int = DEFAULT_MCR
    line_errors: int = 0  # LSR error bits (OE/PE/FE/BI); DR, THRE and TEMT are derived
    msr_deltas: int = 0  # MSR low nibble
    scr: int = 0
    thre_pending: bool = False
    rx_fifo: bytes = field(default=b"")

    def validate(self) -> None:
        for name in (
            "divisor_low",
            "divisor_high",
            "ier",
            "fcr",
            "lcr",
            "mcr",
            "line_errors",
            "msr_deltas",
            "scr",
        ):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= 0xFF:
                raise InvalidSerialState(f"{name}={value!r} is not a byte")
        checks = (
            ("ier", self.ier, IER_MASK),
            ("fcr", self.fcr, FCR_STICKY),
            ("mcr", self.mcr, MCR_MASK),
            ("line_errors", self.line_errors, LSR_ERRORS),
            ("msr_deltas", self.msr_deltas, MSR_DELTAS),
        )
        for name, value, allowed in checks:
            if value & ~allowed:
                raise InvalidSerialState(f"{name}=0x{value:02x} sets bits outside 0x{allowed:02x}")
        if type(self.thre_pending) is not bool:
            raise InvalidSerialState(f"thre_pending={self.thre_pending!r} is not a bool")
        if not isinstance(self.rx_fifo, bytes):
            raise InvalidSerialState(f"rx_fifo is {type(self.rx_fifo).__name__}, not bytes")
        capacity = FIFO_CAPACITY if self.fcr & FCR_FE else 1
        if len(self.rx_fifo) > capacity:
            raise InvalidSerialState(f"rx_fifo holds {len(self.rx_fifo)} bytes, capacity is {capacity}")


def _loopback_lines(mcr: int) -> int:
    """In loopback the modem outputs drive the inputs (16550D 8.7, bit 4): DTR->DSR, RTS->CTS, OUT1->RI,
    OUT2->DCD."""
    lines = 0
    if mcr & MCR_DTR:
        lines |= MSR_DSR
    if mcr & MCR_RTS:
        lines |= MSR_CTS
    if mcr & MCR_OUT1:
        lines |= MSR_RI
    if mcr & MCR_OUT2:
        lines |= MSR_DCD
    return lines


class Serial(BusDevice):
    _dll: int
    _dlm: int
    _ier: int
    _fcr: int
    _lcr: int
    _mcr: int
    _line_errors: int
    _msr_deltas: int
    _scr: int
    _thre_pending: bool
    _rx: deque[int]

    def __init__(self, irq: IrqTrigger, sink: SerialSink | None = None) -> None:
        self._irq = irq
        self._sink = sink
        self._accel: SerialAccel | None = None
        self.metrics = SerialMetrics()
        self._log = RateLimitedLog(log, per_second=5)
        self._set_state(SerialState())
        self._last_pending = self._pending()

    # ---- host side -------------------------------------------------------------------------------------

    def _capacity(self) -> int:
        return FIFO_CAPACITY if self._fcr & FCR_FE else 1

    def rx_space(self) -> int:
        """How many bytes enqueue_input would take now. 0 in loopback: the serial input pin is disconnected."""
        if self._mcr & MCR_LOOP:
            return 0
        return self._capacity() - len(self._rx)

    def enqueue_input(self, data: bytes) -> int:
        """Queue host bytes for the guest to read; returns how many were taken (the caller retries the rest)."""
        acc = self._accel
        if acc is None:
            return self._enqueue(data)
        with acc:
            self._absorb()
            n = self._enqueue(data)
            self._publish()
        return n

    def _enqueue(self, data: bytes) -> int:
        n = min(len(data), self.rx_space())
        if n <= 0:
            return 0
        self._rx.extend(data[:n])
        self.metrics.rx_enqueued += n
        self._update_irq(force=bool(self._ier & IER_ERBFI))
        return n

    # ---- bus side --------------------------------------------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        if len(data) != 1 or not 0 <= offset < NUM_REGS:
            self._invalid("read", offset, len(data))
            return
        acc = self._accel
        if acc is None:
            data[0] = self._read_reg(offset)
            return
        with acc:
            self._absorb()
            data[0] = self._read_reg(offset)
            self._publish()

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if len(data) != 1 or not 0 <= offset < NUM_REGS:
            self._invalid("write", offset, len(data))
            return
        acc = self._accel
        if acc is None:
            self._write_reg(offset, data[0])
            return
        with acc:
            self._absorb()
            self._write_reg(offset, data[0])
            self._publish()

    # ---- the C half (kvmcore.fastrun.UartAccel) --------------------------------------------------------
    #
    # This class stays the whole UART; the C loop only answers accesses whose outcome Python has published and
    # that change nothing Python must know at once: side-effect-free register reads (from the values published
    # after every change made here), and THR writes while DLAB and loopback are off, a sink exists, and the write
    # cannot change THRE's interrupt state (ETBEI off, or THRE already pending: the reference then signals exactly
    # one edge per byte, which C signals too). What C did is folded in here before every access and flush
    # (``_absorb``): THRE pending again after its writes (invisible to the guest in those states), its edges in
    # metrics.irqs. Its bytes wait in a TX ring that ``flush_tx`` (and, to keep the order, any Python-path THR
    # write) empties into the sink; tx_bytes and dropped count them then. Callers serialize all methods, as
    # without the accelerator (the VMM's device lock); the accelerator's own mutex excludes the C loop.

    @property
    def fast_accel(self) -> SerialAccel | None:
        """The C half serving this UART's ports (devices.bus.Bus.accelerated)."""
        return self._accel

    def attach_accel(self, accel: SerialAccel) -> None:
        self._accel = accel
        accel.on_flush = self.flush_tx
        with accel:
            self._publish()

    def flush_tx(self) -> None:
        """Hand the bytes the C loop transmitted to the sink, and fold in its interrupt count."""
        acc = self._accel
        if acc is None:
            return
        with acc:
            self._absorb()
        self._drain_ring(acc)

    def _drain_ring(self, acc: SerialAccel) -> None:
        while chunk := acc.pop_tx():
            self._sink_write(chunk)

    def _absorb(self) -> None:
        assert self._accel is not None
        thre, irqs = self._accel.take()
        if thre:
            self._thre_pending = True
        self.metrics.irqs += irqs

    def _publish(self) -> None:
        assert self._accel is not None
        dlab = self._lcr & LCR_DLAB
        fast = _ALWAYS_FAST_READS
        rbr = 0
        if dlab:
            rbr = self._dll
            fast |= 1 << DATA
        elif not self._rx:
            fast |= 1 << DATA  # an empty RBR reads 0 and changes nothing
        iir = self._iir()
        if iir & 0x0F != IIR_THRE:  # reading IIR=THRE resets the THRE interrupt
            fast |= 1 << IIR
        if not self._line_errors:  # reading LSR resets the error bits
            fast |= 1 << LSR
        if not self._msr_deltas:  # reading MSR resets the deltas
            fast |= 1 << MSR
        values = bytes((rbr, self._dlm if dlab else self._ier, iir, self._lcr, self._mcr, self._lsr(),
                        self._modem_lines() | self._msr_deltas, self._scr))
        if dlab or self._mcr & MCR_LOOP or self._sink is None or getattr(self._sink, "synchronous", False):
            thr = THR_PYTHON
        elif not self._ier & IER_ETBEI:
            thr = THR_RING
        elif self._thre_pending:
            thr = THR_RING_IRQ
        else:
            thr = THR_PYTHON  # this write makes THRE newly pending: IIR changes, Python recomputes it
        self._accel.publish(values, fast, thr)

    def _invalid(self, kind: str, offset: int, size: int) -> None:
        self.metrics.invalid_access += 1
        self._log.warning("serial: ignored %d-byte %s at offset %d", size, kind, offset)

    def _read_reg(self, offset: int) -> int:
        dlab = bool(self._lcr & LCR_DLAB)
        if offset == DATA:
            if dlab:
                return self._dll
            if not self._rx:
                return 0  # an empty RBR reads 0 (as QEMU) and changes nothing
            value = self._rx.popleft()
            self.metrics.rx_bytes += 1
            self._update_irq()
            return value
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR:
            iir = self._iir()
            # 16550D table 4: reading IIR when it reports THRE is one of the two ways to reset that interrupt.
            if iir & 0x0F == IIR_THRE:
                self._thre_pending = False
                self._update_irq()
            return iir
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            value = self._lsr()
            # 16550D 8.6: OE, PE, FE and BI are reset whenever the CPU reads the LSR.
            if self._line_errors:
                self._line_errors = 0
                self._update_irq()
            return value
        if offset == MSR:
            value = self._modem_lines() | self._msr_deltas
            # 16550D 8.8: the delta bits are reset when the CPU reads the MSR.
            if self._msr_deltas:
                self._msr_deltas = 0
                self._update_irq()
            return value
        return self._scr

    def _write_reg(self, offset: int, value: int) -> None:
        dlab = bool(self._lcr & LCR_DLAB)
        if offset == DATA:
            if dlab:
                self._dll = value
            else:
                self._transmit(value)
        elif offset == IER:
            if dlab:
                self._dlm = value
            else:
                old = self._ier
                self._ier = value & IER_MASK
                newly = self._ier & ~old
                if newly & IER_ETBEI:
                    # Enabling ETBEI while THR is empty (always, here) raises THRE at once, as the 8250 driver's
                    # THRE probing in serial8250_do_startup expects of a real 16550.
                    self._thre_pending = True
                elif not self._ier & IER_ETBEI:
                    self._thre_pending = False
                self._update_irq()
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            before = self._modem_lines()
            self._mcr = value & MCR_MASK
            self._note_modem_change(before, self._modem_lines())
            self._update_irq()
        elif offset == SCR:
            self._scr = value
        # LSR and MSR writes: the datasheet reserves them for factory test; QEMU ignores them too.

    def _write_fcr(self, value: int) -> None:
        if (value ^ self._fcr) & FCR_FE:
            # Changing FCR.FE clears both FIFOs (16550D 8.5, bit 0).
            value |= FCR_RX_RESET | FCR_TX_RESET
        if value & FCR_RX_RESET:
            self._rx.clear()
        if value & FCR_TX_RESET:
            # The (instantaneous) TX FIFO is already empty; like QEMU, a TX reset re-arms THRE.
            self._thre_pending = True
        self._fcr = value & FCR_STICKY
        self._update_irq()

    def _transmit(self, value: int) -> None:
        # Writing THR resets the THRE interrupt (16550D table 4); the byte leaves at once and THR is empty again.
        self._thre_pending = False
        self._update_irq()
        if self._mcr & MCR_LOOP:
            self._loopback_receive(value)
        else:
            if self._accel is not None:
                self._drain_ring(self._accel)  # bytes the C loop sent earlier go first
            self._sink_write(bytes((value,)))
        self._thre_pending = True
        self._update_irq()

    def _sink_write(self, data: bytes) -> None:
        if self._sink is None:
            self.metrics.dropped += len(data)
            return
        try:
            self._sink.write(data)
            self.metrics.tx_bytes += len(data)
        except OSError as e:
            self.metrics.dropped += len(data)
            self._log.warning("serial: sink write failed: %s", e)

    def _loopback_receive(self, value: int) -> None:
        if len(self._rx) < self._capacity():
            self._rx.append(value)
            return
        # Overrun (16550D 8.6, bit 1): in FIFO mode the new character is lost; in 16450 mode it overwrites RBR.
        self._line_errors |= LSR_OE
        self.metrics.overruns += 1
        if self._fcr & FCR_FE:
            self.metrics.dropped += 1
        else:
            self._rx[0] = value

    # ---- derived registers -----------------------------------------------------------------------------

    def _modem_lines(self) -> int:
        return _loopback_lines(self._mcr) if self._mcr & MCR_LOOP else MSR_LINES_CONNECTED

    def _note_modem_change(self, before: int, after: int) -> None:
        changed = before ^ after
        if changed & MSR_CTS:
            self._msr_deltas |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_deltas |= MSR_DDSR
        if changed & MSR_DCD:
            self._msr_deltas |= MSR_DDCD
        if before & MSR_RI and not after & MSR_RI:
            # TERI is set on the trailing edge of RI only (16550D 8.8, bit 2).
            self._msr_deltas |= MSR_TERI

    def _lsr(self) -> int:
        lsr = LSR_THRE | LSR_TEMT | self._line_errors
        if self._rx:
            lsr |= LSR_DR
        return lsr

    def _pending(self) -> int:
        """Bitmask of the enabled interrupt conditions that are active (IER bit positions)."""
        pending = 0
        if self._ier & IER_ELSI and self._line_errors:
            pending |= IER_ELSI
        if self._ier & IER_ERBFI and self._rx:
            pending |= IER_ERBFI
        if self._ier & IER_ETBEI and self._thre_pending:
            pending |= IER_ETBEI
        if self._ier & IER_EDSSI and self._msr_deltas:
            pending |= IER_EDSSI
        return pending

    def _iir(self) -> int:
        pending = self._pending()
        fifo_bits = IIR_FIFO_ENABLED if self._fcr & FCR_FE else 0
        # Priority order of 16550D table 4: line status > received data / timeout > THRE > modem status.
        if pending & IER_ELSI:
            ident = IIR_RLS
        elif pending & IER_ERBFI:
            below_trigger = (
                self._fcr & FCR_FE and len(self._rx) < RX_TRIGGER_LEVELS[self._fcr & FCR_TRIGGER_MASK]
            )
            ident = IIR_CTI if below_trigger else IIR_RDA
        elif pending & IER_ETBEI:
            ident = IIR_THRE
        elif pending & IER_EDSSI:
            ident = IIR_MS
        else:
            ident = IIR_NONE
        return fifo_bits | ident

    def _update_irq(self, force: bool = False) -> None:
        """Signal one edge when an enabled condition is newly active (or ``force``: a new RX batch)."""
        pending = self._pending()
        rising = pending & ~self._last_pending
        self._last_pending = pending
        if rising or (force and pending):
            self.metrics.irqs += 1
            self._irq.trigger()

    # ---- snapshot --------------------------------------------------------------------------------------

    def _set_state(self, state: SerialState) -> None:
        self._dll = state.divisor_low
        self._dlm = state.divisor_high
        self._ier = state.ier
        self._fcr = state.fcr
        self._lcr = state.lcr
        self._mcr = state.mcr
        self._line_errors = state.line_errors
        self._msr_deltas = state.msr_deltas
        self._scr = state.scr
        self._thre_pending = state.thre_pending
        self._rx = deque(state.rx_fifo)

    def snapshot(self) -> SerialState:
        if self._accel is not None:
            with self._accel:
                self._absorb()
        return SerialState(
            divisor_low=self._dll,
            divisor_high=self._dlm,
            ier=self._ier,
            fcr=self._fcr,
            lcr=self._lcr,
            mcr=self._mcr,
            line_errors=self._line_errors,
            msr_deltas=self._msr_deltas,
            scr=self._scr,
            thre_pending=self._thre_pending,
            rx_fifo=bytes(self._rx),
        )

    @classmethod
    def restore(cls, state: SerialState, irq: IrqTrigger, sink: SerialSink | None = None) -> Serial:
        """Recreate a UART from a snapshot; raises InvalidSerialState. Re-signals a pending interrupt, since an
        edge in flight when the snapshot was taken may not have reached the guest (as vm-superio does)."""
        state.validate()
        serial = cls(irq, sink)
        serial._set_state(state)
        serial._last_pending = 0
        serial._update_irq()
        return serial

    @property
    def divisor(self) -> int:
        return self._dlm << 8 | self._dll
