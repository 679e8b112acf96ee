"""ACPI fixed-hardware power-management block (ACPI 6.5 §4.8 "ACPI Hardware Model", §4.8.3 "PM1 Event Grouping"):
the PM1a event and control registers and the PM timer, in the layout the FADT describes (kvmcore.layout):

    offset 0  PM1_STS  (2 bytes)  §4.8.3.1.1: write 1 to clear
    offset 2  PM1_EN   (2 bytes)  §4.8.3.1.2
    offset 4  PM1_CNT  (2 bytes)  §4.8.3.2.1: SCI_EN reads 1 (no SMI_CMD: always in ACPI mode); SLP_EN with
                                  SLP_TYP = the \\_S5 value powers the machine off
    offset 6  (reserved, 2 bytes)
    offset 8  PM_TMR   (4 bytes)  §4.8.3.3: 32-bit counter at 3.579545 MHz (FADT TMR_VAL_EXT), read-only

What this model chooses (QEMU hw/acpi/core.c is the reference for the rest):

* Each register takes 1- and 2-byte accesses (PM_TMR also 4), at any byte of it; an access crossing registers or
  wider than its register is counted in ``invalid_access``: reads see zeros, writes vanish.
* TMR_STS (the timer's bit 31 toggled) is computed when PM1_STS is read; no timer interrupt is emulated (Linux
  polls the PM timer and never sets TMR_EN), so TMR_EN is stored but raises nothing.
* The SCI is an edge on an injected trigger, raised when an enabled status bit (PWRBTN) becomes pending, either by
  :meth:`AcpiPm.power_button` or by the guest enabling an already-set one. The guest clears PWRBTN_STS in its
  handler, which ends that event.
* Sleep states other than S5 are counted in ``sleep_ignored`` and do nothing: kvmdm declares none (no \\_S1-\\_S4).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from devices.bus import BusDevice
from devices.irq import IrqTrigger
from devices.ratelimit import RateLimitedLog
from kvmcore import layout

log = logging.getLogger(__name__)

PM1_STS = layout.ACPI_PM1_EVT_OFFSET
PM1_EN = layout.ACPI_PM1_EVT_OFFSET + layout.ACPI_PM1_EVT_LEN // 2
PM1_CNT = layout.ACPI_PM1_CNT_OFFSET
PM_TMR = layout.ACPI_PM_TMR_OFFSET
RANGE_LENGTH = layout.ACPI_PM_LENGTH
_REGISTERS = {PM1_STS: 2, PM1_EN: 2, PM1_CNT: 2, PM_TMR: 4}  # offset -> width

# §4.8.3.1.1 Table 4.16 PM1 Status Registers Fixed Hardware Feature Status Bits.
TMR_STS = 1 << 0
BM_STS = 1 << 4
GBL_STS = 1 << 5
PWRBTN_STS = 1 << 8
SLPBTN_STS = 1 << 9
RTC_STS = 1 << 10
PCIEXP_WAKE_STS = 1 << 14
WAK_STS = 1 << 15
# §4.8.3.1.2 Table 4.17 PM1 Enable Registers.
TMR_EN = 1 << 0
GBL_EN = 1 << 5
PWRBTN_EN = 1 << 8
SLPBTN_EN = 1 << 9
RTC_EN = 1 << 10
PCIEXP_WAKE_DIS = 1 << 14
PM1_EN_WRITABLE = TMR_EN | GBL_EN | PWRBTN_EN | SLPBTN_EN | RTC_EN | PCIEXP_WAKE_DIS
SCI_SOURCES = PWRBTN_STS  # the status bits this model can set that raise an SCI when enabled
# §4.8.3.2.1 Table 4.18 PM1 Control Registers.
SCI_EN = 1 << 0
BM_RLD = 1 << 1
GBL_RLS = 1 << 2
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13  # write-only: reads 0
PM1_CNT_STORED = BM_RLD | SLP_TYP_MASK  # GBL_RLS is a write-only strobe (no BIOS to hand the lock to)

PM_TIMER_HZ = 3_579_545  # §4.8.3.3
PM_TIMER_MASK = 0xFFFF_FFFF
NS_PER_S = 1_000_000_000


@dataclass
class AcpiPmMetrics:
    invalid_access: int = 0  # crossed registers, too wide, or in the reserved hole
    ignored_writes: int = 0  # writes to the read-only PM timer
    sleep_ignored: int = 0  # SLP_EN with a sleep type other than S5
    poweroffs: int = 0
    sci_raised: int = 0


class AcpiPm(BusDevice):
    def __init__(self, on_poweroff: Callable[[], None], sci: IrqTrigger | None = None, *,
                 s5_slp_typ: int = layout.ACPI_S5_SLP_TYP, clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._on_poweroff = on_poweroff
        self._sci = sci
        self._s5 = s5_slp_typ
        self._clock_ns = clock_ns
        self._epoch_ns = clock_ns()
        self.status = 0
        self.enable = 0
        self.control = SCI_EN
        self._sci_pending = False
        self._tmr_wraps_seen = 0  # how many times bit 31 had toggled when the guest last cleared TMR_STS
        self.metrics = AcpiPmMetrics()
        self._log = RateLimitedLog(log, per_second=5)

    # ---- host side -------------------------------------------------------------------------------------------
    def timer_ticks(self) -> int:
        """PM timer ticks since power-on (unbounded; the register shows the low 32 bits)."""
        return (self._clock_ns() - self._epoch_ns) * PM_TIMER_HZ // NS_PER_S

    def power_button(self) -> None:
        """Press the fixed-feature power button (§4.8.2.2.1.1): PWRBTN_STS, and an SCI if the OS enabled it."""
        self.status |= PWRBTN_STS
        self._update_sci()

    # ---- bus side --------------------------------------------------------------------------------------------
    def _register(self, offset: int, size: int) -> tuple[int, int] | None:
        """(register offset, byte within it) when the access lies inside one register and fits it."""
        for base, width in _REGISTERS.items():
            if base <= offset and offset + size <= base + width and size in (1, 2, 4):
                return base, offset - base
        return None

    def _invalid(self, kind: str, offset: int, size: int) -> None:
        self.metrics.invalid_access += 1
        self._log.warning("acpi-pm: ignored %d-byte %s at offset %d", size, kind, offset)

    def read(self, offset: int, data: memoryview) -> None:
        hit = self._register(offset, len(data))
        if hit is None:
            self._invalid("read", offset, len(data))
            return
        base, byte = hit
        if base == PM1_STS:
            value = self._status()
        elif base == PM1_EN:
            value = self.enable
        elif base == PM1_CNT:
            value = self.control
        else:
            value = self.timer_ticks() & PM_TIMER_MASK
        data[:] = ((value >> (8 * byte)) & ((1 << (8 * len(data))) - 1)).to_bytes(len(data), "little")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        hit = self._register(offset, len(data))
        if hit is None:
            self._invalid("write", offset, len(data))
            return
        base, byte = hit
        shift = 8 * byte
        mask = ((1 << (8 * len(data))) - 1) << shift
        value = int.from_bytes(data, "little") << shift
        if base == PM1_STS:
            self._clear_status(value & mask)
        elif base == PM1_EN:
            self.enable = (self.enable & ~mask) | (value & mask & PM1_EN_WRITABLE)
            self._update_sci()
        elif base == PM1_CNT:
            self._write_control(value, mask)
        else:
            self.metrics.ignored_writes += 1

    def _status(self) -> int:
        if self.timer_ticks() >> 31 != self._tmr_wraps_seen:
            self.status |= TMR_STS  # bit 31 of the counter changed since the guest last cleared TMR_STS
        return self.status

    def _clear_status(self, bits: int) -> None:
        if bits & TMR_STS:
            self._tmr_wraps_seen = self.timer_ticks() >> 31
        self.status &= ~bits
        self._update_sci()

    def _write_control(self, value: int, mask: int) -> None:
        self.control = SCI_EN | (self.control & ~mask & PM1_CNT_STORED) | (value & mask & PM1_CNT_STORED)
        if value & mask & SLP_EN:
            slp_typ = (self.control & SLP_TYP_MASK) >> SLP_TYP_SHIFT
            if slp_typ == self._s5:
                self.metrics.poweroffs += 1
                self._on_poweroff()
            else:
                self.metrics.sleep_ignored += 1
                self._log.info("acpi-pm: guest asked for sleep type %d; only S5 (soft-off) is supported", slp_typ)

    def _update_sci(self) -> None:
        """Raise one SCI edge when an enabled event becomes pending; the line drops when none is."""
        pending = bool(self.status & self.enable & SCI_SOURCES)
        if pending and not self._sci_pending and self._sci is not None:
            self.metrics.sci_raised += 1
            self._sci.trigger()
        self._sci_pending = pending
