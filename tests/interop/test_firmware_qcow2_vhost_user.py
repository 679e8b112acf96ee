"""A qcow2 image served by qemu-storage-daemon over vhost-user boots a firmware guest (issue 10): SeaBIOS finds the
vhost-user virtio-blk disk (its own driver, 16-bit, on kvmdm's virtio-pci transport, the rings run by
qemu-storage-daemon in the guest's shared memfd RAM), boots its boot sector, and the boot sector's INT 13h
writes land in the qcow2 through qemu-storage-daemon's qcow2 driver.

The disk is tests.fixtures.reboot_disk's boot-counter sector converted with ``qemu-img convert -O qcow2``; its
reboot makes the second boot reconnect to the same qemu-storage-daemon (a new DM under kvmdmd, a rebuilt VM under
``kvmdm run``): boot 1 then boot 2 from the same export, then power-off. Afterwards the qcow2 is consistent
(``qemu-img check``) and, converted back to raw, differs from the original in sector 1 only.

The GRUB image of tests/fixtures/grub_disk.py as a qcow2 reaches GRUB's menu the same way.

Measured on the project machine (kvm_pvm, 64 MiB): ``kvmdm run`` two boots to power-off ~3.2 s, kvmdmd ~3.5 s
(~5.8 s each while another lane ran); the GRUB qcow2: boot sector at ~4 s, GRUB's menu at ~39 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmcore.firmware import SEABIOS_PATH
from tests.fixtures import grub_disk
from tests.fixtures.reboot_disk import DiskUnavailable, boot_count, build_reboot_disk
from tests.integration.test_firmware_disk import _run_until
from tests.integration.test_firmware_reboot import (
    RealDaemon,
    assert_only_the_counter_changed,
    assert_two_boots,
    kvmdm_run,
    wait_until,
)

pytestmark = [pytest.mark.kvm, pytest.mark.qemu, pytest.mark.timeout(180),
              pytest.mark.skipif(not os.path.exists(SEABIOS_PATH), reason="Debian's seabios is not installed")]


class Export:
    """qemu-storage-daemon exporting a qcow2 (file -> qcow2 node) as vhost-user-blk on a unix socket; the qcow2 is
    converted from the raw image ``build`` writes (tests.fixtures.reboot_disk's by default)."""

    def __init__(self, qsd: str, tmp_path: Path, build: Callable[[Path], object] | None = None) -> None:
        self.raw = tmp_path / "disk.raw"
        try:
            if build is None:
                build_reboot_disk(self.raw)
            else:
                build(self.raw)
        except (DiskUnavailable, grub_disk.DiskUnavailable) as e:
            pytest.skip(str(e))
        self.before = self.raw.read_bytes()
        self.qcow2 = tmp_path / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(self.raw), str(self.qcow2)],
                       check=True)
        self.sock = tmp_path / "vub.sock"
        self.log = tmp_path / "qsd.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [qsd, "--blockdev", f"driver=file,node-name=file0,filename={self.qcow2}",
                 "--blockdev", "driver=qcow2,node-name=disk0,file=file0",
                 "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                 f"addr.path={self.sock},writable=on"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"qemu-storage-daemon did not listen on {self.sock}: {self.log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # QSD flushes the qcow2 metadata and exits on SIGTERM
            self.proc.wait(10)

    def as_raw(self) -> bytes:
        """Stop the back-end, check the qcow2, and give its guest-visible contents."""
        self.stop()
        check = subprocess.run(["qemu-img", "check", str(self.qcow2)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        out = self.qcow2.with_suffix(".after.raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(self.qcow2), str(out)], check=True)
        return out.read_bytes()

    def definition(self, name: str) -> dict[str, object]:
        return {"name": name, "memory_mib": 64, "firmware": "seabios", "boot_order": ["disk0"],
                "disks": [{"path": str(self.sock), "backend": "vhost-user"}]}


@pytest.fixture
def export(qemu_storage_daemon: str, tmp_path: Path) -> Iterator[Export]:
    e = Export(qemu_storage_daemon, tmp_path)
    try:
        yield e
    finally:
        e.stop()


def assert_bios_booted_the_vhost_user_disk(console: bytes) -> None:
    assert console.count(b"[bios] found virtio-blk at 00:01.0") == 2, console[-3000:]  # SeaBIOS's driver, each boot
    assert console.count(b"[bios] Booting from 0000:7c00") == 2


def test_kvmdm_run_boots_a_qcow2_from_qemu_storage_daemon_and_reboots_on_the_same_export(export: Export,
                                                                                             tmp_path: Path) -> None:
    p, elapsed = kvmdm_run(tmp_path, export.definition("qcowrun"))
    print(f"kvmdm run, qcow2 over vhost-user, two boots: {elapsed:.2f} s")
    assert p.returncode == 0, p.stderr[-2000:]
    assert_bios_booted_the_vhost_user_disk(p.stdout)
    assert_two_boots(p.stdout)
    assert export.proc.poll() is None, export.log.read_text()  # the external back-end served both connections
    after = export.as_raw()
    assert_only_the_counter_changed(export.before, after, 2)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[RealDaemon]:
    d = RealDaemon(tmp_path).start()
    yield d
    d.cleanup()


@pytest.mark.root
def test_kvmdmd_boots_a_qcow2_from_qemu_storage_daemon_in_the_jailed_dm_and_reboots(export: Export,
                                                                                      daemon: RealDaemon) -> None:
    daemon.json("POST", "/v1/guests", export.definition("qcowd"), expect=201)
    t0 = time.monotonic()
    daemon.json("POST", "/v1/guests/qcowd/start")
    g = wait_until(lambda: (x := daemon.guest("qcowd"))["state"] in ("stopped", "crashed", "failed")
                   and x["restarts"] >= 1 and x, 120, 0.2)
    print(f"kvmdmd, qcow2 over vhost-user, start -> stopped after two boots: {time.monotonic() - t0:.2f} s")
    assert g["state"] == "stopped" and g["last_exit_code"] == 0 and g["restarts"] == 1, g
    assert g["backends"] == [], g  # an external back-end: the daemon starts and supervises nothing for it
    console = daemon.console("qcowd")
    assert_bios_booted_the_vhost_user_disk(console)
    assert_two_boots(console)
    assert export.proc.poll() is None, export.log.read_text()
    after = export.as_raw()
    assert_only_the_counter_changed(export.before, after, 2)
    assert boot_count(export.qcow2.with_suffix(".after.raw")) == 2


def test_the_grub_disk_as_a_qcow2_over_vhost_user_reaches_grubs_menu(qemu_storage_daemon: str,
                                                                    tmp_path: Path) -> None:
    # GRUB's boot.img and core.img read through SeaBIOS's INT 13h on the vhost-user disk, then GRUB's own biosdisk
    # reads its modules and grub.cfg from the ext4 partition the same way: ~35 s here, mostly GRUB's emulated
    # protected-mode start-up (tests/integration/test_firmware_disk.py, raw and inline, takes as long).
    e = Export(qemu_storage_daemon, tmp_path, build=grub_disk.build_grub_disk)
    try:
        definition = tmp_path / "grubq.json"
        definition.write_text(json.dumps(e.definition("grubq")))
        markers = [b"[bios] found virtio-blk at 00:01.0", b"[bios] Booting from 0000:7c00",
                   grub_disk.GRUB_MARKER.encode(), b"GNU GRUB"]
        out, seen = _run_until(definition, markers, 300)
        print({m.decode(): round(t, 2) for m, t in seen.items()})
        for m in markers:
            assert m in seen, (m, out[-3000:])
        assert e.proc.poll() is None, e.log.read_text()
    finally:
        e.stop()
