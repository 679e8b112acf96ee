"""An HVM guest that boots its own disk: SeaBIOS (Debian's bios-256k.bin) -> GRUB (grub-pc-bin, installed to the
image's MBR) -> Debian's cloud kernel and a busybox initramfs from the image's ext4 partition -> userspace, which
reads its own root disk back (the partition's first MiB against the image's, the ext4 superblock, GRUB's config
text) and powers off.

The disk is built with Debian's tools (tests.fixtures.grub_disk), the kernel and initramfs are the Linux test
guest's (tests.fixtures.linux_guest) with this test's script. ``kvmdm run guest.json`` with ``"firmware":
"seabios"`` runs it; ACPI S5 power-off exits 0. Needs hardware-assisted KVM (the real-KVM lane): on kvm_pvm
GRUB's menu takes a minute and the kernel cannot finish booting (tests/integration/test_firmware_disk.py covers
that host up to GRUB).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from kvmcore.firmware import SEABIOS_PATH
from tests.fixtures.grub_disk import GRUB_MARKER, PART_START_SECTOR, DiskUnavailable, build_grub_disk
from tests.fixtures.linux_guest import require_linux_guest
from tests.realkvm import guest
from tests.realkvm.l0fault import kvmdm_l0_fault, run_streaming, with_l0_retry

pytestmark = [pytest.mark.realkvm, pytest.mark.timeout(1800),
              pytest.mark.skipif(not os.path.exists(SEABIOS_PATH), reason="Debian's seabios is not installed")]

CMDLINE = "console=ttyS0 panic=-1"
RUN_LIMIT = 600.0  # the lane's L1 runs on TCG
STALL_LIMIT = 180.0  # BIOS, GRUB (its menu redraws) and Linux (no "quiet") all print: this long a silence is a hang

# Runs as /test.sh after the virtio drivers are bound (tests.fixtures.linux_guest's init).
SCRIPT = r"""
echo "CHK root_dev=$(ls /sys/block/vda/ | grep -c '^vda1$')"
echo "CHK root_md5=$(dd if=/dev/vda1 bs=1048576 count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "CHK ext4_magic=$(dd if=/dev/vda1 bs=1 skip=1080 count=2 2>/dev/null | od -An -tx2 | tr -d ' ')"
echo "CHK grub_cfg=$(dd if=/dev/vda1 bs=1048576 2>/dev/null | strings | grep -c @MARKER@)"
""".replace("@MARKER@", GRUB_MARKER)


def test_seabios_grub_and_linux_from_the_virtio_disk_to_userspace(tmp_path: Path) -> None:
    vmlinuz, initrd = require_linux_guest(tmp_path / "linux", SCRIPT)
    try:
        image = build_grub_disk(tmp_path / "root.raw", kernel=vmlinuz, initrd=initrd, cmdline=CMDLINE,
                                size_mib=128)
    except DiskUnavailable as e:
        pytest.skip(str(e))
    definition = tmp_path / "hvm.json"
    definition.write_text(json.dumps({"name": "hvm", "memory_mib": 512, "firmware": "seabios",
                                      "disks": [{"path": str(image)}], "boot_order": ["disk0"]}))
    r = with_l0_retry(lambda: run_streaming(
        [sys.executable, "-m", "daemon.cli", "run", str(definition), "--timeout", str(RUN_LIMIT)], RUN_LIMIT + 60,
        stall_limit=STALL_LIMIT, label="firmware-raw"), kvmdm_l0_fault)
    console = r.console
    print(console[-4000:])
    print(r.stderr[-2000:], file=sys.stderr)
    # The chain, in order: the BIOS, its handover to the boot sector, GRUB's serial terminal, the kernel.
    order = ["[bios] SeaBIOS (version", "[bios] Booting from 0000:7c00", GRUB_MARKER, "Linux version",
             "GUEST-READY", "GUEST-EXIT rc=0"]
    positions = [console.find(m) for m in order]
    assert all(p >= 0 for p in positions), dict(zip(order, positions, strict=True))
    assert positions == sorted(positions), dict(zip(order, positions, strict=True))
    chk = guest.checks(console)
    assert chk.get("root_dev") == "1", chk  # the partition table GRUB booted from, as Linux reads it
    with open(image, "rb") as f:
        f.seek(PART_START_SECTOR * 512)
        first_mib = f.read(1 << 20)
    assert chk.get("root_md5") == hashlib.md5(first_mib).hexdigest(), chk  # noqa: S324
    assert chk.get("ext4_magic") == "ef53", chk  # the ext4 superblock GRUB read the kernel from
    assert int(chk.get("grub_cfg", "0")) >= 1, chk  # grub.cfg's text, read raw from the partition
    assert r.rc == 0, r.stderr[-2000:]  # ACPI S5 power-off
