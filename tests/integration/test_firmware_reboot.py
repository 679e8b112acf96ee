"""A guest reboot through the BIOS path comes back through SeaBIOS (issue 10), under ``kvmdm run`` and kvmdmd.

The guest is tests.fixtures.reboot_disk's boot sector: it counts its boots in sector 1 through INT 13h (SeaBIOS's
virtio-blk driver, in 16-bit mode), resets through port 0xcf9 on its first boot and powers off (ACPI S5) on its
second. Each test checks both boots went through SeaBIOS (two banners on COM1), the counter lines 1 then 2, how
the run ended, and that the image changed in sector 1 only.

Measured on the project machine (kvm_pvm, 64 MiB guest): ``kvmdm run`` start -> power-off of the second boot
~3.3 s (each boot ~1.5 s from the reset vector to the boot sector); through kvmdmd, start -> stopped ~5 s.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "daemon"))

from kvmdmd_harness import wait_until  # noqa: E402

from kvmcore.firmware import SEABIOS_PATH  # noqa: E402
from tests.fixtures.reboot_disk import (  # noqa: E402
    BOOT_LINE,
    POWEROFF_LINE,
    RESET_LINE,
    DiskUnavailable,
    boot_count,
    build_reboot_disk,
    changed_sectors,
)
from tests.integration.test_real_dm_process_model import RealDaemon  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.kvm, pytest.mark.timeout(180),
              pytest.mark.skipif(not os.path.exists(SEABIOS_PATH), reason="Debian's seabios is not installed")]
# SeaBIOS's banner on COM1 (its serial console), not the "[bios] " copy from the debug port.
COM1_BANNER = re.compile(rb"^(?!\[bios\] ).*SeaBIOS \(version", re.M)


def _disk(tmp_path: Path) -> tuple[Path, bytes]:
    try:
        image = build_reboot_disk(tmp_path / "reboot.raw")
    except DiskUnavailable as e:
        pytest.skip(str(e))
    return image, image.read_bytes()


def _definition(tmp_path: Path, name: str, disk: dict[str, object]) -> dict[str, object]:
    return {"name": name, "memory_mib": 64, "firmware": "seabios", "disks": [disk], "boot_order": ["disk0"]}


def kvmdm_run(tmp_path: Path, doc: dict[str, object], *args: str,
              timeout: float = 120) -> tuple[subprocess.CompletedProcess[bytes], float]:
    definition = tmp_path / f"{doc['name']}.json"
    definition.write_text(json.dumps(doc))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "daemon.cli", "run", str(definition), "--timeout", "90", *args],
                       capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    return p, time.monotonic() - t0


def assert_two_boots(console: bytes) -> None:
    """Both boots went through SeaBIOS, in order: banner, boot 1, reset, banner, boot 2, power-off."""
    banners = [m.start() for m in COM1_BANNER.finditer(console)]
    assert len(banners) == 2, console[-3000:]
    marks = [console.find(line.encode()) for line in (BOOT_LINE.format(n=1), RESET_LINE, BOOT_LINE.format(n=2),
                                                      POWEROFF_LINE)]
    assert -1 not in marks, (marks, console[-3000:])
    assert banners[0] < marks[0] < marks[1] < banners[1] < marks[2] < marks[3], (banners, marks)
    assert BOOT_LINE.format(n=3).encode() not in console


def assert_only_the_counter_changed(before: bytes, after: bytes, count: int) -> None:
    assert changed_sectors(before, after) == [1]  # the boot sector and the rest of the disk are untouched
    assert int.from_bytes(after[520:522], "little") == count


# ----------------------------------------------------------------------------------------------- kvmdm run
@pytest.mark.parametrize("backend", ["inline", "vhost-user"])  # vhost-user: a kvmdm-backend started per boot
def test_kvmdm_run_reboots_the_guest_in_place_through_seabios(tmp_path: Path, backend: str) -> None:
    image, before = _disk(tmp_path)
    p, elapsed = kvmdm_run(tmp_path, _definition(tmp_path, "rbrun", {"path": str(image), "backend": backend}))
    print(f"kvmdm run ({backend}), two boots: {elapsed:.2f} s")
    assert p.returncode == 0, p.stderr[-2000:]  # the second boot's ACPI S5: a plain power-off
    assert_two_boots(p.stdout)
    assert b"guest requested reset (port 0xcf9); rebooting (boot 2)" in p.stderr
    assert boot_count(image) == 2
    assert_only_the_counter_changed(before, image.read_bytes(), 2)


def test_kvmdm_run_no_reboot_exits_3_at_the_first_reset(tmp_path: Path) -> None:
    image, before = _disk(tmp_path)
    p, _ = kvmdm_run(tmp_path, _definition(tmp_path, "rbnone", {"path": str(image)}), "--no-reboot")
    assert p.returncode == 3, p.stderr[-2000:]
    assert len(COM1_BANNER.findall(p.stdout)) == 1
    assert BOOT_LINE.format(n=1).encode() in p.stdout and BOOT_LINE.format(n=2).encode() not in p.stdout
    assert b"guest requested reset (port 0xcf9)" in p.stderr and b"rebooting" not in p.stderr
    assert_only_the_counter_changed(before, image.read_bytes(), 1)


def test_kvmdm_run_reboots_a_kernel_guest_too_and_leaks_nothing_per_boot(tmp_path: Path) -> None:
    # tests/guests/reset.S resets through the i8042 at once, every boot: kvmdm run reloads the kernel and boots it
    # again, hundreds of times, until --timeout. Each boot's VM is closed: /dev/kvm (it leaked one fd per VM),
    # the VM, vCPU and eventfd fds, guest RAM, threads.
    from guests.build import build_guest

    elf = build_guest(Path(__file__).resolve().parents[1] / "guests" / "reset.S")
    err = tmp_path / "err.txt"
    with open(err, "wb") as errf:
        p = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--kernel", str(elf), "--timeout", "6"],
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=errf)
    try:
        samples = []
        for _ in range(2):
            time.sleep(2.0)
            samples.append((len(os.listdir(f"/proc/{p.pid}/fd")), err.read_bytes().count(b"rebooting")))
    finally:
        rc = p.wait(30)
    (fds1, boots1), (fds2, boots2) = samples
    assert boots2 - boots1 > 10, samples  # it keeps rebooting
    assert fds2 <= fds1 + 4, samples  # a few fds of the boot under way, never one per boot
    assert rc == 1 and b"stopped after --timeout 6 s" in err.read_bytes()


# -------------------------------------------------------------------------------------------------- kvmdmd
class SpawnDaemon(RealDaemon):
    """kvmdmd starting its DMs one way: forked from the zygote (the default) or exec'd (``--dm-spawn exec``)."""

    mode = "zygote"

    def argv(self) -> list[str]:
        return [*super().argv(), "--dm-spawn", self.mode]


@pytest.fixture(params=["zygote", "exec"])
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RealDaemon]:
    d = SpawnDaemon(tmp_path)
    d.mode = request.param
    d.start()
    yield d
    d.cleanup()


@pytest.mark.root
@pytest.mark.parametrize("backend", ["inline", "vhost-user"])  # vhost-user: the daemon's jailed kvmdm-backend
def test_kvmdmd_restarts_the_reset_guest_through_seabios_in_one_console_log(daemon: RealDaemon, tmp_path: Path,
                                                                              backend: str) -> None:
    image, before = _disk(tmp_path)
    daemon.json("POST", "/v1/guests", _definition(tmp_path, "rbd", {"path": str(image), "backend": backend}),
                expect=201)
    t0 = time.monotonic()
    daemon.json("POST", "/v1/guests/rbd/start")
    g = wait_until(lambda: (x := daemon.guest("rbd"))["state"] in ("stopped", "crashed", "failed")
                   and x["restarts"] >= 1 and x, 120, 0.2)
    print(f"kvmdmd, start -> stopped after two boots: {time.monotonic() - t0:.2f} s")
    assert g["state"] == "stopped" and g["last_exit_code"] == 0 and g["restarts"] == 1, g
    assert "powered off" in g["last_exit_reason"], g
    # A guest's reboot continues its console log (no console.log.1), as QEMU's serial log does.
    console = daemon.console("rbd")
    assert_two_boots(console)
    assert not (daemon.state_dir / "guests" / "rbd" / "console.log.1").exists()
    health = daemon.health_of("rbd")
    assert health["restarts"] == 1 and health["state"] == "stopped", health
    assert_only_the_counter_changed(before, image.read_bytes(), 2)
    # An operator's start is a new run: a new log, the rebooted one kept as console.log.1.
    image.write_bytes(before)
    daemon.json("POST", "/v1/guests/rbd/start")
    wait_until(lambda: daemon.guest("rbd")["state"] == "stopped" and daemon.guest("rbd")["restarts"] >= 2, 120, 0.2)
    assert_two_boots(daemon.console("rbd"))
    assert_two_boots((daemon.state_dir / "guests" / "rbd" / "console.log.1").read_bytes())
