"""SeaBIOS (Debian's bios-256k.bin, unmodified) under kvmdm on this host: `kvmdm run --firmware seabios`.

Measured on the project machine (kvm_pvm, real mode in KVM's emulator): the banner on the debug port at ~0.01 s,
on COM1 (sercon) at ~0.7 s, "No bootable device" at ~2.4 s after the vCPU starts, the end of the run (SeaBIOS's
reset 5 s later, daemon.firmware_boot.BOOT_FAIL_WAIT_MS) at ~7.5 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmcore.firmware import SEABIOS_PATH

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120),
              pytest.mark.skipif(not os.path.exists(SEABIOS_PATH), reason="Debian's seabios is not installed")]


def _run(*args: str, timeout: float = 90) -> tuple[subprocess.CompletedProcess[bytes], float]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "daemon.cli", "run", *args], capture_output=True, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    return p, time.monotonic() - t0


def test_seabios_banner_on_com1_and_debug_port_then_its_own_no_boot_message() -> None:
    p, _elapsed = _run("--firmware", "seabios", "--timeout", "20")
    out = p.stdout
    # COM1 through SeaBIOS's serial console (fw_cfg etc/sercon-port = 0x3f8), not prefixed.
    assert b"\nSeaBIOS (version" in out or out.startswith(b"SeaBIOS (version") or b"\x1b[0mSeaBIOS (version" in out
    # The debug port (0x402), in whole "[bios] " lines: fw_cfg with DMA found, e820 from etc/e820, the ACPI tables
    # from the table loader, shadow RAM locked.
    for line in (b"[bios] SeaBIOS (version", b"[bios] Found QEMU fw_cfg", b"[bios] QEMU fw_cfg DMA interface supported",
                 b"[bios] qemu/e820: addr 0x0000000000000000 len 0x0000000008000000 [RAM]",
                 b"[bios] Moving pm_base to 0x600", b"[bios] ACPI: parse DSDT at"):
        assert line in out, line
    # SeaBIOS's own words, then the reset it does to retry ends the run as a boot failure (issue 10): exit 4 with
    # the reason, instead of rebooting into the same failure forever.
    assert b"No bootable device.  Retrying in 5 seconds." in out
    assert p.returncode == 4, p.stderr
    assert b"kvmdm: no bootable device: the BIOS found nothing to boot in the boot order and reset" in p.stderr


@pytest.mark.parametrize("content, message", [
    (bytes(100_000), b"multiple of 64 KiB"),
    (bytes(256 * 1024), b"not a legacy BIOS image"),
])
def test_bad_firmware_file_exits_2_with_the_reason_before_the_guest_runs(tmp_path: Path, content: bytes,
                                                                         message: bytes) -> None:
    bad = tmp_path / "bios.bin"
    bad.write_bytes(content)
    p, elapsed = _run("--firmware", str(bad), timeout=30)
    assert p.returncode == 2
    assert message in p.stderr and b"--firmware" in p.stderr
    assert p.stdout == b""


def test_missing_firmware_file_exits_2(tmp_path: Path) -> None:
    p, _ = _run("--firmware", str(tmp_path / "nope.bin"), timeout=30)
    assert p.returncode == 2 and b"file does not exist" in p.stderr
