"""MC146818 CMOS RTC and NVRAM at port 0x70, length 2 (offset 0 = index port 0x70, offset 1 = data port 0x71).

Register semantics follow the Motorola MC146818A datasheet ("Address Map", "Registers A-D") and QEMU
``hw/rtc/mc146818rtc.c``; the memory-size bytes follow QEMU ``pc_cmos_init`` (hw/i386/pc.c).

* Index port: bits 0-6 select one of 128 CMOS bytes; bit 7 is the chipset's NMI-disable gate, which is stored
  (``nmi_disabled``) and masked from the index. Reading the index port returns 0xFF, as QEMU does (it is
  write-only on a PC).
* Time registers 0x00/0x02/0x04/0x06/0x07/0x08/0x09 and the century byte 0x32 are computed on every read from
  an injectable clock ``now()`` (UTC) plus a guest-set offset, in the format register B selects: bit 2 (DM)
  binary vs BCD, bit 1 (24/12) 24-hour vs 12-hour with PM in bit 7 of the hours byte.
* Register B bit 7 (SET) freezes the clock: the current time is latched into the registers, guest writes to
  them are stored, and clearing SET turns what the guest wrote into a new offset. A time-register write
  outside SET mode takes effect at once, as on the chip (and in QEMU).
* Register A: UIP (bit 7) always reads 0 (updates are atomic here); the divider and rate bits are storage.
  Register C reads as 0 and is cleared by reading (no alarm, periodic or update interrupts are emulated, so no
  flags are ever set). Register D reads 0x80 (VRT: the battery is good). Writes to C and D are ignored.
* Everything else (alarm bytes 0x01/0x03/0x05, 0x0E-0x7F) is plain NVRAM.
"""

from __future__ import annotations

import calendar
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from devices.bus import BusDevice
from devices.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

INDEX_OFFSET = 0
DATA_OFFSET = 1
RANGE_LENGTH = 2
CMOS_SIZE = 128

NMI_DISABLE = 0x80
INDEX_MASK = 0x7F

REG_SECONDS = 0x00
REG_MINUTES = 0x02
REG_HOURS = 0x04
REG_DAY_OF_WEEK = 0x06
REG_DAY_OF_MONTH = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32  # IBM PC/AT convention; ACPI FADT CENTURY points here in QEMU
TIME_REGS = (
    REG_SECONDS,
    REG_MINUTES,
    REG_HOURS,
    REG_DAY_OF_WEEK,
    REG_DAY_OF_MONTH,
    REG_MONTH,
    REG_YEAR,
    REG_CENTURY,
)

REG_A_UIP = 0x80
REG_B_SET = 0x80
REG_B_UIE = 0x10
REG_B_DM_BINARY = 0x04
REG_B_24H = 0x02
REG_D_VRT = 0x80
HOURS_PM = 0x80

DEFAULT_REG_A = 0x26  # 32.768 kHz time base, 1024 Hz rate select (QEMU's reset value)
DEFAULT_REG_B = REG_B_24H  # 24-hour, BCD (QEMU's reset value)

# Memory-size bytes read by SeaBIOS and other PC firmware (QEMU pc_cmos_init).
CMOS_BASE_MEM_LO = 0x15
CMOS_BASE_MEM_HI = 0x16
CMOS_EXT_MEM_LO = 0x17
CMOS_EXT_MEM_HI = 0x18
CMOS_EXT_MEM_COPY_LO = 0x30
CMOS_EXT_MEM_COPY_HI = 0x31
CMOS_MEM_ABOVE_16M_LO = 0x34
CMOS_MEM_ABOVE_16M_HI = 0x35
CMOS_MEM_ABOVE_4G_LO = 0x5B
CMOS_MEM_ABOVE_4G_MID = 0x5C
CMOS_MEM_ABOVE_4G_HI = 0x5D
CMOS_NCPUS_MINUS_ONE = 0x5F

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


class CmosConfigError(ValueError):
    """A memory size or vCPU count cannot be described in the CMOS bytes firmware reads."""


@dataclass
class RtcMetrics:
    invalid_access: int = 0
    invalid_time: int = 0  # guest set a date that does not exist; the clock kept its old offset


def _to_bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def _from_bcd(value: int) -> int | None:
    hi, lo = value >> 4, value & 0x0F
    if hi > 9 or lo > 9:
        return None
    return hi * 10 + lo


class Rtc(BusDevice):
    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self.cmos = bytearray(CMOS_SIZE)
        self.cmos[REG_A] = DEFAULT_REG_A
        self.cmos[REG_B] = DEFAULT_REG_B
        self.cmos[REG_D] = REG_D_VRT
        self.index = 0
        self.nmi_disabled = False
        self.offset = 0.0  # guest time minus host time, seconds
        self.metrics = RtcMetrics()
        self._log = RateLimitedLog(log, per_second=5)

    # ---- host side -------------------------------------------------------------------------------------

    def set_memory_size(self, below_4g: int, above_4g: int, ncpus: int) -> None:
        """Fill the bytes PC firmware reads, exactly as QEMU's pc_cmos_init (``ram_size`` there is the RAM
        below 4 GiB). Raises CmosConfigError for values the bytes cannot hold."""
        if not 0 <= below_4g <= 4 * GIB:
            raise CmosConfigError(f"RAM below 4 GiB must be 0..4 GiB, got {below_4g}")
        if above_4g < 0 or above_4g // (64 * KIB) > 0xFF_FFFF:
            raise CmosConfigError(f"RAM above 4 GiB must be 0..1 TiB in 64 KiB units, got {above_4g}")
        if not 1 <= ncpus <= 256:
            raise CmosConfigError(f"vCPU count must be 1..256, got {ncpus}")
        # Base memory (first MiB), KiB.
        val = min(below_4g // KIB, 640)
        self._set16(CMOS_BASE_MEM_LO, val)
        # Extended memory above 1 MiB, KiB, capped at 65535 (the "next 64 MiB").
        val = (below_4g - MIB) // KIB if below_4g > MIB else 0
        val = min(val, 0xFFFF)
        self._set16(CMOS_EXT_MEM_LO, val)
        self._set16(CMOS_EXT_MEM_COPY_LO, val)
        # Memory between 16 MiB and 4 GiB, 64 KiB units, capped at 0xFFFF.
        val = (below_4g - 16 * MIB) // (64 * KIB) if below_4g > 16 * MIB else 0
        val = min(val, 0xFFFF)
        self._set16(CMOS_MEM_ABOVE_16M_LO, val)
        # Memory above 4 GiB, 64 KiB units, 24 bits.
        val = above_4g // (64 * KIB)
        self.cmos[CMOS_MEM_ABOVE_4G_LO] = val & 0xFF
        self.cmos[CMOS_MEM_ABOVE_4G_MID] = (val >> 8) & 0xFF
        self.cmos[CMOS_MEM_ABOVE_4G_HI] = (val >> 16) & 0xFF
        self.cmos[CMOS_NCPUS_MINUS_ONE] = ncpus - 1

    def _set16(self, index: int, value: int) -> None:
        self.cmos[index] = value & 0xFF
        self.cmos[index + 1] = (value >> 8) & 0xFF

    # ---- bus side --------------------------------------------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        if len(data) != 1 or offset not in (INDEX_OFFSET, DATA_OFFSET):
            self._invalid("read", offset, len(data))
            return
        data[0] = 0xFF if offset == INDEX_OFFSET else self._read_reg(self.index)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if len(data) != 1 or offset not in (INDEX_OFFSET, DATA_OFFSET):
            self._invalid("write", offset, len(data))
            return
        value = data[0]
        if offset == INDEX_OFFSET:
            self.index = value & INDEX_MASK
            self.nmi_disabled = bool(value & NMI_DISABLE)
        else:
            self._write_reg(self.index, value)

    def _invalid(self, kind: str, offset: int, size: int) -> None:
        self.metrics.invalid_access += 1
        self._log.warning("rtc: ignored %d-byte %s at offset %d", size, kind, offset)

    @property
    def _frozen(self) -> bool:
        return bool(self.cmos[REG_B] & REG_B_SET)

    def _read_reg(self, index: int) -> int:
        if index in TIME_REGS and not self._frozen:
            self._latch_time()
        value = self.cmos[index]
        if index == REG_C:
            self.cmos[REG_C] = 0  # MC146818A: reading C clears its flags
        return value

    def _write_reg(self, index: int, value: int) -> None:
        if index == REG_A:
            self.cmos[REG_A] = value & ~REG_A_UIP
        elif index == REG_B:
            self._write_reg_b(value)
        elif index in (REG_C, REG_D):
            pass  # read-only
        elif index in TIME_REGS:
            if self._frozen:
                self.cmos[index] = value
            else:
                # Outside SET mode the write changes the running clock immediately.
                self._latch_time()
                self.cmos[index] = value
                self._commit_time()
        else:
            self.cmos[index] = value

    def _write_reg_b(self, value: int) -> None:
        was_frozen = self._frozen
        if value & REG_B_SET:
            value &= ~REG_B_UIE  # MC146818A: setting SET clears UIE
        self.cmos[REG_B] = value
        if value & REG_B_SET and not was_frozen:
            # Freeze: the registers keep the time of the moment SET went up, in the format this same write
            # selected (a guest commonly sets SET together with DM/24h before writing the new time).
            self._latch_time()
        elif was_frozen and not value & REG_B_SET:
            self._commit_time()

    # ---- time <-> registers ----------------------------------------------------------------------------

    def _encode(self, value: int) -> int:
        return value if self.cmos[REG_B] & REG_B_DM_BINARY else _to_bcd(value)

    def _decode(self, value: int) -> int | None:
        return value if self.cmos[REG_B] & REG_B_DM_BINARY else _from_bcd(value)

    def _latch_time(self) -> None:
        """Write the current guest time into the time registers in the format register B selects."""
        t = time.gmtime(int(self._now() + self.offset))
        hour = t.tm_hour
        if self.cmos[REG_B] & REG_B_24H:
            hours = self._encode(hour)
        else:
            hours = self._encode(hour % 12 or 12) | (HOURS_PM if hour >= 12 else 0)
        self.cmos[REG_SECONDS] = self._encode(t.tm_sec)
        self.cmos[REG_MINUTES] = self._encode(t.tm_min)
        self.cmos[REG_HOURS] = hours
        self.cmos[REG_DAY_OF_WEEK] = self._encode((t.tm_wday + 1) % 7 + 1)  # Sunday = 1
        self.cmos[REG_DAY_OF_MONTH] = self._encode(t.tm_mday)
        self.cmos[REG_MONTH] = self._encode(t.tm_mon)
        self.cmos[REG_YEAR] = self._encode(t.tm_year % 100)
        self.cmos[REG_CENTURY] = self._encode(t.tm_year // 100)

    def _commit_time(self) -> None:
        """Turn the time registers into a new offset; a date that does not exist is counted and ignored."""
        fields = [
            self._decode(self.cmos[r])
            for r in (REG_SECONDS, REG_MINUTES, REG_DAY_OF_MONTH, REG_MONTH, REG_YEAR, REG_CENTURY)
        ]
        raw_hours = self.cmos[REG_HOURS]
        if self.cmos[REG_B] & REG_B_24H:
            hour = self._decode(raw_hours)
        else:
            h12 = self._decode(raw_hours & ~HOURS_PM)
            hour = (
                None if h12 is None or not 1 <= h12 <= 12 else h12 % 12 + (12 if raw_hours & HOURS_PM else 0)
            )
        sec, minute, mday, month, year, century = fields
        if None in fields or hour is None:
            self._bad_time()
            return
        assert sec is not None and minute is not None and mday is not None and month is not None
        assert year is not None and century is not None
        full_year = century * 100 + year
        if not (
            sec < 60
            and minute < 60
            and hour < 24
            and 1 <= month <= 12
            and year < 100
            and full_year >= 1970
            and 1 <= mday <= calendar.monthrange(full_year, month)[1]
        ):
            self._bad_time()
            return
        guest = calendar.timegm((full_year, month, mday, hour, minute, sec, 0, 0, 0))
        self.offset = guest - int(self._now())

    def _bad_time(self) -> None:
        self.metrics.invalid_time += 1
        self._log.info("rtc: guest set an invalid date/time; clock unchanged")
