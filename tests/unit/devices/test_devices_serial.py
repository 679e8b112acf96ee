"""Register-level tests of the 16550A model (devices/serial.py) against the PC16550D datasheet."""

from __future__ import annotations

import pytest

from devices import serial as s
from devices.irq import CountingTrigger
from devices.serial import InvalidSerialState, Serial, SerialState


class ListSink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


class BrokenSink:
    def write(self, data: bytes) -> None:
        raise BrokenPipeError("console went away")


def rd(dev: Serial, offset: int) -> int:
    buf = bytearray(1)
    dev.read(offset, memoryview(buf))
    return buf[0]


def wr(dev: Serial, offset: int, value: int) -> None:
    dev.write(offset, bytes((value,)))


@pytest.fixture
def irq() -> CountingTrigger:
    return CountingTrigger()


@pytest.fixture
def sink() -> ListSink:
    return ListSink()


@pytest.fixture
def uart(irq: CountingTrigger, sink: ListSink) -> Serial:
    return Serial(irq, sink)


def test_power_on_registers_match_qemu_reset_values(uart: Serial) -> None:
    assert rd(uart, s.IER) == 0
    assert rd(uart, s.IIR) == 0x01
    assert rd(uart, s.LCR) == 0x03
    assert rd(uart, s.MCR) == s.MCR_OUT2
    assert rd(uart, s.LSR) == s.LSR_THRE | s.LSR_TEMT
    assert rd(uart, s.MSR) == s.MSR_DCD | s.MSR_DSR | s.MSR_CTS
    assert uart.divisor == 0x000C


def test_dlab_redirects_offsets_0_and_1_to_the_divisor_latch(uart: Serial, sink: ListSink) -> None:
    wr(uart, s.LCR, 0x80 | 0x03)
    wr(uart, 0, 0x01)
    wr(uart, 1, 0x02)
    assert rd(uart, 0) == 0x01
    assert rd(uart, 1) == 0x02
    assert uart.divisor == 0x0201
    assert sink.data == b""  # the DLL write did not transmit
    wr(uart, s.LCR, 0x03)
    assert rd(uart, s.IER) == 0  # IER untouched by the DLM write
    wr(uart, 0, ord("x"))
    assert sink.data == b"x"
    assert uart.divisor == 0x0201  # the THR write did not touch DLL


def test_ier_write_keeps_only_the_four_defined_bits(uart: Serial) -> None:
    wr(uart, s.IER, 0xF5)
    assert rd(uart, s.IER) == 0x05


def test_mcr_write_keeps_only_the_five_defined_bits(uart: Serial) -> None:
    wr(uart, s.MCR, 0xFF & ~s.MCR_LOOP)
    assert rd(uart, s.MCR) == 0x0F


def test_scratch_and_line_control_read_back(uart: Serial) -> None:
    wr(uart, s.SCR, 0xA5)
    wr(uart, s.LCR, 0x1B)
    assert rd(uart, s.SCR) == 0xA5
    assert rd(uart, s.LCR) == 0x1B


def test_tx_bytes_reach_the_sink_in_order(uart: Serial, sink: ListSink) -> None:
    for b in b"hello":
        wr(uart, s.DATA, b)
    assert sink.data == b"hello"
    assert uart.metrics.tx_bytes == 5


def test_thr_write_without_sink_is_dropped_and_counted(irq: CountingTrigger) -> None:
    uart = Serial(irq)
    wr(uart, s.DATA, 0x41)
    assert uart.metrics.dropped == 1
    assert uart.metrics.tx_bytes == 0


def test_failing_sink_counts_a_drop_instead_of_raising(irq: CountingTrigger) -> None:
    uart = Serial(irq, BrokenSink())
    wr(uart, s.DATA, 0x41)
    assert uart.metrics.dropped == 1


def test_enabling_ier_thre_with_empty_thr_raises_thre_at_once(uart: Serial, irq: CountingTrigger) -> None:
    wr(uart, s.IER, s.IER_ETBEI)
    assert irq.count == 1
    assert rd(uart, s.IIR) == s.IIR_THRE


def test_reading_iir_that_reports_thre_clears_it(uart: Serial) -> None:
    wr(uart, s.IER, s.IER_ETBEI)
    assert rd(uart, s.IIR) == s.IIR_THRE
    assert rd(uart, s.IIR) == s.IIR_NONE


def test_thr_write_rearms_thre_with_a_new_edge(uart: Serial, irq: CountingTrigger) -> None:
    wr(uart, s.IER, s.IER_ETBEI)
    rd(uart, s.IIR)
    wr(uart, s.DATA, 0x41)
    assert irq.count == 2
    assert rd(uart, s.IIR) == s.IIR_THRE


def test_thr_write_signals_an_edge_even_if_thre_was_still_pending(uart: Serial, irq: CountingTrigger) -> None:
    wr(uart, s.IER, s.IER_ETBEI)
    wr(uart, s.DATA, 0x41)  # THRE was pending (not read from IIR); the write resets and re-raises it
    assert irq.count == 2


def test_rewriting_ier_with_thre_already_enabled_does_not_signal_again(
    uart: Serial, irq: CountingTrigger
) -> None:
    wr(uart, s.IER, s.IER_ETBEI)
    rd(uart, s.IIR)
    wr(uart, s.IER, s.IER_ETBEI | s.IER_ERBFI)
    assert irq.count == 1
    assert rd(uart, s.IIR) == s.IIR_NONE


def test_unrelated_ier_write_keeps_a_pending_thre(uart: Serial) -> None:
    wr(uart, s.IER, s.IER_ETBEI)
    wr(uart, s.IER, s.IER_ETBEI | s.IER_ELSI)
    assert rd(uart, s.IIR) == s.IIR_THRE


def test_disabling_then_enabling_ier_thre_raises_thre_again(uart: Serial, irq: CountingTrigger) -> None:
    # Linux's serial8250_do_startup probes exactly this (UART_BUG_THRE).
    wr(uart, s.IER, s.IER_ETBEI)
    rd(uart, s.IIR)
    wr(uart, s.IER, 0)
    wr(uart, s.IER, s.IER_ETBEI)
    assert irq.count == 2
    assert rd(uart, s.IIR) == s.IIR_THRE


def test_no_interrupt_when_ier_is_clear(uart: Serial, irq: CountingTrigger) -> None:
    wr(uart, s.DATA, 0x41)
    uart.enqueue_input(b"x")
    assert irq.count == 0
    assert rd(uart, s.IIR) == s.IIR_NONE


def test_rx_interrupt_fires_when_bytes_arrive_with_rda_enabled(uart: Serial, irq: CountingTrigger) -> None:
    wr(uart, s.IER, s.IER_ERBFI)
    assert uart.enqueue_input(b"a") == 1
    assert irq.count == 1
    assert rd(uart, s.IIR) == s.IIR_RDA
    assert rd(uart, s.LSR) & s.LSR_DR
    assert rd(uart, s.DATA) == ord("a")
    assert rd(uart, s.IIR) == s.IIR_NONE
    assert not rd(uart, s.LSR) & s.LSR_DR
    assert uart.metrics.rx_bytes == 1


def test_each_rx_batch_signals_an_edge_even_while_rda_pending(uart: Serial, irq: CountingTrigger) -> None:
    wr(uart, s.FCR, s.FCR_FE)
    wr(uart, s.IER, s.IER_ERBFI)
    uart.enqueue_input(b"a")
    uart.enqueue_input(b"b")
    assert irq.count == 2


def test_rx_without_rda_enabled_sets_dr_but_no_interrupt(uart: Serial, irq: CountingTrigger) -> None:
    uart.enqueue_input(b"a")
    assert irq.count == 0
    assert rd(uart, s.LSR) & s.LSR_DR
    assert rd(uart, s.IIR) == s.IIR_NONE


def test_enabling_rda_with_data_waiting_signals_an_edge(uart: Serial, irq: CountingTrigger) -> None:
    uart.enqueue_input(b"a")
    wr(uart, s.IER, s.IER_ERBFI)
    assert irq.count == 1


def test_fifo_below_trigger_level_reports_character_timeout(uart: Serial) -> None:
    wr(uart, s.FCR, s.FCR_FE | 0xC0)  # trigger level 14
    wr(uart, s.IER, s.IER_ERBFI)
    uart.enqueue_input(b"abc")
    assert rd(uart, s.IIR) == 0xC0 | s.IIR_CTI
    uart.enqueue_input(b"d" * 11)
    assert rd(uart, s.IIR) == 0xC0 | s.IIR_RDA


def test_empty_rbr_reads_zero_and_counts_nothing(uart: Serial) -> None:
    assert rd(uart, s.DATA) == 0
    assert uart.metrics.rx_bytes == 0


def test_enqueue_input_takes_only_what_fits_in_the_fifo(uart: Serial) -> None:
    wr(uart, s.FCR, s.FCR_FE)
    assert uart.rx_space() == 16
    assert uart.enqueue_input(bytes(range(20))) == 16
    assert uart.rx_space() == 0
    assert uart.enqueue_input(b"z") == 0
    assert rd(uart, s.DATA) == 0
    assert uart.rx_space() == 1
    assert uart.enqueue_input(b"zz") == 1
    assert not rd(uart, s.LSR) & s.LSR_OE  # host input is flow controlled: never an overrun


def test_without_fifo_the_receiver_holds_one_byte(uart: Serial) -> None:
    assert uart.rx_space() == 1
    assert uart.enqueue_input(b"ab") == 1
    assert uart.enqueue_input(b"b") == 0
    assert rd(uart, s.DATA) == ord("a")


def test_fifo_overflow_in_loopback_sets_oe_and_keeps_the_first_16_bytes(uart: Serial) -> None:
    wr(uart, s.FCR, s.FCR_FE)
    wr(uart, s.MCR, s.MCR_LOOP)
    for b in range(17):
        wr(uart, s.DATA, b)
    lsr = rd(uart, s.LSR)
    assert lsr & s.LSR_OE and lsr & s.LSR_DR
    assert not rd(uart, s.LSR) & s.LSR_OE  # reading LSR reset OE
    assert [rd(uart, s.DATA) for _ in range(16)] == list(range(16))
    assert not rd(uart, s.LSR) & s.LSR_DR
    assert uart.metrics.overruns == 1


def test_overrun_without_fifo_overwrites_rbr(uart: Serial) -> None:
    wr(uart, s.MCR, s.MCR_LOOP)
    wr(uart, s.DATA, 1)
    wr(uart, s.DATA, 2)
    assert rd(uart, s.LSR) & s.LSR_OE
    assert rd(uart, s.DATA) == 2


def test_overrun_raises_line_status_interrupt_when_enabled(uart: Serial, irq: CountingTrigger) -> None:
    wr(uart, s.MCR, s.MCR_LOOP)
    wr(uart, s.DATA, 1)
    wr(uart, s.IER, s.IER_ELSI)
    assert irq.count == 0
    wr(uart, s.DATA, 2)
    assert irq.count == 1
    assert rd(uart, s.IIR) == s.IIR_RLS
    rd(uart, s.LSR)
    assert rd(uart, s.IIR) == s.IIR_NONE


def test_loopback_sends_tx_to_rx_not_to_the_sink(uart: Serial, sink: ListSink) -> None:
    wr(uart, s.MCR, s.MCR_LOOP)
    wr(uart, s.DATA, 0x5A)
    assert sink.data == b""
    assert rd(uart, s.DATA) == 0x5A


def test_loopback_disconnects_host_input(uart: Serial) -> None:
    wr(uart, s.FCR, s.FCR_FE)
    wr(uart, s.MCR, s.MCR_LOOP)
    assert uart.rx_space() == 0
    assert uart.enqueue_input(b"a") == 0


@pytest.mark.parametrize(
    ("mcr", "lines"),
    [
        (s.MCR_DTR, s.MSR_DSR),
        (s.MCR_RTS, s.MSR_CTS),
        (s.MCR_OUT1, s.MSR_RI),
        (s.MCR_OUT2, s.MSR_DCD),
        (s.MCR_DTR | s.MCR_RTS | s.MCR_OUT1 | s.MCR_OUT2, 0xF0),
        (0, 0),
    ],
)
def test_loopback_msr_lines_mirror_mcr_outputs(uart: Serial, mcr: int, lines: int) -> None:
    wr(uart, s.MCR, s.MCR_LOOP | mcr)
    rd(uart, s.MSR)  # clear the deltas entering loopback produced
    assert rd(uart, s.MSR) == lines


def test_loopback_mcr_changes_set_msr_delta_bits(uart: Serial) -> None:
    wr(uart, s.MCR, s.MCR_LOOP)  # lines drop from DCD|DSR|CTS to none
    assert rd(uart, s.MSR) == s.MSR_DDCD | s.MSR_DDSR | s.MSR_DCTS
    wr(uart, s.MCR, s.MCR_LOOP | s.MCR_OUT1)  # RI rises: no TERI (trailing edge only)
    assert rd(uart, s.MSR) == s.MSR_RI
    wr(uart, s.MCR, s.MCR_LOOP)  # RI falls
    assert rd(uart, s.MSR) == s.MSR_TERI
    assert rd(uart, s.MSR) == 0


def test_modem_status_interrupt_on_delta_when_enabled(uart: Serial, irq: CountingTrigger) -> None:
    wr(uart, s.IER, s.IER_EDSSI)
    wr(uart, s.MCR, s.MCR_LOOP | s.MCR_OUT2)
    assert irq.count == 1
    assert rd(uart, s.IIR) == s.IIR_MS
    rd(uart, s.MSR)
    assert rd(uart, s.IIR) == s.IIR_NONE


def test_iir_priority_is_line_status_then_rx_then_thre_then_modem(uart: Serial) -> None:
    wr(uart, s.FCR, s.FCR_FE)
    wr(uart, s.IER, s.IER_MASK)
    wr(uart, s.MCR, s.MCR_LOOP)  # modem deltas
    for b in range(17):  # fill the FIFO and overrun it; each write re-arms THRE
        wr(uart, s.DATA, b)
    assert rd(uart, s.IIR) == 0xC0 | s.IIR_RLS
    rd(uart, s.LSR)
    assert rd(uart, s.IIR) == 0xC0 | s.IIR_RDA
    for _ in range(16):
        rd(uart, s.DATA)
    assert rd(uart, s.IIR) == 0xC0 | s.IIR_THRE
    assert rd(uart, s.IIR) == 0xC0 | s.IIR_MS
    rd(uart, s.MSR)
    assert rd(uart, s.IIR) == 0xC0 | s.IIR_NONE


def test_iir_fifo_bits_follow_fcr_enable(uart: Serial) -> None:
    wr(uart, s.FCR, s.FCR_FE)
    assert rd(uart, s.IIR) == 0xC1
    wr(uart, s.FCR, 0)
    assert rd(uart, s.IIR) == 0x01


def test_fcr_rx_reset_empties_the_fifo(uart: Serial) -> None:
    wr(uart, s.FCR, s.FCR_FE)
    uart.enqueue_input(b"abc")
    wr(uart, s.FCR, s.FCR_FE | s.FCR_RX_RESET)
    assert not rd(uart, s.LSR) & s.LSR_DR
    assert uart.rx_space() == 16


def test_toggling_fifo_enable_empties_the_fifo(uart: Serial) -> None:
    wr(uart, s.FCR, s.FCR_FE)
    uart.enqueue_input(b"abc")
    wr(uart, s.FCR, 0)
    assert not rd(uart, s.LSR) & s.LSR_DR


def test_lsr_and_msr_writes_are_ignored(uart: Serial) -> None:
    wr(uart, s.LSR, 0xFF)
    wr(uart, s.MSR, 0x0F)
    assert rd(uart, s.LSR) == s.LSR_THRE | s.LSR_TEMT
    assert rd(uart, s.MSR) == 0xB0


def test_wide_accesses_are_counted_and_ignored(uart: Serial, sink: ListSink) -> None:
    uart.write(s.DATA, b"ab")
    buf = bytearray(b"\x00\x00")
    uart.read(s.LSR, memoryview(buf))
    assert sink.data == b""
    assert buf == b"\x00\x00"
    assert uart.metrics.invalid_access == 2


def test_out_of_range_offsets_are_counted_and_ignored(uart: Serial) -> None:
    wr(uart, 8, 1)
    assert rd(uart, 9) == 0
    assert uart.metrics.invalid_access == 2


# ---- snapshot ---------------------------------------------------------------------------------------------


def test_snapshot_round_trip_preserves_registers_and_fifo(uart: Serial) -> None:
    wr(uart, s.LCR, 0x80)
    wr(uart, 0, 0x03)
    wr(uart, 1, 0x00)
    wr(uart, s.LCR, 0x1B)
    wr(uart, s.FCR, s.FCR_FE | 0x80)
    wr(uart, s.IER, s.IER_ERBFI | s.IER_ELSI)
    wr(uart, s.SCR, 0x77)
    uart.enqueue_input(b"xyz")
    state = uart.snapshot()

    irq2, sink2 = CountingTrigger(), ListSink()
    restored = Serial.restore(state, irq2, sink2)
    assert restored.snapshot() == state
    assert irq2.count == 1  # RX data was pending: re-signalled
    assert rd(restored, s.LCR) == 0x1B
    assert restored.divisor == 3
    assert rd(restored, s.SCR) == 0x77
    assert rd(restored, s.IIR) == 0xC0 | s.IIR_CTI
    assert bytes(rd(restored, s.DATA) for _ in range(3)) == b"xyz"
    wr(restored, s.DATA, ord("!"))
    assert sink2.data == b"!"


def test_restore_without_pending_interrupt_signals_nothing() -> None:
    irq = CountingTrigger()
    Serial.restore(SerialState(), irq)
    assert irq.count == 0


@pytest.mark.parametrize(
    "changes",
    [
        {"fcr": s.FCR_FE, "rx_fifo": bytes(17)},  # longer than the 16-byte FIFO
        {"fcr": 0, "rx_fifo": b"ab"},  # longer than the 1-byte RBR without FIFO
        {"ier": 0x10},
        {"fcr": s.FCR_RX_RESET},  # self-clearing bit cannot be stored
        {"mcr": 0x20},
        {"line_errors": s.LSR_THRE},
        {"msr_deltas": 0x10},
        {"lcr": 0x100},
        {"scr": -1},
        {"divisor_low": "3"},
        {"thre_pending": 1},
        {"rx_fifo": [1, 2]},
    ],
)
def test_restore_rejects_invalid_snapshots(changes: dict[str, object]) -> None:
    state = SerialState(**changes)  # type: ignore[arg-type]
    with pytest.raises(InvalidSerialState):
        Serial.restore(state, CountingTrigger())
