"""Each test guest, built from source and run under QEMU (TCG, and KVM where /dev/kvm works).

The exact serial output and exit status asserted here are the contract kvmcore must reproduce: the
lead's KVM tests compare against `guests.qemu.run_qemu`. Skipped when qemu-system-x86_64 is missing,
unless KVMDM_REQUIRE_QEMU=1; the KVM variants are skipped without /dev/kvm unless KVMDM_REQUIRE_KVM=1.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from guests.build import build_guest
from guests.qemu import QemuTimeoutError, debug_exit_status, qemu_available, run_qemu

pytestmark = pytest.mark.qemu

EXIT_OK = debug_exit_status(0)
EXIT_FAIL = debug_exit_status(1)
EXIT_BAD_OPTION = debug_exit_status(2)
EXIT_EXCEPTION = debug_exit_status(0x3F)
QEMU_ENDED_BY_RESET = 0  # -no-reboot: a reset or a triple fault ends QEMU with status 0

HELLO_OUTPUT = (
    "kvmdm demo guest: hello from CPL3\nmemory: 128 MiB\nsum of the first 1000 primes: 3682913\nbye\n"
)

PIO_MMIO_CHECKS = (
    "pio-dword", "pio-byte-0", "pio-byte-3", "pio-word-0", "pio-word-2", "pio-byte-write-1",
    "pio-word-write-2", "pio-dword-zero", "pio-unclaimed-byte", "pio-unclaimed-word",
    "pio-unclaimed-dword", "mmio-initially-zero", "mmio-byte", "mmio-word", "mmio-dword", "mmio-qword",
    "mmio-qword-byte-7", "mmio-qword-word-2", "mmio-qword-dword-4", "mmio-byte-into-dword",
    "mmio-dword-0x8000", "mmio-qword-last", "mmio-dword-last", "mmio-word-last", "mmio-byte-last",
    "mmio-byte-last-write", "mmio-untouched-still-zero",
)  # fmt: skip
PIO_MMIO_OUTPUT = "".join(f"PASS {name}\n" for name in PIO_MMIO_CHECKS) + "pio_mmio: 0 failed\n"

HAMMER_OUTPUT = (
    "".join(f"PASS port {port}\n" for port in ("0x200", "0x278", "0x2f8", "0x3e8", "0x4000", "0x7f00"))
    + "".join(f"PASS mmio {a}\n" for a in ("0xe0000000", "0xf0000000", "0xfed01000", "0xff010000"))
    + "PASS ram canary\n"
    + "hammer: 16 rounds, 0 failed\n"
)

UART_TX_LINE = "uart_irq: this line was sent one byte per THRE interrupt\n"


def _env_flag(name: str) -> bool:
    return os.environ.get(name) == "1"


@pytest.fixture(autouse=True)
def _require_qemu() -> None:
    if not qemu_available():
        if _env_flag("KVMDM_REQUIRE_QEMU"):
            pytest.fail("qemu-system-x86_64 not found and KVMDM_REQUIRE_QEMU=1")
        pytest.skip("qemu-system-x86_64 not installed (package qemu-system-x86)")


def _kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


@pytest.fixture(params=["tcg", pytest.param("kvm", marks=pytest.mark.kvm)])
def accel(request: pytest.FixtureRequest) -> str:
    if request.param == "kvm" and not _kvm_usable():
        if _env_flag("KVMDM_REQUIRE_KVM"):
            pytest.fail("/dev/kvm not usable and KVMDM_REQUIRE_KVM=1")
        pytest.skip("/dev/kvm not available")
    return str(request.param)


@pytest.fixture(scope="module")
def guest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("guests")


@pytest.fixture(scope="module")
def elf(guest_dir: Path) -> Callable[[str], Path]:
    """Build a guest by name (once per module: build_guest caches)."""

    def _build(name: str) -> Path:
        return build_guest(name, guest_dir)

    return _build


# ---- hello -------------------------------------------------------------------------------------------


def test_hello_prints_banner_memory_prime_sum_and_bye(elf, accel: str) -> None:
    assert run_qemu(elf("hello"), accel=accel) == (EXIT_OK, HELLO_OUTPUT)


def test_hello_memory_line_follows_the_multiboot_memory_size(elf) -> None:
    status, output = run_qemu(elf("hello"), memory_mib=256)
    assert status == EXIT_OK
    assert "memory: 256 MiB\n" in output


def test_hello_primes_option_from_the_cmdline_changes_the_sum(elf) -> None:
    status, output = run_qemu(elf("hello"), append="primes=10")
    assert status == EXIT_OK
    assert "sum of the first 10 primes: 129\n" in output


def test_hello_accepts_hex_option_values(elf) -> None:
    _, output = run_qemu(elf("hello"), append="verbose=1 primes=0x0a")
    assert "sum of the first 10 primes: 129\n" in output


@pytest.mark.parametrize("value", ["abc", "12x", "0x", "", "99999999999999999999999", "0x10000000000000000"])
def test_malformed_option_value_exits_with_bad_option(elf, value: str) -> None:
    assert run_qemu(elf("hello"), append=f"primes={value}") == (
        EXIT_BAD_OPTION,
        "kvmdm demo guest: hello from CPL3\nmemory: 128 MiB\nbad option: primes\n",
    )


def test_option_names_match_whole_words_only(elf) -> None:
    # "xprimes=5" and "primesx=5" are other options; the default (1000) applies.
    _, output = run_qemu(elf("hello"), append="xprimes=5 primesx=5")
    assert "sum of the first 1000 primes: 3682913\n" in output


# ---- pio_mmio ----------------------------------------------------------------------------------------


def test_pio_mmio_round_trips_through_pc_testdev(elf, accel: str) -> None:
    assert run_qemu(elf("pio_mmio"), accel=accel) == (EXIT_OK, PIO_MMIO_OUTPUT)


def test_pio_mmio_fails_without_the_test_device(elf) -> None:
    # Negative control: the checks can fail. Without pc-testdev the ports float and MMIO reads 0.
    status, output = run_qemu(elf("pio_mmio"), testdev=False)
    assert status == EXIT_FAIL
    assert "FAIL pio-dword got=0xffffffff want=0x12345678\n" in output
    assert "PASS pio-unclaimed-byte\n" in output
    assert re.search(r"^pio_mmio: [1-9][0-9]* failed\n\Z", output, re.M), output


# ---- uart_irq ----------------------------------------------------------------------------------------


def test_uart_irq_sends_by_thre_irq_and_echoes_input_until_quit(elf, accel: str) -> None:
    result = run_qemu(elf("uart_irq"), accel=accel, stdin_data=b"hello\nquit\n", send_after=b"READY\n")
    assert result == (EXIT_OK, UART_TX_LINE + "READY\nhello\nquit\nIRQS tx=ok rx=ok rxbytes=11\n")


def test_uart_irq_quit_must_be_a_whole_line(elf) -> None:
    status, output = run_qemu(elf("uart_irq"), stdin_data=b"unquit\nquit\n", send_after=b"READY\n")
    assert (status, output) == (EXIT_OK, UART_TX_LINE + "READY\nunquit\nquit\nIRQS tx=ok rx=ok rxbytes=12\n")


def test_uart_irq_lines_option_stops_after_n_lines(elf) -> None:
    status, output = run_qemu(
        elf("uart_irq"), append="lines=2", stdin_data=b"a\nb\nc\n", send_after=b"READY\n"
    )
    assert (status, output) == (EXIT_OK, UART_TX_LINE + "READY\na\nb\nIRQS tx=ok rx=ok rxbytes=4\n")


def test_uart_irq_without_input_fails_by_watchdog_instead_of_hanging(elf) -> None:
    status, output = run_qemu(elf("uart_irq"), append="timeout=300", timeout=60)
    assert (status, output) == (EXIT_FAIL, UART_TX_LINE + "READY\n\nFAIL rx: no input interrupt\n")


# ---- reset / triple ----------------------------------------------------------------------------------


def test_reset_via_i8042_ends_the_run_after_its_banner(elf, accel: str) -> None:
    assert run_qemu(elf("reset"), accel=accel) == (QEMU_ENDED_BY_RESET, "resetting\n")


def test_triple_fault_ends_the_run_after_its_banner(elf, accel: str) -> None:
    assert run_qemu(elf("triple"), accel=accel) == (QEMU_ENDED_BY_RESET, "tripling\n")


def test_reset_guest_reports_a_platform_that_ignores_the_reset(elf) -> None:
    # Negative control: without an i8042 the 0xFE command goes nowhere and the guest says so.
    assert run_qemu(elf("reset"), machine="pc,i8042=off") == (EXIT_FAIL, "resetting\nreset did not happen\n")


# ---- loop --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("append", "line"), [("loops=1000 port=0x80", "loop: 1000 outs to port 0x80\n"),
                                              ("loops=0", "loop: 0 outs to port 0x80\n"),
                                              ("", "loop: 100000 outs to port 0x80\n"),
                                              ("loops=5 port=0xe0", "loop: 5 outs to port 0xe0\n")])  # fmt: skip
def test_loop_does_n_outs_to_the_port_then_exits(elf, append: str, line: str) -> None:
    assert run_qemu(elf("loop"), append=append) == (EXIT_OK, line)


def test_loop_output_is_the_same_under_each_accelerator(elf, accel: str) -> None:
    assert run_qemu(elf("loop"), append="loops=2000 port=0x80", accel=accel) == (
        EXIT_OK,
        "loop: 2000 outs to port 0x80\n",
    )


@pytest.mark.parametrize(("append", "line"), [("loops=ten", "bad option: loops\n"),
                                              ("port=0x10000", "bad option: port\n")])  # fmt: skip
def test_loop_rejects_bad_options(elf, append: str, line: str) -> None:
    assert run_qemu(elf("loop"), append=append) == (EXIT_BAD_OPTION, line)


def test_loop_outs_reach_the_port(elf) -> None:
    # The outs really happen: aimed at the debug-exit port, the first one ends the run with
    # status (al << 1) | 1, and al is 0 in the loop.
    assert run_qemu(elf("loop"), append="loops=3 port=0x501") == (EXIT_OK, "")


# ---- hammer ------------------------------------------------------------------------------------------


def test_hammer_stray_port_and_mmio_accesses_are_harmless(elf, accel: str) -> None:
    assert run_qemu(elf("hammer"), accel=accel) == (EXIT_OK, HAMMER_OUTPUT)


def test_hammer_rejects_zero_rounds(elf) -> None:
    assert run_qemu(elf("hammer"), append="rounds=0") == (EXIT_BAD_OPTION, "bad option: rounds\n")


def test_hammer_flags_a_claimed_port_as_failure(elf) -> None:
    # Negative control: a device at one of the hammered ports (a second UART at 0x2f8) makes it fail.
    status, output = run_qemu(elf("hammer"), extra_args=["-serial", "null"])
    assert status == EXIT_FAIL
    assert re.search(r"^FAIL port 0x2f8 got=0x[0-9a-f]+$", output, re.M), output
    assert output.endswith("hammer: 16 rounds, 1 failed\n")


# ---- runtime: exceptions and services ----------------------------------------------------------------


def _write_guest(tmp_path: Path, name: str, body: str) -> Path:
    src = tmp_path / f"{name}.S"
    src.write_text('.include "rt.inc"\n.text\n.code64\n.globl guest_main\nguest_main:\n' + body)
    return src


def test_exception_prints_vector_rip_error_and_exits_with_failure(tmp_path: Path, accel: str) -> None:
    src = _write_guest(
        tmp_path,
        "gpfault",
        "    movabsq $0x8000000000000000, %rax\n    movq (%rax), %rax\n    xorl %eax, %eax\n    ret\n",
    )
    status, output = run_qemu(build_guest(src, tmp_path / "out"), accel=accel)
    assert status == EXIT_EXCEPTION
    assert re.fullmatch(r"EXCEPTION 13 rip=0x10[0-9a-f]{4} err=0x0\n", output), output


def test_plain_ud2_at_cpl3_is_an_exception_not_a_service_call(tmp_path: Path) -> None:
    src = _write_guest(tmp_path, "ud", "    ud2\n    .word 0x1234\n    xorl %eax, %eax\n    ret\n")
    status, output = run_qemu(build_guest(src, tmp_path / "out"))
    assert status == EXIT_EXCEPTION
    assert re.fullmatch(r"EXCEPTION 6 rip=0x10[0-9a-f]{4} err=0x0\n", output), output


def test_unknown_service_number_returns_minus_one(tmp_path: Path, accel: str) -> None:
    src = _write_guest(
        tmp_path,
        "badsvc",
        "    movl $99, %eax\n    SERVICE\n    movq %rax, %rdi\n    call rt_puthex\n"
        '    PUTS "\\n"\n    xorl %eax, %eax\n    ret\n',
    )
    assert run_qemu(build_guest(src, tmp_path / "out"), accel=accel) == (EXIT_OK, "0xffffffffffffffff\n")


def test_guest_return_value_is_the_exit_code(tmp_path: Path) -> None:
    src = _write_guest(tmp_path, "ret7", "    movl $7, %eax\n    ret\n")
    assert run_qemu(build_guest(src, tmp_path / "out")) == (debug_exit_status(7), "")


def test_run_qemu_times_out_on_a_guest_that_never_exits(tmp_path: Path) -> None:
    src = _write_guest(tmp_path, "spin", '    PUTS "spinning\\n"\n1:  jmp 1b\n')
    with pytest.raises(QemuTimeoutError) as info:
        run_qemu(build_guest(src, tmp_path / "out"), timeout=2)
    assert info.value.output == "spinning\n"
