"""iPXE as the virtio-net option ROM of a firmware guest on this host: SeaBIOS deploys fw_cfg's
``pci1af4,1041.rom`` (the legacy half of Debian's ipxe-qemu efi-virtio.rom) as kvmdm's virtio-net function's
ROM, the boot order puts that nic first, and iPXE finds and initialises the device.

On kvm_pvm iPXE stops right after that: its protected-mode code runs in KVM's instruction emulator, which cannot
execute BSWAP ("KVM internal error: emulation failure", bytes 0f cf); QEMU-KVM stops at the same spot here. DHCP,
TFTP and the downloaded kernel are the real-KVM lane's (tests/realkvm/test_firmware.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmcore.firmware import IPXE_VIRTIO_ROM, SEABIOS_PATH
from tests.integration.test_run_definitions import netns

REPO = Path(__file__).resolve().parents[2]
GUEST_MAC = "52:54:00:12:34:56"
pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.timeout(240),
              pytest.mark.skipif(not (os.path.exists(SEABIOS_PATH) and os.path.exists(IPXE_VIRTIO_ROM)),
                                 reason="Debian's seabios and ipxe-qemu are needed")]


def test_seabios_runs_ipxe_as_the_virtio_net_rom_and_ipxe_initialises_the_nic(tmp_path: Path) -> None:
    definition = tmp_path / "pxe.json"
    definition.write_text(json.dumps({"name": "fwpxe", "memory_mib": 64, "firmware": "seabios", "nic_rom": "ipxe",
                                      "nics": [{"mac": GUEST_MAC, "bridge": "kvbr0"}], "boot_order": ["nic0"]}))
    # iPXE's init banner (SeaBIOS ran the ROM with the nic's bdf), SeaBIOS booting the ROM's boot entry, iPXE
    # running and binding its virtio-net driver to kvmdm's device.
    markers = [b"iPXE (http://ipxe.org) 00:01.0", b"[bios] Booting from ROM", b"iPXE (PCI 00:01.0) starting execution",
               b"iPXE initialising devices...ok"]
    with netns() as ns:
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "daemon.cli", "run", str(definition),
                              "--timeout", "180"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout is not None
        os.set_blocking(p.stdout.fileno(), False)
        out = b""
        deadline = time.monotonic() + 200
        try:
            while p.poll() is None and time.monotonic() < deadline and not all(m in out for m in markers):
                chunk = p.stdout.read()
                if chunk:
                    out += chunk
                else:
                    time.sleep(0.05)
        finally:
            p.terminate()
            p.wait(30)
    for m in markers:
        assert m in out, (m, out[-3000:])
    # The ROM's boot entry is the nic's (its PCI path is in bootorder), so SeaBIOS boots it first.
    assert b"[bios] Searching bootorder for: /pci@i0cf8/*@1" in out
