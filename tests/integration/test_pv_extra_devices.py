"""virtio-rng and virtio-console as PCI functions of real kvmdm VMs, and the `rng` / `console2` definition keys.

The test guests have no rng or console driver; what they prove is that the extra functions sit on the bus as
well-formed virtio-pci functions without disturbing anything: the virtio_blk guest's PCI scan walks past them
and finds its disk (same output as without them, i.e. as under QEMU), a scan without a disk reports none, the
hammer guest's stray accesses miss their BARs, and a jailed DM given `rng: true, console2: true` boots the demo.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.config import ConfigError, parse_definition
from daemon.vmm import MachineConfig, Vmm
from guests.build import build_demo, build_guest
from guests.kvmdm import run_kvmdm
from pv.console import Console
from pv.device import VIRTIO_ID_CONSOLE, VIRTIO_ID_RNG
from pv.rng import Rng
from tests.unit.guests.test_guests_virtio_qemu import (
    EXIT_FAIL,
    EXIT_OK,
    blk_elf,
    expected_blk_output,
    make_image,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "daemon"))

TESTS_GUESTS = Path(__file__).resolve().parents[1] / "guests"
VIRTIO_VENDOR = 0x1AF4
VIRTIO_PCI_MODERN_BASE = 0x1040  # virtio 1.2 §4.1.2.1: device ID = 0x1040 + virtio device type


# ------------------------------------------------------------------------------------------------ definition
def _definition(**kw: Any) -> dict[str, Any]:
    return {"name": "g", "kernel": "demo", **kw}


def test_rng_and_console2_default_to_off() -> None:
    d = parse_definition(_definition())
    assert d.rng is False and d.console2 is False


def test_rng_and_console2_are_accepted_and_survive_a_round_trip() -> None:
    d = parse_definition(_definition(rng=True, console2=True))
    assert d.rng is True and d.console2 is True
    assert parse_definition(d.to_dict()) == d


@pytest.mark.parametrize("key", ["rng", "console2"])
@pytest.mark.parametrize("value", [1, "true", None, {}])
def test_rng_and_console2_must_be_booleans(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"{key}: must be a boolean"):
        parse_definition(_definition(**{key: value}))


# ------------------------------------------------------------------------------------------------ PCI functions
@pytest.mark.kvm
def test_rng_and_console_appear_as_modern_virtio_pci_functions() -> None:
    cfg = MachineConfig(mem_size=64 << 20, kernel=build_demo().read_bytes(), cmdline="")
    vmm = Vmm(cfg).build()
    try:
        vmm.attach_virtio(Rng())
        vmm.attach_virtio(Console())
        vmm.finish()
        assert vmm.pci_root is not None
        ids = []
        for slot, _dev in vmm.pci_root.devices():
            buf = bytearray(4)
            vmm.pci_root.config_read(0, slot, 0, 0, memoryview(buf))
            vendor, device = struct.unpack("<HH", buf)
            if vendor == VIRTIO_VENDOR:
                ids.append(device)
        assert ids == [VIRTIO_PCI_MODERN_BASE + VIRTIO_ID_RNG, VIRTIO_PCI_MODERN_BASE + VIRTIO_ID_CONSOLE]
    finally:
        vmm.close()


@pytest.mark.kvm
def test_blk_guest_finds_its_disk_among_rng_and_console_functions(tmp_path: Path) -> None:
    image = make_image(tmp_path, 64)
    # rng and console in slots before the disk: the guest's bus scan must skip them
    run = run_kvmdm(blk_elf(), "sectors=64 seed=42", timeout=120, virtio=[Rng(), Console()],
                    disks=[(image, False)])
    assert run.output == expected_blk_output(64)
    assert run.status == EXIT_OK


@pytest.mark.kvm
def test_blk_guest_reports_no_disk_when_only_rng_and_console_are_present() -> None:
    run = run_kvmdm(blk_elf(), "", timeout=60, virtio=[Rng(), Console()])
    assert run.output == "virtio_blk: no virtio-blk device\n"
    assert run.status == EXIT_FAIL


@pytest.mark.kvm
def test_hammer_guest_stray_accesses_miss_the_rng_and_console_bars() -> None:
    elf = build_guest(TESTS_GUESTS / "hammer.S")
    plain = run_kvmdm(elf, timeout=120)
    extra = run_kvmdm(elf, timeout=120, virtio=[Rng(), Console()])
    assert "FAIL" not in extra.output
    assert extra.output == plain.output
    assert extra.status == plain.status == EXIT_OK


# ------------------------------------------------------------------------------------------------ real, jailed DM
@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.timeout(180)
def test_jailed_dm_boots_the_demo_with_rng_and_console2(tmp_path: Path) -> None:
    from kvmdmd_harness import wait_until

    from tests.integration.test_real_dm_process_model import DEMO_BANNER, RealDaemon

    d = RealDaemon(tmp_path).start()
    try:
        d.create("extra", "demo", rng=True, console2=True)
        assert d.json("GET", "/v1/guests/extra")["definition"]["rng"] is True
        d.start_guest("extra")
        wait_until(lambda: d.guest("extra")["state"] == "stopped", 20)
        out = d.console("extra")
        assert out.startswith(DEMO_BANNER + b"\n") and out.endswith(b"bye\n"), out
        h = d.health_of("extra")
        assert h["last_exit_code"] == 0 and "powered off" in h["last_exit_reason"], h
    finally:
        d.cleanup()
