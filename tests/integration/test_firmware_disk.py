"""SeaBIOS boots a virtio-blk disk under kvmdm on this host: a Debian-tools image (MBR, ext4, GRUB's boot.img
and core.img from grub-pc-bin, tests.fixtures.grub_disk) reaches GRUB's menu on the serial console; a disk with
no boot sector gets SeaBIOS's own messages.

Measured on the project machine (kvm_pvm: real and protected mode run in KVM's instruction emulator):
``kvmdm run guest.json`` to the boot sector ~5 s, to GRUB's menu ~61 s (QEMU-KVM, same BIOS and image: ~5.7 s
and ~58 s); GRUB's protected-mode start-up is emulated instruction by instruction, which dominates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmcore.firmware import SEABIOS_PATH
from tests.fixtures.grub_disk import GRUB_MARKER, DiskUnavailable, build_grub_disk

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.kvm, pytest.mark.timeout(400),
              pytest.mark.skipif(not os.path.exists(SEABIOS_PATH), reason="Debian's seabios is not installed")]
GRUB_LIMIT = 300.0


def _disk(tmp_path: Path) -> Path:
    try:
        return build_grub_disk(tmp_path / "grub.raw")
    except DiskUnavailable as e:
        pytest.skip(str(e))


def _run_until(definition: Path, markers: list[bytes], limit: float) -> tuple[bytes, dict[bytes, float]]:
    """Start `kvmdm run DEFINITION`, read its console until every marker was seen (or ``limit``), stop it."""
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", str(definition), "--timeout", str(limit)],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    os.set_blocking(p.stdout.fileno(), False)
    out = b""
    seen: dict[bytes, float] = {}
    try:
        while p.poll() is None and len(seen) < len(markers):
            chunk = p.stdout.read()
            if chunk:
                out += chunk
                for m in markers:
                    if m not in seen and m in out:
                        seen[m] = time.monotonic() - t0
            else:
                time.sleep(0.05)
        rest = p.stdout.read()
        out += rest or b""
    finally:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return out, seen


def test_seabios_boots_the_virtio_disk_into_grubs_menu_on_the_serial_console(tmp_path: Path) -> None:
    image = _disk(tmp_path)
    definition = tmp_path / "fw.json"
    definition.write_text(json.dumps({"name": "fwgrub", "memory_mib": 128, "firmware": "seabios",
                                      "disks": [{"path": str(image)}], "boot_order": ["disk0"]}))
    markers = [b"Booting from Hard Disk", b"[bios] Booting from 0000:7c00", GRUB_MARKER.encode(), b"GNU GRUB"]
    out, seen = _run_until(definition, markers, GRUB_LIMIT)
    print({m.decode(): round(t, 2) for m, t in seen.items()})
    assert b"[bios] found virtio-blk at 00:01.0" in out  # SeaBIOS's own driver on our virtio-pci transport
    assert b"[bios] Searching bootorder for: /pci@i0cf8/*@1" in out  # fw_cfg bootorder names slot 1
    for m in markers:
        assert m in seen, (m, out[-3000:])
    # GRUB's own output (its serial terminal), after the BIOS handed over.
    assert seen[GRUB_MARKER.encode()] > seen[b"Booting from Hard Disk"]


def test_a_disk_without_a_boot_sector_gets_the_bios_messages(tmp_path: Path) -> None:
    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as f:
        f.truncate(8 << 20)
    definition = tmp_path / "fw.json"
    definition.write_text(json.dumps({"name": "fwblank", "memory_mib": 64, "firmware": "seabios",
                                      "disks": [{"path": str(blank)}]}))
    out, seen = _run_until(definition, [b"not a bootable disk", b"No bootable device"], 120)
    assert b"Booting from Hard Disk" in out
    assert len(seen) == 2, out[-2000:]
    assert blank.read_bytes() == bytes(8 << 20)  # the BIOS read it, nothing wrote it


@pytest.mark.parametrize("boot_order, expected", [
    (["disk1"], b"[bios] Booting from 0000:7c00"),  # the GRUB disk's boot sector runs
    (None, b"not a bootable disk"),  # SeaBIOS's default: the first disk found (the blank one, slot 1)
])
def test_boot_order_picks_which_disk_the_bios_boots(tmp_path: Path, boot_order: list[str] | None,
                                                      expected: bytes) -> None:
    image = _disk(tmp_path)
    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as f:
        f.truncate(8 << 20)
    doc: dict[str, object] = {"name": "fworder", "memory_mib": 64, "firmware": "seabios",
                              "disks": [{"path": str(blank)}, {"path": str(image)}]}
    if boot_order is not None:
        doc["boot_order"] = boot_order
    definition = tmp_path / "fw.json"
    definition.write_text(json.dumps(doc))
    out, seen = _run_until(definition, [expected], 120)
    assert expected in seen, out[-3000:]
