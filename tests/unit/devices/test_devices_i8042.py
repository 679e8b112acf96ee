"""i8042 controller tests (devices/i8042.py): status, controller commands, reset paths, keyboard replies."""

from __future__ import annotations

import pytest

from devices import i8042 as k
from devices.bus import pio_bus
from devices.i8042 import I8042
from devices.irq import CountingTrigger


class ResetRecorder:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def resets() -> ResetRecorder:
    return ResetRecorder()


@pytest.fixture
def irq1() -> CountingTrigger:
    return CountingTrigger()


@pytest.fixture
def kbc(resets: ResetRecorder, irq1: CountingTrigger) -> I8042:
    return I8042(resets, irq1)


def status(dev: I8042) -> int:
    buf = bytearray(1)
    dev.read(k.COMMAND_OFFSET, memoryview(buf))
    return buf[0]


def data(dev: I8042) -> int:
    buf = bytearray(1)
    dev.read(k.DATA_OFFSET, memoryview(buf))
    return buf[0]


def cmd(dev: I8042, value: int) -> None:
    dev.write(k.COMMAND_OFFSET, bytes((value,)))


def put(dev: I8042, value: int) -> None:
    dev.write(k.DATA_OFFSET, bytes((value,)))


def drain(dev: I8042) -> list[int]:
    out: list[int] = []
    for _ in range(64):
        if not status(dev) & k.STATUS_OBF:
            return out
        out.append(data(dev))
    raise AssertionError("output buffer never emptied")


def test_power_on_status_has_empty_buffers(kbc: I8042) -> None:
    st = status(kbc)
    assert not st & (k.STATUS_OBF | k.STATUS_IBF)
    assert st == k.STATUS_CMD | k.STATUS_UNLOCKED


def test_self_test_answers_0x55_and_sets_system_flag(kbc: I8042) -> None:
    cmd(kbc, k.CMD_SELF_TEST)
    assert status(kbc) & k.STATUS_OBF
    assert status(kbc) & k.STATUS_SYS
    assert data(kbc) == 0x55
    assert not status(kbc) & k.STATUS_OBF


def test_keyboard_interface_test_answers_zero(kbc: I8042) -> None:
    cmd(kbc, k.CMD_KBD_TEST)
    assert drain(kbc) == [0x00]


def test_aux_interface_test_reports_no_usable_aux_port(kbc: I8042) -> None:
    cmd(kbc, k.CMD_AUX_TEST)
    assert drain(kbc) == [k.AUX_TEST_CLOCK_STUCK_HIGH]


def test_read_command_byte_returns_power_on_mode(kbc: I8042) -> None:
    cmd(kbc, k.CMD_READ_CTR)
    assert drain(kbc) == [k.CTR_KBD_INT | k.CTR_AUX_INT]


def test_write_command_byte_then_read_it_back(kbc: I8042) -> None:
    cmd(kbc, k.CMD_WRITE_CTR)
    put(kbc, 0x45)
    cmd(kbc, k.CMD_READ_CTR)
    assert drain(kbc) == [0x45]


def test_system_flag_follows_command_byte_bit_2(kbc: I8042) -> None:
    cmd(kbc, k.CMD_WRITE_CTR)
    put(kbc, k.CTR_SYS)
    assert status(kbc) & k.STATUS_SYS
    cmd(kbc, k.CMD_WRITE_CTR)
    put(kbc, 0)
    assert not status(kbc) & k.STATUS_SYS


def test_status_cmd_bit_tracks_which_port_was_written_last(kbc: I8042) -> None:
    put(kbc, k.KBD_CMD_ENABLE)
    assert not status(kbc) & k.STATUS_CMD
    cmd(kbc, k.CMD_KBD_ENABLE)
    assert status(kbc) & k.STATUS_CMD


@pytest.mark.parametrize(
    ("off", "on", "bit"),
    [
        (k.CMD_KBD_ENABLE, k.CMD_KBD_DISABLE, k.CTR_KBD_DISABLE),
        (k.CMD_AUX_ENABLE, k.CMD_AUX_DISABLE, k.CTR_AUX_DISABLE),
    ],
)
def test_enable_disable_commands_flip_command_byte_bits(kbc: I8042, off: int, on: int, bit: int) -> None:
    cmd(kbc, on)
    assert kbc.ctr & bit
    cmd(kbc, off)
    assert not kbc.ctr & bit


def test_command_0xfe_pulses_reset(kbc: I8042, resets: ResetRecorder) -> None:
    cmd(kbc, k.CMD_RESET)
    assert resets.count == 1
    assert kbc.metrics.resets == 1


def test_odd_pulse_commands_do_not_reset(kbc: I8042, resets: ResetRecorder) -> None:
    cmd(kbc, 0xFF)
    cmd(kbc, 0xF1)
    assert resets.count == 0


def test_writing_output_port_with_bit0_clear_resets(kbc: I8042, resets: ResetRecorder) -> None:
    cmd(kbc, k.CMD_WRITE_OUTPORT)
    put(kbc, 0x02)
    assert resets.count == 1


def test_writing_output_port_with_bit0_set_does_not_reset(kbc: I8042, resets: ResetRecorder) -> None:
    cmd(kbc, k.CMD_WRITE_OUTPORT)
    put(kbc, 0x01)
    assert resets.count == 0
    cmd(kbc, k.CMD_READ_OUTPORT)
    assert drain(kbc) == [0x01]


def test_data_byte_after_write_output_port_is_not_sent_to_the_keyboard(kbc: I8042) -> None:
    cmd(kbc, k.CMD_WRITE_OUTPORT)
    put(kbc, k.KBD_CMD_RESET | 0x01)  # 0xFF would be a keyboard reset if it went to the keyboard
    assert drain(kbc) == []


def test_unknown_command_is_counted_and_ignored(kbc: I8042, resets: ResetRecorder) -> None:
    cmd(kbc, 0xC0)  # read input port: not emulated
    assert kbc.metrics.unknown_commands == 1
    assert drain(kbc) == []
    assert resets.count == 0


def test_write_keyboard_output_buffer_echoes_the_byte(kbc: I8042) -> None:
    cmd(kbc, k.CMD_WRITE_KBD_OBUF)
    put(kbc, 0x9C)
    assert drain(kbc) == [0x9C]


def test_keyboard_reset_answers_ack_then_bat_ok(kbc: I8042) -> None:
    put(kbc, k.KBD_CMD_RESET)
    assert drain(kbc) == [0xFA, 0xAA]


@pytest.mark.parametrize(("ctr", "second"), [(0, 0x83), (k.CTR_XLATE, 0x41)])
def test_keyboard_get_id_reports_mf2(kbc: I8042, ctr: int, second: int) -> None:
    cmd(kbc, k.CMD_WRITE_CTR)
    put(kbc, ctr)
    put(kbc, k.KBD_CMD_GET_ID)
    assert drain(kbc) == [0xFA, 0xAB, second]


def test_keyboard_commands_with_argument_ack_both_bytes(kbc: I8042) -> None:
    put(kbc, k.KBD_CMD_SET_LEDS)
    put(kbc, 0xFF)  # the LED argument, not a keyboard reset
    assert drain(kbc) == [0xFA, 0xFA]


def test_keyboard_scancode_set_query_returns_the_set(kbc: I8042) -> None:
    put(kbc, k.KBD_CMD_SCANCODE)
    put(kbc, 3)
    put(kbc, k.KBD_CMD_SCANCODE)
    put(kbc, 0)
    assert drain(kbc) == [0xFA, 0xFA, 0xFA, 0xFA, 3]


def test_keyboard_echo_and_unknown_command(kbc: I8042) -> None:
    put(kbc, k.KBD_CMD_ECHO)
    put(kbc, 0x01)
    assert drain(kbc) == [0xEE, 0xFE]


def test_irq1_edge_for_each_byte_loaded_when_enabled(kbc: I8042, irq1: CountingTrigger) -> None:
    put(kbc, k.KBD_CMD_RESET)  # two reply bytes
    assert irq1.count == 1
    data(kbc)
    assert irq1.count == 2  # second byte moved into the output buffer
    data(kbc)
    assert irq1.count == 2
    assert kbc.metrics.irqs == 2


def test_no_irq1_when_command_byte_disables_it(kbc: I8042, irq1: CountingTrigger) -> None:
    cmd(kbc, k.CMD_WRITE_CTR)
    put(kbc, 0)
    cmd(kbc, k.CMD_SELF_TEST)
    assert irq1.count == 0
    assert status(kbc) & k.STATUS_OBF


def test_works_without_irq_line(resets: ResetRecorder) -> None:
    kbc = I8042(resets)
    cmd(kbc, k.CMD_SELF_TEST)
    assert drain(kbc) == [0x55]


def test_output_queue_is_bounded_when_the_guest_never_reads(kbc: I8042) -> None:
    for _ in range(100):
        cmd(kbc, k.CMD_SELF_TEST)
    assert len(drain(kbc)) == k.OUTPUT_QUEUE_LIMIT
    assert kbc.metrics.overflow == 100 - k.OUTPUT_QUEUE_LIMIT


def test_reading_empty_data_port_returns_zero(kbc: I8042) -> None:
    assert data(kbc) == 0


def test_ports_0x61_to_0x63_read_zero_and_ignore_writes(resets: ResetRecorder) -> None:
    bus = pio_bus()
    kbc = I8042(resets)
    bus.insert(kbc, 0x60, k.RANGE_LENGTH)
    for port in (0x61, 0x62, 0x63):
        bus.write(port, b"\xfe")
        buf = bytearray(b"\xaa")
        assert bus.read(port, memoryview(buf))
        assert buf == b"\x00"
    assert resets.count == 0
    bus.write(0x64, b"\xfe")
    assert resets.count == 1


def test_wide_accesses_are_counted_and_ignored(kbc: I8042, resets: ResetRecorder) -> None:
    kbc.write(k.COMMAND_OFFSET, b"\xfe\x00")
    assert resets.count == 0
    assert kbc.metrics.invalid_access == 1


def test_reset_restores_power_on_state(kbc: I8042) -> None:
    cmd(kbc, k.CMD_WRITE_CTR)
    put(kbc, 0x00)
    cmd(kbc, k.CMD_SELF_TEST)
    kbc.reset()
    assert kbc.ctr == k.DEFAULT_CTR
    assert status(kbc) == k.STATUS_CMD | k.STATUS_UNLOCKED


def test_linux_style_probe_sequence_completes(kbc: I8042) -> None:
    # i8042_controller_check / selftest / init as drivers/input/serio/i8042.c does them.
    assert drain(kbc) == []
    cmd(kbc, k.CMD_SELF_TEST)
    assert drain(kbc) == [0x55]
    cmd(kbc, k.CMD_READ_CTR)
    ctr = drain(kbc)[0]
    cmd(kbc, k.CMD_WRITE_CTR)
    put(kbc, (ctr | k.CTR_XLATE) & ~k.CTR_KBD_DISABLE)
    cmd(kbc, k.CMD_KBD_TEST)
    assert drain(kbc) == [0x00]
