"""MC146818 RTC/CMOS tests (devices/rtc.py): time formats, NMI masking, SET freeze, QEMU memory-size bytes."""

from __future__ import annotations

import calendar

import pytest

from devices import rtc as r
from devices.rtc import CmosConfigError, Rtc

GIB = 1 << 30
MIB = 1 << 20

# Thursday 2024-02-29 13:45:30 UTC (a leap day).
T0 = calendar.timegm((2024, 2, 29, 13, 45, 30, 0, 0, 0))


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock(T0 + 0.25)


@pytest.fixture
def rtc(clock: Clock) -> Rtc:
    return Rtc(clock)


def cmos_read(dev: Rtc, index: int) -> int:
    dev.write(r.INDEX_OFFSET, bytes((index,)))
    buf = bytearray(1)
    dev.read(r.DATA_OFFSET, memoryview(buf))
    return buf[0]


def cmos_write(dev: Rtc, index: int, value: int) -> None:
    dev.write(r.INDEX_OFFSET, bytes((index,)))
    dev.write(r.DATA_OFFSET, bytes((value,)))


def time_regs(dev: Rtc) -> list[int]:
    return [cmos_read(dev, i) for i in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)]


def test_default_format_is_bcd_24h(rtc: Rtc) -> None:
    assert cmos_read(rtc, r.REG_B) == r.REG_B_24H
    assert time_regs(rtc) == [0x30, 0x45, 0x13, 5, 0x29, 0x02, 0x24, 0x20]  # Thursday = 5 (Sunday = 1)


def test_binary_mode_24h(rtc: Rtc) -> None:
    cmos_write(rtc, r.REG_B, r.REG_B_24H | r.REG_B_DM_BINARY)
    assert time_regs(rtc) == [30, 45, 13, 5, 29, 2, 24, 20]


@pytest.mark.parametrize(
    ("hour", "bcd", "binary"),
    [(0, 0x12, 12), (1, 0x01, 1), (11, 0x11, 11), (12, 0x92, 0x8C), (13, 0x81, 0x81), (23, 0x91, 0x8B)],
)
def test_12_hour_mode_sets_pm_bit(clock: Clock, rtc: Rtc, hour: int, bcd: int, binary: int) -> None:
    clock.t = calendar.timegm((2024, 2, 29, hour, 0, 0, 0, 0, 0))
    cmos_write(rtc, r.REG_B, 0)
    assert cmos_read(rtc, r.REG_HOURS) == bcd
    cmos_write(rtc, r.REG_B, r.REG_B_DM_BINARY)
    assert cmos_read(rtc, r.REG_HOURS) == binary


def test_day_of_week_sunday_is_1(clock: Clock, rtc: Rtc) -> None:
    clock.t = calendar.timegm((2024, 3, 3, 0, 0, 0, 0, 0, 0))  # a Sunday
    assert cmos_read(rtc, r.REG_DAY_OF_WEEK) == 1
    clock.t += 6 * 86400  # Saturday
    assert cmos_read(rtc, r.REG_DAY_OF_WEEK) == 7


def test_clock_advances_with_host_time(clock: Clock, rtc: Rtc) -> None:
    clock.t += 45
    assert cmos_read(rtc, r.REG_SECONDS) == 0x15
    assert cmos_read(rtc, r.REG_MINUTES) == 0x46


def test_nmi_bit_is_stored_and_masked_from_the_index(rtc: Rtc) -> None:
    rtc.write(r.INDEX_OFFSET, bytes((0x80 | r.REG_A,)))
    assert rtc.nmi_disabled
    assert rtc.index == r.REG_A
    buf = bytearray(1)
    rtc.read(r.DATA_OFFSET, memoryview(buf))
    assert buf[0] == r.DEFAULT_REG_A
    rtc.write(r.INDEX_OFFSET, bytes((r.REG_A,)))
    assert not rtc.nmi_disabled


def test_nmi_bit_does_not_leak_into_nvram_writes(rtc: Rtc) -> None:
    rtc.write(r.INDEX_OFFSET, bytes((0x80 | 0x40,)))
    rtc.write(r.DATA_OFFSET, b"\x5a")
    assert rtc.cmos[0x40] == 0x5A
    assert cmos_read(rtc, 0x40) == 0x5A


def test_index_port_reads_ff(rtc: Rtc) -> None:
    buf = bytearray(1)
    rtc.read(r.INDEX_OFFSET, memoryview(buf))
    assert buf[0] == 0xFF


def test_register_a_uip_reads_0_and_divider_bits_are_writable(rtc: Rtc) -> None:
    cmos_write(rtc, r.REG_A, 0xFF)
    assert cmos_read(rtc, r.REG_A) == 0x7F


def test_register_c_is_cleared_by_reading(rtc: Rtc) -> None:
    rtc.cmos[r.REG_C] = 0x90
    assert cmos_read(rtc, r.REG_C) == 0x90
    assert cmos_read(rtc, r.REG_C) == 0


def test_register_d_reports_valid_ram_and_ignores_writes(rtc: Rtc) -> None:
    cmos_write(rtc, r.REG_D, 0)
    cmos_write(rtc, r.REG_C, 0xFF)
    assert cmos_read(rtc, r.REG_D) == 0x80
    assert cmos_read(rtc, r.REG_C) == 0


def test_nvram_bytes_are_plain_storage(rtc: Rtc) -> None:
    for index in (0x01, 0x0E, 0x40, 0x7F):
        cmos_write(rtc, index, index ^ 0xA5)
    for index in (0x01, 0x0E, 0x40, 0x7F):
        assert cmos_read(rtc, index) == index ^ 0xA5


def test_set_bit_freezes_the_time_registers(clock: Clock, rtc: Rtc) -> None:
    cmos_write(rtc, r.REG_B, r.REG_B_24H | r.REG_B_SET)
    clock.t += 100
    assert cmos_read(rtc, r.REG_SECONDS) == 0x30


def test_setting_the_clock_under_set_moves_guest_time(clock: Clock, rtc: Rtc) -> None:
    cmos_write(rtc, r.REG_B, r.REG_B_24H | r.REG_B_SET | r.REG_B_UIE)
    assert not cmos_read(rtc, r.REG_B) & r.REG_B_UIE  # SET clears UIE
    for index, value in ((0x00, 0x05), (0x02, 0x04), (0x04, 0x03), (0x07, 0x02), (0x08, 0x01), (0x09, 0x30)):
        cmos_write(rtc, index, value)
    clock.t += 50  # frozen: this time passes unseen
    assert cmos_read(rtc, r.REG_SECONDS) == 0x05
    cmos_write(rtc, r.REG_B, r.REG_B_24H)
    assert time_regs(rtc)[:3] == [0x05, 0x04, 0x03]
    clock.t += 10
    assert time_regs(rtc) == [0x15, 0x04, 0x03, 4, 0x02, 0x01, 0x30, 0x20]  # 2030-01-02 was a Wednesday
    assert rtc.offset == pytest.approx(calendar.timegm((2030, 1, 2, 3, 4, 5, 0, 0, 0)) - int(T0 + 50))


def test_setting_the_clock_in_binary_12h_mode(clock: Clock, rtc: Rtc) -> None:
    cmos_write(rtc, r.REG_B, r.REG_B_SET | r.REG_B_DM_BINARY)
    cmos_write(rtc, r.REG_HOURS, 0x80 | 11)  # 11 PM
    cmos_write(rtc, r.REG_B, r.REG_B_DM_BINARY)
    cmos_write(rtc, r.REG_B, r.REG_B_DM_BINARY | r.REG_B_24H)
    assert cmos_read(rtc, r.REG_HOURS) == 23


def test_invalid_date_under_set_is_counted_and_clock_unchanged(rtc: Rtc) -> None:
    cmos_write(rtc, r.REG_B, r.REG_B_24H | r.REG_B_SET)
    cmos_write(rtc, r.REG_MONTH, 0x13)
    cmos_write(rtc, r.REG_B, r.REG_B_24H)
    assert rtc.metrics.invalid_time == 1
    assert rtc.offset == 0
    assert cmos_read(rtc, r.REG_MONTH) == 0x02


@pytest.mark.parametrize(
    ("index", "value"), [(r.REG_SECONDS, 0x7A), (r.REG_DAY_OF_MONTH, 0x30), (r.REG_HOURS, 0x24)]
)
def test_nonexistent_times_are_rejected(rtc: Rtc, index: int, value: int) -> None:
    cmos_write(rtc, r.REG_B, r.REG_B_24H | r.REG_B_SET)
    cmos_write(rtc, index, value)  # bad BCD, Feb 30, hour 24
    cmos_write(rtc, r.REG_B, r.REG_B_24H)
    assert rtc.metrics.invalid_time == 1
    assert rtc.offset == 0


def test_time_register_write_outside_set_takes_effect_at_once(clock: Clock, rtc: Rtc) -> None:
    cmos_write(rtc, r.REG_MINUTES, 0x00)
    assert cmos_read(rtc, r.REG_MINUTES) == 0x00
    assert cmos_read(rtc, r.REG_SECONDS) == 0x30
    assert cmos_read(rtc, r.REG_HOURS) == 0x13


def test_memory_size_bytes_for_a_512_mib_guest(rtc: Rtc) -> None:
    rtc.set_memory_size(512 * MIB, 0, 1)
    c = rtc.cmos
    assert (c[0x15], c[0x16]) == (0x80, 0x02)  # 640 KiB
    assert (c[0x17], c[0x18]) == (0xFF, 0xFF)  # 511 MiB in KiB exceeds 65535: capped
    assert (c[0x30], c[0x31]) == (0xFF, 0xFF)
    assert (c[0x34], c[0x35]) == (0x00, 0x1F)  # (512 - 16) MiB / 64 KiB = 7936 = 0x1f00
    assert (c[0x5B], c[0x5C], c[0x5D]) == (0, 0, 0)
    assert c[0x5F] == 0


def test_memory_size_bytes_for_a_6_gib_guest(rtc: Rtc) -> None:
    rtc.set_memory_size(3 * GIB, 3 * GIB, 4)  # 3 GiB below the PCI hole (layout.LOW_RAM_END), 3 GiB above
    c = rtc.cmos
    assert (c[0x15], c[0x16]) == (0x80, 0x02)
    assert (c[0x17], c[0x18]) == (0xFF, 0xFF)
    assert (c[0x34], c[0x35]) == (0x00, 0xBF)  # (3 GiB - 16 MiB) / 64 KiB = 48896 = 0xbf00
    assert (c[0x5B], c[0x5C], c[0x5D]) == (0x00, 0xC0, 0x00)  # 3 GiB / 64 KiB = 49152 = 0x00c000
    assert c[0x5F] == 3


def test_memory_size_bytes_for_a_tiny_guest(rtc: Rtc) -> None:
    rtc.set_memory_size(8 * MIB, 0, 2)
    c = rtc.cmos
    assert (c[0x17], c[0x18]) == (0x00, 0x1C)  # 7 MiB = 7168 KiB = 0x1c00
    assert (c[0x34], c[0x35]) == (0, 0)  # nothing above 16 MiB
    assert c[0x5F] == 1


def test_memory_above_4g_uses_all_three_bytes(rtc: Rtc) -> None:
    rtc.set_memory_size(3 * GIB, 1024 * GIB - 64 * 1024, 1)
    assert (rtc.cmos[0x5B], rtc.cmos[0x5C], rtc.cmos[0x5D]) == (0xFF, 0xFF, 0xFF)


@pytest.mark.parametrize(
    ("below", "above", "ncpus"),
    [(-1, 0, 1), (4 * GIB + 1, 0, 1), (GIB, -1, 1), (GIB, 1024 * GIB, 1), (GIB, 0, 0), (GIB, 0, 257)],
)
def test_memory_size_rejects_unrepresentable_configs(rtc: Rtc, below: int, above: int, ncpus: int) -> None:
    with pytest.raises(CmosConfigError):
        rtc.set_memory_size(below, above, ncpus)


def test_wide_accesses_are_counted_and_ignored(rtc: Rtc) -> None:
    rtc.write(r.INDEX_OFFSET, b"\x40\x00")
    buf = bytearray(2)
    rtc.read(r.DATA_OFFSET, memoryview(buf))
    assert rtc.index == 0
    assert buf == b"\x00\x00"
    assert rtc.metrics.invalid_access == 2
