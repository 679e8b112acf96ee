"""Every test guest under kvmdm (KVM) and under QEMU (TCG) in the same run: same serial output, same status.

This is the behavioural contract of the platform: COM1, i8042 reset, RTC, isa-debug-exit, pc-testdev port and
MMIO scratch, UART interrupts through the in-kernel IOAPIC via irqfd, ACPI table discovery and S5 power-off,
and harmless stray accesses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guests.build import build_demo, build_guest
from guests.kvmdm import run_kvmdm
from guests.qemu import run_qemu

pytestmark = [pytest.mark.kvm, pytest.mark.qemu]

TESTS_GUESTS = Path(__file__).resolve().parents[1] / "guests"

# name, cmdline, stdin, send_after, expected stop kind under kvmdm
CASES = [
    ("hello", "", b"", None, "poweroff"),
    ("pio_mmio", "", b"", None, "poweroff"),
    ("hammer", "", b"", None, "poweroff"),
    ("uart_irq", "", b"hello\nquit\n", b"READY\n", "poweroff"),
    ("uart_irq", "lines=2", b"a\nb\nc\n", b"READY\n", "poweroff"),
    ("loop", "loops=1000 port=0x80", b"", None, "poweroff"),
    ("reset", "", b"", None, "reset"),
    ("triple", "", b"", None, "crash"),
    # No runtime: its own GDT and page tables, never loads TR, port I/O at CPL3 with IOPL=3 (issue 9, finding 2).
    ("bare_iopl", "", b"", None, "poweroff"),
    # RSDP -> RSDT -> FADT -> DSDT \_S5, the PM timer, and S5 through PM1a_CNT: QEMU's tables vs kvmcore.acpi's.
    ("acpi", "", b"", None, "poweroff"),
]


def _elf(name: str) -> Path:
    return build_demo() if name == "hello" else build_guest(TESTS_GUESTS / f"{name}.S")


@pytest.mark.parametrize(("name", "cmdline", "stdin", "send_after", "kind"), CASES,
                         ids=[f"{c[0]}-{c[1] or 'default'}" for c in CASES])
def test_guest_output_and_status_match_qemu(name: str, cmdline: str, stdin: bytes, send_after: bytes | None,
                                            kind: str) -> None:
    elf = _elf(name)
    ours = run_kvmdm(elf, cmdline, stdin, timeout=120, send_after=send_after)
    theirs = run_qemu(elf, cmdline, "tcg", stdin, timeout=120, send_after=send_after)
    assert ours.reason.kind == kind, ours.reason
    assert ours.output == theirs.output
    assert ours.status == theirs.status


def test_pio_mmio_guest_checks_pass_under_kvmdm() -> None:
    run = run_kvmdm(_elf("pio_mmio"))
    assert "FAIL" not in run.output and run.output.endswith("pio_mmio: 0 failed\n")
    assert run.status == 1  # debug-exit value 0


def test_uart_interrupts_arrive_through_irqfd_and_ioapic() -> None:
    run = run_kvmdm(_elf("uart_irq"), "", b"ping\nquit\n", send_after=b"READY\n")
    assert "IRQS tx=ok rx=ok" in run.output
    assert "ping\n" in run.output


def test_kernel_that_never_loads_tr_does_port_io_at_cpl3_with_iopl3() -> None:
    # Triple-faulted before TR got its reset-state limit: kvm_pvm bound-checks CPL3 ports against TR's limit.
    run = run_kvmdm(_elf("bare_iopl"))
    assert run.reason.kind == "poweroff", run.reason
    assert run.output == ("bare_iopl: running at CPL 3\nbare_iopl: pci 00:00.0 id 12378086\n"
                          "bare_iopl: testdev 0xe0 12345678\nbare_iopl: done\n")
    assert run.status == 1  # debug-exit value 0


def test_stray_accesses_are_counted_not_fatal() -> None:
    run = run_kvmdm(_elf("hammer"))
    assert run.reason.kind == "poweroff" and run.status == 1
    assert run.exits["MmioRead"] > 0 and run.exits["MmioWrite"] > 0


def test_triple_fault_stops_only_that_guest_with_a_reason() -> None:
    run = run_kvmdm(_elf("triple"))
    assert run.reason.kind == "crash"
    assert "triple fault" in run.reason.message
    # The host process is fine: another guest runs right after.
    assert run_kvmdm(_elf("hello")).status == 1


def test_loop_guest_exits_once_per_out_to_an_unclaimed_port() -> None:
    # 600 and 500 print the same number of characters, so the only difference is the loop's outs.
    run = run_kvmdm(_elf("loop"), "loops=600 port=0x80")
    base = run_kvmdm(_elf("loop"), "loops=500 port=0x80")
    assert run.exits["IoOut"] - base.exits["IoOut"] == 100
