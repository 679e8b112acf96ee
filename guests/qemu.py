"""Run a test guest under QEMU, the reference VMM that kvmcore's behaviour is compared against.

The machine is QEMU's `pc` with the devices of the platform contract (guests/README.md): COM1 on
stdio, isa-debug-exit at 0x501 and pc-testdev. `-nodefaults` and no `-nographic`: with `-nographic`
QEMU tells SeaBIOS to mirror its console to COM1 and the default NIC's iPXE ROM prints a banner there,
which would break exact output comparisons; without them COM1 carries only what the guest writes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

QEMU_BINARY = "qemu-system-x86_64"
ACCELERATORS = ("tcg", "kvm")
READ_CHUNK = 4096
KILL_GRACE_S = 5.0


class QemuError(Exception):
    """QEMU could not run the guest to completion."""


class QemuNotFoundError(QemuError):
    """qemu-system-x86_64 is not installed (Debian package qemu-system-x86)."""


class QemuTimeoutError(QemuError):
    """The guest did not end the run within the timeout; QEMU was killed. Carries the output so far."""

    def __init__(self, message: str, output: str, stderr: str) -> None:
        super().__init__(message)
        self.output = output
        self.stderr = stderr


class QemuRun(NamedTuple):
    """QEMU's exit status and everything the guest wrote to COM1."""

    status: int
    output: str


def debug_exit_status(code: int) -> int:
    """The exit status QEMU's isa-debug-exit gives for a guest exit code: (code << 1) | 1."""
    if not 0 <= code <= 0xFF:
        raise ValueError(f"debug-exit code is one byte, got {code}")
    return (code << 1) | 1


def qemu_available() -> bool:
    return shutil.which(QEMU_BINARY) is not None


def qemu_command(
    elf: Path,
    append: str = "",
    accel: str = "tcg",
    memory_mib: int = 128,
    *,
    machine: str = "pc",
    testdev: bool = True,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The QEMU command line that runs `elf` as a Multiboot kernel on the contract platform.

    `machine`, `testdev` and `extra_args` exist for negative controls (a platform that breaks the
    contract on purpose: `pc,i8042=off`, no pc-testdev, a second UART...).
    """
    if accel not in ACCELERATORS:
        raise ValueError(f"accel must be one of {ACCELERATORS}, got {accel!r}")
    if memory_mib < 2:
        raise ValueError(f"memory_mib must be at least 2, got {memory_mib}")
    argv = [
        QEMU_BINARY,
        "-machine", machine,
        "-accel", accel,
        "-m", str(memory_mib),
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-kernel", str(elf),
        "-append", append,
        "-device", "isa-debug-exit,iobase=0x501,iosize=1",
        "-serial", "stdio",
        "-monitor", "none",
    ]  # fmt: skip
    if testdev:
        argv += ["-device", "pc-testdev"]
    return argv + list(extra_args)


def run_qemu(
    elf: Path | str,
    append: str = "",
    accel: str = "tcg",
    stdin_data: bytes = b"",
    timeout: float = 60,
    *,
    send_after: bytes | None = None,
    memory_mib: int = 128,
    machine: str = "pc",
    testdev: bool = True,
    extra_args: Sequence[str] = (),
) -> QemuRun:
    """Run `elf` until it exits (debug-exit, reset or triple fault with -no-reboot) and return
    (status, output). The output is COM1's bytes decoded as UTF-8 (invalid bytes backslash-escaped).

    `stdin_data` is fed to COM1's receiver: at once, or, with `send_after`, once that marker has
    appeared in the output (a guest must have enabled its receiver before the bytes arrive).
    Raises QemuNotFoundError, or QemuTimeoutError after `timeout` seconds.
    """
    binary = shutil.which(QEMU_BINARY)
    if binary is None:
        raise QemuNotFoundError(f"{QEMU_BINARY} not found on PATH (install the qemu-system-x86 package)")
    argv = qemu_command(
        Path(elf), append, accel, memory_mib, machine=machine, testdev=testdev, extra_args=extra_args
    )
    argv[0] = binary
    deadline = time.monotonic() + timeout

    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    output = bytearray()
    errors = bytearray()
    marker_seen = threading.Event()
    lock = threading.Lock()

    def pump_stdout() -> None:
        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        while chunk := os.read(fd, READ_CHUNK):
            with lock:
                output.extend(chunk)
                if send_after is not None and send_after in output:
                    marker_seen.set()
        marker_seen.set()  # EOF: stop waiting for a marker that will never come

    def pump_stderr() -> None:
        fd = proc.stderr.fileno()  # type: ignore[union-attr]
        while chunk := os.read(fd, READ_CHUNK):
            errors.extend(chunk)

    readers = [
        threading.Thread(target=pump_stdout, daemon=True),
        threading.Thread(target=pump_stderr, daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        if stdin_data:
            if send_after is not None:
                marker_seen.wait(max(0.0, deadline - time.monotonic()))
            if proc.poll() is None:
                try:
                    proc.stdin.write(stdin_data)
                    proc.stdin.flush()
                except BrokenPipeError:
                    pass  # QEMU already exited; its status tells the story
        # stdin stays open until QEMU exits, so the serial backend never sees EOF mid-run.
        try:
            status = proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(KILL_GRACE_S)
            for reader in readers:
                reader.join(KILL_GRACE_S)
            raise QemuTimeoutError(
                f"guest {elf} ({accel}) did not exit within {timeout} s; output so far: "
                f"{_decode(output)[-400:]!r}",
                _decode(output),
                _decode(errors),
            ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(KILL_GRACE_S)
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
    for reader in readers:
        reader.join(KILL_GRACE_S)
    proc.stdout.close()
    proc.stderr.close()
    return QemuRun(status, _decode(output))


def _decode(data: bytes | bytearray) -> str:
    return bytes(data).decode("utf-8", errors="backslashreplace")
