"""devices.acpi_pm against ACPI 6.5 §4.8.3 (PM1 event/control registers, PM timer), without /dev/kvm."""

from __future__ import annotations

import pytest

from devices import acpi_pm as pm
from devices.irq import CountingTrigger
from kvmcore import layout


class Clock:
    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns


def make() -> tuple[pm.AcpiPm, list[str], CountingTrigger, Clock]:
    offs: list[str] = []
    sci = CountingTrigger()
    clock = Clock()
    dev = pm.AcpiPm(on_poweroff=lambda: offs.append("off"), sci=sci, clock_ns=clock)
    return dev, offs, sci, clock


def rd(dev: pm.AcpiPm, off: int, size: int) -> int:
    buf = bytearray(size)
    dev.read(off, memoryview(buf))
    return int.from_bytes(buf, "little")


def wr(dev: pm.AcpiPm, off: int, value: int, size: int) -> None:
    dev.write(off, value.to_bytes(size, "little"))


def test_sci_en_reads_one_because_there_is_no_smi_command_port() -> None:
    # §4.8.3.2.1 / FADT SMI_CMD = 0: the OS finds the machine in ACPI mode already.
    dev, *_ = make()
    assert rd(dev, pm.PM1_CNT, 2) & pm.SCI_EN
    wr(dev, pm.PM1_CNT, 0, 2)
    assert rd(dev, pm.PM1_CNT, 2) & pm.SCI_EN


def test_slp_en_with_the_s5_type_powers_off_once_and_other_types_are_ignored() -> None:
    dev, offs, *_ = make()
    wr(dev, pm.PM1_CNT, (1 << pm.SLP_TYP_SHIFT) | pm.SLP_EN, 2)  # S1 is not declared
    assert offs == [] and dev.metrics.sleep_ignored == 1
    wr(dev, pm.PM1_CNT, (layout.ACPI_S5_SLP_TYP << pm.SLP_TYP_SHIFT) | pm.SLP_EN, 2)
    assert offs == ["off"] and dev.metrics.poweroffs == 1
    assert not rd(dev, pm.PM1_CNT, 2) & pm.SLP_EN  # write-only


def test_slp_en_written_as_the_high_byte_alone_uses_the_stored_sleep_type() -> None:
    # Linux writes SLP_TYP first, then SLP_EN (acpi_hw_legacy_sleep); a byte write to offset 5 is the high byte.
    dev, offs, *_ = make()
    wr(dev, pm.PM1_CNT, layout.ACPI_S5_SLP_TYP << pm.SLP_TYP_SHIFT, 2)
    assert offs == []
    wr(dev, pm.PM1_CNT + 1, (pm.SLP_EN | (layout.ACPI_S5_SLP_TYP << pm.SLP_TYP_SHIFT)) >> 8, 1)
    assert offs == ["off"]


def test_pm_timer_counts_at_3_579545_mhz_wraps_at_32_bits_and_ignores_writes() -> None:
    dev, _, _, clock = make()
    t0 = rd(dev, pm.PM_TMR, 4)
    clock.ns += 1_000_000_000
    assert rd(dev, pm.PM_TMR, 4) - t0 == pm.PM_TIMER_HZ
    wr(dev, pm.PM_TMR, 0, 4)
    assert dev.metrics.ignored_writes == 1 and rd(dev, pm.PM_TMR, 4) - t0 == pm.PM_TIMER_HZ
    clock.ns += (1 << 32) * 1_000_000_000 // pm.PM_TIMER_HZ + 1
    assert rd(dev, pm.PM_TMR, 4) < 1 << 32


def test_tmr_sts_sets_when_bit_31_toggles_and_clears_on_write_one() -> None:
    dev, _, _, clock = make()
    assert not rd(dev, pm.PM1_STS, 2) & pm.TMR_STS
    clock.ns += (1 << 31) * 1_000_000_000 // pm.PM_TIMER_HZ + 1_000
    assert rd(dev, pm.PM1_STS, 2) & pm.TMR_STS
    wr(dev, pm.PM1_STS, pm.TMR_STS, 2)
    assert not rd(dev, pm.PM1_STS, 2) & pm.TMR_STS


def test_power_button_raises_one_sci_only_when_enabled_and_clearing_ends_it() -> None:
    dev, _, sci, _ = make()
    dev.power_button()
    assert sci.count == 0 and rd(dev, pm.PM1_STS, 2) & pm.PWRBTN_STS
    wr(dev, pm.PM1_EN, pm.PWRBTN_EN, 2)  # enabling an already-pending event raises it
    assert sci.count == 1
    dev.power_button()
    assert sci.count == 1  # still pending: no second edge
    wr(dev, pm.PM1_STS, pm.PWRBTN_STS, 2)
    assert not rd(dev, pm.PM1_STS, 2) & pm.PWRBTN_STS
    dev.power_button()
    assert sci.count == 2


def test_pm1_en_keeps_only_defined_bits() -> None:
    dev, *_ = make()
    wr(dev, pm.PM1_EN, 0xFFFF, 2)
    assert rd(dev, pm.PM1_EN, 2) == pm.PM1_EN_WRITABLE


@pytest.mark.parametrize(("off", "size"), [(1, 2), (3, 2), (4, 4), (6, 2), (7, 1), (10, 4), (0, 8), (12, 1)])
def test_accesses_crossing_or_outside_a_register_read_zero_and_write_nothing(off: int, size: int) -> None:
    dev, offs, *_ = make()
    before = (dev.status, dev.enable, dev.control)
    assert rd(dev, off, size) == 0
    dev.write(off, b"\xff" * size)
    assert (dev.status, dev.enable, dev.control) == before and offs == []
    assert dev.metrics.invalid_access == 2
