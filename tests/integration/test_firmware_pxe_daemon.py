"""iPXE in a firmware guest run by kvmdmd: the jailed DM cannot open the option ROM, so the daemon hands it the
nic_rom file on ``--nic-rom-fd`` (daemon.messages.DM_FDS) and the DM puts its x86 image into fw_cfg as
``pci1af4,1041.rom``; SeaBIOS runs it as the virtio-net function's ROM, boots its entry first and iPXE initialises
kvmdm's nic. Both ways a DM is started (``--dm-spawn exec`` and the zygote's fork, whose fds travel by
SCM_RIGHTS) carry the fd. A firmware guest without nic_rom gets no ROM and no fd.

On kvm_pvm iPXE stops right after "initialising devices" (BSWAP in KVM's instruction emulator; see
tests/integration/test_firmware_pxe.py); DHCP, TFTP and the downloaded kernel are the real-KVM lane's
(tests/realkvm/test_firmware_pxe.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "daemon"))

from kvmdmd_harness import wait_until  # noqa: E402

from kvmcore.firmware import IPXE_VIRTIO_ROM, SEABIOS_PATH  # noqa: E402
from tests.integration.test_real_dm_process_model import RealDaemon  # noqa: E402

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.timeout(240),
              pytest.mark.skipif(not (Path(SEABIOS_PATH).exists() and Path(IPXE_VIRTIO_ROM).exists()),
                                 reason="Debian's seabios and ipxe-qemu are needed")]

MARKERS = [b"iPXE (http://ipxe.org) 00:01.0", b"[bios] Booting from ROM", b"iPXE (PCI 00:01.0) starting execution",
           b"iPXE initialising devices...ok"]


class SpawnDaemon(RealDaemon):
    mode = "zygote"

    def argv(self) -> list[str]:
        return [*super().argv(), "--dm-spawn", self.mode]


@pytest.fixture(params=["zygote", "exec"])
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SpawnDaemon]:
    d = SpawnDaemon(tmp_path)
    d.mode = request.param
    d.start_timeout = 60.0
    d.start()
    yield d
    d.cleanup()


def _dm_cmdlines(d: SpawnDaemon) -> list[list[str]]:
    out = []
    for pid in d.dm_pids():
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0"))
        except OSError:
            pass
    return out


def test_the_jailed_dm_gets_the_nic_rom_on_its_fd_and_ipxe_initialises_the_nic(daemon: SpawnDaemon) -> None:
    daemon.json("POST", "/v1/guests", {"name": "fwpxed", "firmware": "seabios", "nic_rom": "ipxe", "memory_mib": 64,
                                       "nics": [{"mac": "52:54:00:12:34:56"}], "boot_order": ["nic0"],
                                       "restart": "never"}, expect=201)
    assert daemon.guest("fwpxed")["definition"]["nic_rom"] == "ipxe"
    daemon.json("POST", "/v1/guests/fwpxed/start")
    cmdlines = wait_until(lambda: _dm_cmdlines(daemon), 30)
    assert all("--nic-rom-fd" in argv for argv in cmdlines), cmdlines
    wait_until(lambda: all(m in daemon.console("fwpxed") for m in MARKERS), 150, 0.2)
    log = daemon.console("fwpxed")
    # iPXE's own text in order (SeaBIOS's debug-port lines join the log as whole lines, so not interleaved exactly).
    positions = [log.find(m) for m in MARKERS if not m.startswith(b"[bios]")]
    assert positions == sorted(positions), (positions, log[-3000:])
    # The ROM's boot entry is the nic's (its PCI path is in bootorder), so SeaBIOS boots it first.
    assert b"[bios] Searching bootorder for: /pci@i0cf8/*@1" in log
    if daemon.guest("fwpxed")["state"] == "running":
        daemon.json("POST", "/v1/guests/fwpxed/stop")


def test_a_firmware_guest_without_nic_rom_gets_no_rom_and_no_fd(daemon: SpawnDaemon) -> None:
    daemon.json("POST", "/v1/guests", {"name": "fwnorom", "firmware": "seabios", "memory_mib": 64,
                                       "nics": [{}], "boot_order": ["nic0"], "restart": "never"}, expect=201)
    daemon.json("POST", "/v1/guests/fwnorom/start")
    cmdlines = wait_until(lambda: _dm_cmdlines(daemon), 30)
    assert not any("--nic-rom-fd" in argv for argv in cmdlines), cmdlines
    wait_until(lambda: b"No bootable device" in daemon.console("fwnorom"), 90, 0.2)
    assert b"iPXE" not in daemon.console("fwnorom")
    daemon.json("POST", "/v1/guests/fwnorom/stop")
