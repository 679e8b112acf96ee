"""A firmware guest through kvmdmd and its real, jailed DM: the daemon checks the BIOS image at create time and
hands it to the DM on its kernel fd (the jail can open no file); SeaBIOS runs inside the DM and its banner, debug
log and "No bootable device" land in the guest's console log."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "daemon"))

from kvmdmd_harness import wait_until  # noqa: E402

from kvmcore.firmware import SEABIOS_PATH  # noqa: E402
from tests.integration.test_real_dm_process_model import RealDaemon  # noqa: E402

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.timeout(180),
              pytest.mark.skipif(not Path(SEABIOS_PATH).exists(), reason="Debian's seabios is not installed")]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[RealDaemon]:
    d = RealDaemon(tmp_path).start()
    yield d
    d.cleanup()


def test_seabios_runs_in_the_jailed_dm_and_writes_the_console_log(daemon: RealDaemon) -> None:
    daemon.json("POST", "/v1/guests", {"name": "fwd", "firmware": "seabios", "memory_mib": 64, "restart": "never"},
                expect=201)
    assert daemon.guest("fwd")["definition"]["firmware"] == "seabios"
    daemon.json("POST", "/v1/guests/fwd/start")
    wait_until(lambda: b"No bootable device" in daemon.console("fwd"), 60)
    log = daemon.console("fwd")
    assert b"SeaBIOS (version" in log  # COM1, through SeaBIOS's serial console
    assert b"[bios] Found QEMU fw_cfg" in log and b"[bios] QEMU fw_cfg DMA interface supported" in log
    assert daemon.guest("fwd")["state"] == "running"  # SeaBIOS waits before it resets to retry
    daemon.json("POST", "/v1/guests/fwd/stop")


@pytest.mark.parametrize("disks, boot_order", [
    ([], []),  # no disk at all: SeaBIOS's default list (floppy, ...) has nothing
    ([{"blank": True}], ["disk0"]),  # the whole boot order is a disk without a boot sector
])
def test_nothing_bootable_gives_the_bios_message_then_the_dm_exits_with_the_reason(
        daemon: RealDaemon, tmp_path: Path, disks: list[dict[str, bool]], boot_order: list[str]) -> None:
    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as f:
        f.truncate(8 << 20)
    doc = {"name": "fwnone", "firmware": "seabios", "memory_mib": 64, "restart": "never",
           "disks": [{"path": str(blank)} for _ in disks], "boot_order": boot_order}
    daemon.json("POST", "/v1/guests", doc, expect=201)
    daemon.json("POST", "/v1/guests/fwnone/start")
    g = wait_until(lambda: (x := daemon.guest("fwnone"))["state"] in ("stopped", "crashed", "failed") and x, 60, 0.2)
    log = daemon.console("fwnone")
    assert b"No bootable device.  Retrying in 5 seconds." in log  # the BIOS's own message, on COM1
    if disks:
        assert b"Boot failed: not a bootable disk" in log
    assert g["state"] == "crashed" and g["last_exit_code"] == 4 and g["restarts"] == 0, g
    assert "no bootable device" in g["last_event"], g  # /health says why
    assert "no bootable device" in daemon.health_of("fwnone")["last_event"]
    assert blank.read_bytes() == bytes(8 << 20)  # the BIOS read it, nothing wrote it


def test_a_non_bios_firmware_file_is_refused_at_create(daemon: RealDaemon, tmp_path: Path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(128 * 1024))
    status, _h, body = daemon.request("POST", "/v1/guests", {"name": "fwbad", "firmware": str(bad)})
    assert status == 422, body  # a validation error, as for any bad field
    assert b"firmware" in body and b"not a legacy BIOS image" in body
    assert daemon.request("GET", "/v1/guests/fwbad")[0] == 404
