"""The QEMU-TCG Linux harness works: Linux's virtio-blk driver moves data to and from a host image, both through
QEMU's own virtio-blk device and through a vhost-user-blk backend (qemu-storage-daemon) over a memfd-backed RAM.

These are the baselines later interop tests build on (they swap qemu-storage-daemon for our backends).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import LinuxGuestFactory
from tests.interop.linux_harness import (
    VHOST_USER_MEMORY,
    LinuxTcgTimeoutError,
    guest_exit_rc,
    guest_ready,
    run_linux_tcg,
)

pytestmark = pytest.mark.qemu

BLOCK = 4096
PATTERN = b"".join(b"kvmdm%03d" % i for i in range(512))  # 4 KiB, position-dependent: catches offset errors
# The same bytes, produced by busybox sh inside the guest.
MAKE_PATTERN = "i=0; while [ $i -lt 512 ]; do printf 'kvmdm%03d' $i; i=$((i+1)); done > /tmp/pat\n"


def test_guest_writes_pattern_through_qemu_virtio_blk_and_host_reads_it(linux_guest: LinuxGuestFactory,
                                                                        tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(16 * BLOCK))
    script = MAKE_PATTERN + "dd if=/tmp/pat of=/dev/vda bs=4096 seek=3 count=1 conv=fsync\n"
    vmlinuz, initrd = linux_guest(script)
    status, console = run_linux_tcg(vmlinuz, initrd, timeout=60,
                                    extra_args=["-drive", f"file={disk},format=raw,if=virtio"])
    assert status == 0, console
    ready = guest_ready(console)
    assert ready is not None and ready[0] == ["vda"], console
    assert guest_exit_rc(console) == 0, console
    data = disk.read_bytes()
    assert data[3 * BLOCK : 4 * BLOCK] == PATTERN
    assert data[: 3 * BLOCK] == bytes(3 * BLOCK) and data[4 * BLOCK :] == bytes(12 * BLOCK)


def test_failing_guest_script_is_reported_in_guest_exit(linux_guest: LinuxGuestFactory) -> None:
    vmlinuz, initrd = linux_guest("echo script-ran; exit 7\n")
    status, console = run_linux_tcg(vmlinuz, initrd, timeout=60)
    assert "script-ran" in console
    assert guest_ready(console) == ([], ["lo"]), console
    assert guest_exit_rc(console) == 7, console


def test_guest_that_never_powers_off_raises_timeout_with_console(linux_guest: LinuxGuestFactory) -> None:
    vmlinuz, initrd = linux_guest("echo about-to-hang; sleep 1000\n")
    t0 = time.monotonic()
    with pytest.raises(LinuxTcgTimeoutError) as ei:
        run_linux_tcg(vmlinuz, initrd, timeout=8)
    assert time.monotonic() - t0 < 20  # QEMU was killed, not waited for
    assert "about-to-hang" in ei.value.console


def test_guest_ready_and_exit_parsers_reject_missing_lines() -> None:
    assert guest_ready("booting...\n") is None
    assert guest_exit_rc("GUEST-READY disks=[vda ] nets=[lo ]\n") is None
    assert guest_ready("GUEST-READY disks=[vda vdb ] nets=[eth0 lo ]\n") == (["vda", "vdb"], ["eth0", "lo"])


@pytest.fixture
def vhost_user_blk_export(qemu_storage_daemon: str, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """qemu-storage-daemon serving tmp_path/disk.raw as vhost-user-blk on a unix socket: (image, socket)."""
    disk, sock = tmp_path / "disk.raw", tmp_path / "vub.sock"
    disk.write_bytes(bytes(512 * BLOCK))
    proc = subprocess.Popen(
        [qemu_storage_daemon, "--blockdev", f"driver=file,node-name=f0,filename={disk}",
         "--export", f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},writable=on"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read() if proc.poll() is not None and proc.stdout else b""
                pytest.fail(f"qemu-storage-daemon did not create {sock}: {out!r}")
            time.sleep(0.02)
        yield disk, sock
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_guest_reads_host_pattern_through_qemu_storage_daemon_vhost_user_blk(
        linux_guest: LinuxGuestFactory, vhost_user_blk_export: tuple[Path, Path]) -> None:
    disk, sock = vhost_user_blk_export
    with open(disk, "r+b") as f:  # the backend opened the file already: it must read what is there now
        f.seek(256 * BLOCK)
        f.write(PATTERN)
    script = "dd if=/dev/vda bs=4096 skip=256 count=1 2>/dev/null | md5sum | sed 's/^/READ-MD5 /'\n"
    vmlinuz, initrd = linux_guest(script)
    status, console = run_linux_tcg(
        vmlinuz, initrd, timeout=60,
        extra_args=[*VHOST_USER_MEMORY, "-chardev", f"socket,id=c0,path={sock}",
                    "-device", "vhost-user-blk-pci,chardev=c0"])
    assert status == 0, console
    ready = guest_ready(console)
    assert ready is not None and ready[0] == ["vda"], console
    assert f"READ-MD5 {hashlib.md5(PATTERN).hexdigest()}" in console, console
    assert guest_exit_rc(console) == 0, console
