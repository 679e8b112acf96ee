"""guests.qemu helpers that need no QEMU: argument validation and the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from guests.qemu import QemuNotFoundError, debug_exit_status, qemu_command, run_qemu


@pytest.mark.parametrize(("code", "status"), [(0, 1), (1, 3), (0x3F, 127), (0xFF, 511)])
def test_debug_exit_status_is_code_shifted_left_plus_one(code: int, status: int) -> None:
    assert debug_exit_status(code) == status


@pytest.mark.parametrize("code", [-1, 256])
def test_debug_exit_status_rejects_codes_outside_a_byte(code: int) -> None:
    with pytest.raises(ValueError, match="one byte"):
        debug_exit_status(code)


def test_qemu_command_has_the_contract_devices_and_no_bios_console_on_com1() -> None:
    argv = qemu_command(Path("/g.elf"), "a=1", "kvm", 256)
    joined = " ".join(argv)
    assert "-machine pc -accel kvm -m 256" in joined
    assert "-kernel /g.elf -append a=1" in joined
    assert "-device isa-debug-exit,iobase=0x501,iosize=1" in joined
    assert "-device pc-testdev" in joined
    assert "-serial stdio" in joined and "-no-reboot" in joined and "-nodefaults" in joined
    assert "-nographic" not in argv  # it would make SeaBIOS print on COM1


def test_qemu_command_negative_control_knobs() -> None:
    argv = qemu_command(Path("/g.elf"), machine="pc,i8042=off", testdev=False, extra_args=["-serial", "null"])
    assert "pc,i8042=off" in argv and "pc-testdev" not in argv and argv[-2:] == ["-serial", "null"]


def test_qemu_command_rejects_unknown_accelerator() -> None:
    with pytest.raises(ValueError, match="accel must be one of"):
        qemu_command(Path("/g.elf"), accel="hvf")


def test_qemu_command_rejects_tiny_memory() -> None:
    with pytest.raises(ValueError, match="memory_mib"):
        qemu_command(Path("/g.elf"), memory_mib=1)


def test_run_qemu_without_qemu_raises_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(QemuNotFoundError, match="qemu-system-x86_64 not found"):
        run_qemu(tmp_path / "g.elf")
