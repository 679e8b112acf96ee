"""i8042 keyboard controller, just enough for Linux's and SeaBIOS's probes and for the reset line.

Placement: one range, port 0x60 length 5. Offset 0 is the data port (0x60), offset 4 the command/status port
(0x64). Offsets 1-3 (ports 0x61-0x63) are not the i8042: they read 0 and ignore writes. Port 0x61 (system
control port B, PIT channel 2 gate and speaker) is handled inside KVM when the in-kernel PIT (KVM_CREATE_PIT2)
exists, so its accesses never reach this range; a VM without the in-kernel PIT must not rely on it here.

Modelled on vm-superio ``i8042.rs`` / Firecracker ``devices/legacy/i8042.rs`` (the reset command) and on QEMU
``hw/input/pckbd.c`` (status bits, controller commands) and ``hw/input/ps2.c`` (keyboard replies). Command
numbers and bits follow the IBM PS/2 "Keyboard/Auxiliary Device Controller" technical reference.

What is emulated:
* Status register: OBF (output buffer full), IBF (always 0: writes are consumed at once), SYS (system flag,
  set by self test or by command-byte bit 2), CMD/DATA (last write went to 0x64), keyboard not inhibited.
* Controller commands 0x20 (read command byte), 0x60 (write command byte), 0xAA (self test -> 0x55),
  0xAB (keyboard interface test -> 0x00), 0xA9 (aux interface test -> 0x02, "clock line stuck high": there is
  no aux port, so Linux's i8042_check_aux gives up on it), 0xAD/0xAE (disable/enable keyboard), 0xA7/0xA8
  (disable/enable aux), 0xD0/0xD1 (read/write output port; bit 0 clear = CPU reset), 0xD2 (write keyboard
  output buffer), 0xF0-0xFF (pulse output lines: an even value pulses the reset line; 0xFE is the usual one).
  Other commands are counted and ignored.
* A keyboard behind the controller that ACKs its commands (reset -> FA AA, get ID -> FA AB 83/41, echo, set
  LEDs / typematic / scan code set with their argument byte), so SeaBIOS's and atkbd's probes finish quickly.
  Guests may still be booted with ``i8042.noaux i8042.nomux`` (as Firecracker does) to skip the aux probing.
* IRQ1 (optional): an edge each time a byte is loaded into the output buffer while command-byte bit 0 is set.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from devices.bus import BusDevice
from devices.irq import IrqTrigger
from devices.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

DATA_OFFSET = 0  # port 0x60
COMMAND_OFFSET = 4  # port 0x64: write = command, read = status
RANGE_LENGTH = 5

# Status register bits.
STATUS_OBF = 0x01
STATUS_IBF = 0x02
STATUS_SYS = 0x04
STATUS_CMD = 0x08  # last write was to the command port
STATUS_UNLOCKED = 0x10  # keyboard not inhibited (keylock)

# Command byte ("mode") bits.
CTR_KBD_INT = 0x01
CTR_AUX_INT = 0x02
CTR_SYS = 0x04
CTR_KBD_DISABLE = 0x10
CTR_AUX_DISABLE = 0x20
CTR_XLATE = 0x40
DEFAULT_CTR = CTR_KBD_INT | CTR_AUX_INT  # QEMU's power-on mode (pckbd.c kbd_reset)

# Controller commands.
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPORT = 0xD0
CMD_WRITE_OUTPORT = 0xD1
CMD_WRITE_KBD_OBUF = 0xD2
CMD_PULSE_FIRST = 0xF0
CMD_RESET = 0xFE

SELF_TEST_OK = 0x55
INTERFACE_TEST_OK = 0x00
AUX_TEST_CLOCK_STUCK_HIGH = 0x02

# Output port bits.
OUTPORT_RESET = 0x01  # active low: 0 holds the CPU in reset
OUTPORT_A20 = 0x02
DEFAULT_OUTPORT = OUTPORT_RESET | OUTPORT_A20

# Keyboard (device) commands and replies (ps2.c).
KBD_CMD_SET_LEDS = 0xED
KBD_CMD_ECHO = 0xEE
KBD_CMD_SCANCODE = 0xF0
KBD_CMD_GET_ID = 0xF2
KBD_CMD_SET_RATE = 0xF3
KBD_CMD_ENABLE = 0xF4
KBD_CMD_RESET_DISABLE = 0xF5
KBD_CMD_RESET_ENABLE = 0xF6
KBD_CMD_RESET = 0xFF
KBD_REPLY_ACK = 0xFA
KBD_REPLY_POR = 0xAA  # basic assurance test passed
KBD_REPLY_ID = 0xAB
KBD_REPLY_RESEND = 0xFE
KBD_CMDS_WITH_ARG = (KBD_CMD_SET_LEDS, KBD_CMD_SET_RATE, KBD_CMD_SCANCODE)

OUTPUT_QUEUE_LIMIT = 16  # the controller's byte plus a short keyboard FIFO; bounded whatever the guest does


@dataclass
class I8042Metrics:
    resets: int = 0
    unknown_commands: int = 0
    invalid_access: int = 0
    irqs: int = 0
    overflow: int = 0  # reply bytes dropped because the guest never read the output buffer


class I8042(BusDevice):
    def __init__(self, on_reset: Callable[[], None], irq1: IrqTrigger | None = None) -> None:
        self._on_reset = on_reset
        self._irq1 = irq1
        self.metrics = I8042Metrics()
        self._log = RateLimitedLog(log, per_second=5)
        self.reset()

    def reset(self) -> None:
        """Power-on state (the builder calls this when it resets the VM)."""
        self.ctr = DEFAULT_CTR
        self.outport = DEFAULT_OUTPORT
        self._status = STATUS_CMD | STATUS_UNLOCKED
        self._out: deque[int] = deque()
        self._pending_cmd: int | None = None  # controller command waiting for its data byte
        self._kbd_pending: int | None = None  # keyboard command waiting for its argument byte
        self._scancode_set = 2

    # ---- bus side --------------------------------------------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        if len(data) != 1:
            self._invalid("read", offset, len(data))
            return
        if offset == DATA_OFFSET:
            data[0] = self._read_data()
        elif offset == COMMAND_OFFSET:
            data[0] = self.status
        # 0x61-0x63: not ours, read as 0 (the bus pre-fills zeros).

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if len(data) != 1:
            self._invalid("write", offset, len(data))
            return
        if offset == DATA_OFFSET:
            self._status &= ~STATUS_CMD
            self._write_data(data[0])
        elif offset == COMMAND_OFFSET:
            self._status |= STATUS_CMD
            self._command(data[0])

    def _invalid(self, kind: str, offset: int, size: int) -> None:
        self.metrics.invalid_access += 1
        self._log.warning("i8042: ignored %d-byte %s at offset %d", size, kind, offset)

    @property
    def status(self) -> int:
        return self._status | (STATUS_OBF if self._out else 0)

    # ---- output buffer ---------------------------------------------------------------------------------

    def _queue(self, *values: int) -> None:
        for value in values:
            if len(self._out) >= OUTPUT_QUEUE_LIMIT:
                self.metrics.overflow += 1
                continue
            self._out.append(value)
            if len(self._out) == 1:
                self._loaded()

    def _loaded(self) -> None:
        # A byte just entered the output buffer: IRQ1 rises if the command byte enables it.
        if self._irq1 is not None and self.ctr & CTR_KBD_INT:
            self.metrics.irqs += 1
            self._irq1.trigger()

    def _read_data(self) -> int:
        if not self._out:
            return 0
        value = self._out.popleft()
        if self._out:
            self._loaded()
        return value

    # ---- controller commands ---------------------------------------------------------------------------

    def _command(self, cmd: int) -> None:
        self._pending_cmd = None
        if cmd == CMD_READ_CTR:
            self._queue(self.ctr)
        elif cmd in (CMD_WRITE_CTR, CMD_WRITE_OUTPORT, CMD_WRITE_KBD_OBUF):
            self._pending_cmd = cmd
        elif cmd == CMD_SELF_TEST:
            self._status |= STATUS_SYS
            self._queue(SELF_TEST_OK)
        elif cmd == CMD_KBD_TEST:
            self._queue(INTERFACE_TEST_OK)
        elif cmd == CMD_AUX_TEST:
            self._queue(AUX_TEST_CLOCK_STUCK_HIGH)
        elif cmd == CMD_KBD_DISABLE:
            self.ctr |= CTR_KBD_DISABLE
        elif cmd == CMD_KBD_ENABLE:
            self.ctr &= ~CTR_KBD_DISABLE
        elif cmd == CMD_AUX_DISABLE:
            self.ctr |= CTR_AUX_DISABLE
        elif cmd == CMD_AUX_ENABLE:
            self.ctr &= ~CTR_AUX_DISABLE
        elif cmd == CMD_READ_OUTPORT:
            self._queue(self.outport)
        elif cmd >= CMD_PULSE_FIRST:
            # Pulse output port bits 0-3 low where the command's low nibble has a 0; bit 0 is the reset line.
            if not cmd & OUTPORT_RESET:
                self._reset_cpu(f"pulse 0x{cmd:02x}")
        else:
            self.metrics.unknown_commands += 1
            self._log.info("i8042: unknown command 0x%02x ignored", cmd)

    def _write_data(self, value: int) -> None:
        cmd, self._pending_cmd = self._pending_cmd, None
        if cmd == CMD_WRITE_CTR:
            self.ctr = value
            # The status SYS flag mirrors command-byte bit 2 (PS/2 technical reference, command byte).
            if value & CTR_SYS:
                self._status |= STATUS_SYS
            else:
                self._status &= ~STATUS_SYS
        elif cmd == CMD_WRITE_OUTPORT:
            self.outport = value
            if not value & OUTPORT_RESET:
                self._reset_cpu(f"output port 0x{value:02x}")
        elif cmd == CMD_WRITE_KBD_OBUF:
            self._queue(value)
        else:
            self._keyboard(value)

    def _reset_cpu(self, why: str) -> None:
        self.metrics.resets += 1
        self._log.info("i8042: CPU reset requested (%s)", why)
        self._on_reset()

    # ---- the keyboard behind the controller ------------------------------------------------------------

    def _keyboard(self, value: int) -> None:
        arg_for, self._kbd_pending = self._kbd_pending, None
        if arg_for is not None:
            if arg_for == KBD_CMD_SCANCODE:
                if value == 0:
                    self._queue(KBD_REPLY_ACK, self._scancode_set)
                    return
                if value in (1, 2, 3):
                    self._scancode_set = value
            self._queue(KBD_REPLY_ACK)
            return
        if value in KBD_CMDS_WITH_ARG:
            self._kbd_pending = value
            self._queue(KBD_REPLY_ACK)
        elif value == KBD_CMD_ECHO:
            self._queue(KBD_CMD_ECHO)
        elif value == KBD_CMD_GET_ID:
            # MF2 keyboard; with translation the controller hands the second ID byte over translated (ps2.c).
            self._queue(KBD_REPLY_ACK, KBD_REPLY_ID, 0x41 if self.ctr & CTR_XLATE else 0x83)
        elif value == KBD_CMD_RESET:
            self._scancode_set = 2
            self._queue(KBD_REPLY_ACK, KBD_REPLY_POR)
        elif value in (KBD_CMD_ENABLE, KBD_CMD_RESET_DISABLE, KBD_CMD_RESET_ENABLE):
            self._queue(KBD_REPLY_ACK)
        else:
            self._queue(KBD_REPLY_RESEND)
