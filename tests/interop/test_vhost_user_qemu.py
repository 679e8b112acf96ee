"""Our vhost-user back-end (``kvmdm-backend blk``, jailed) with QEMU 7.2 as the front-end and Linux's
virtio_blk driver as the client: the guest writes a pattern with dd, syncs, reads it back; the host checks the
image. Guest RAM is a shared memfd (``VHOST_USER_MEMORY``) so the back-end can map it.
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import LinuxGuestFactory
from tests.interop.linux_harness import VHOST_USER_MEMORY, guest_exit_rc, guest_ready, run_linux_tcg

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
BLOCK = 4096
PATTERN = b"".join(b"vhostu%03d" % i for i in range(460))[:BLOCK]  # position-dependent 4 KiB
MAKE_PATTERN = ("i=0; while [ $i -lt 460 ]; do printf 'vhostu%03d' $i; i=$((i+1)); done | head -c 4096 "
                "> /tmp/pat\n")
WRITE_SYNC_READBACK = (
    MAKE_PATTERN
    + "dd if=/tmp/pat of=/dev/vda bs=4096 seek=5 count=1 conv=fsync 2>/dev/null || exit 3\n"
    + "sync\n"
    + "echo 3 > /proc/sys/vm/drop_caches\n"
    + "dd if=/dev/vda bs=4096 skip=5 count=1 iflag=direct 2>/dev/null | md5sum | sed 's/^/READBACK-MD5 /'\n"
    + "dd if=/dev/vda bs=4096 skip=7 count=1 iflag=direct 2>/dev/null | md5sum | sed 's/^/HOST-MD5 /'\n"
)


class Backend:
    def __init__(self, proc: subprocess.Popen[bytes], sock: Path, image: Path) -> None:
        self.proc = proc
        self.sock = sock
        self.image = image
        self.log = b""

    def stop(self) -> bytes:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.log += self.proc.stderr.read()
            self.proc.stderr.close()
        return self.log


def _start_backend(tmp_path: Path, *extra: str, jail: bool = True) -> Backend:
    image, sock = tmp_path / "disk.raw", tmp_path / "blk.sock"
    if not image.exists():
        image.write_bytes(bytes(64 * BLOCK))
    argv = [sys.executable, "-m", "daemon.backend_main", "blk", "--socket", str(sock), "--image", str(image), *extra]
    if jail:
        root = tmp_path / f"jail-{len(list(tmp_path.glob('jail-*')))}"
        root.mkdir(mode=0o700)  # empty, root-owned, not group/world-writable (JailConfig.validate_host)
        argv += ["--jail-root", str(root)]
    else:
        argv.append("--no-jail")
    proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    be = Backend(proc, sock, image)
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    fd = proc.stderr.fileno()  # raw reads: a buffered readline could swallow READY into its buffer
    while b"READY" not in be.log:
        if time.monotonic() > deadline or proc.poll() is not None:
            pytest.fail(f"kvmdm-backend did not become ready: {be.stop()!r}")
        if select.select([fd], [], [], 0.1)[0]:
            be.log += os.read(fd, 4096)
    return be


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Backend]:
    if os.geteuid() != 0:
        pytest.skip("the jailed back-end needs root (namespaces, uid drop)")
    be = _start_backend(tmp_path)
    yield be
    be.stop()


def _qemu_args(sock: Path) -> list[str]:
    return [*VHOST_USER_MEMORY, "-chardev", f"socket,id=c0,path={sock}", "-device", "vhost-user-blk-pci,chardev=c0"]


def test_qemu_guest_writes_syncs_and_reads_back_through_jailed_kvmdm_backend_blk(
        linux_guest: LinuxGuestFactory, backend: Backend) -> None:
    host_block = bytes(range(256)) * 16
    with open(backend.image, "r+b") as f:  # written after the back-end opened the image: must be seen
        f.seek(7 * BLOCK)
        f.write(host_block)
    vmlinuz, initrd = linux_guest(WRITE_SYNC_READBACK)
    status, console = run_linux_tcg(vmlinuz, initrd, timeout=90, extra_args=_qemu_args(backend.sock))
    log = backend.log
    assert status == 0, (console, log)
    ready = guest_ready(console)
    assert ready is not None and ready[0] == ["vda"], console
    assert guest_exit_rc(console) == 0, console
    assert f"READBACK-MD5 {hashlib.md5(PATTERN).hexdigest()}" in console, console
    assert f"HOST-MD5 {hashlib.md5(host_block).hexdigest()}" in console, console
    data = backend.image.read_bytes()
    assert data[5 * BLOCK : 6 * BLOCK] == PATTERN
    assert data[: 5 * BLOCK] == bytes(5 * BLOCK)  # nothing written anywhere else
    assert backend.proc.poll() is None, "the back-end must survive the front-end going away"


def test_backend_serves_a_second_qemu_after_the_first_one_exits(linux_guest: LinuxGuestFactory,
                                                                backend: Backend) -> None:
    vmlinuz, initrd = linux_guest(WRITE_SYNC_READBACK)
    for _ in range(2):
        status, console = run_linux_tcg(vmlinuz, initrd, timeout=90, extra_args=_qemu_args(backend.sock))
        assert status == 0 and guest_exit_rc(console) == 0, console
        assert f"READBACK-MD5 {hashlib.md5(PATTERN).hexdigest()}" in console, console


def test_readonly_backend_refuses_guest_writes(linux_guest: LinuxGuestFactory, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the jailed back-end needs root")
    be = _start_backend(tmp_path, "--readonly")
    try:
        script = MAKE_PATTERN + ("dd if=/tmp/pat of=/dev/vda bs=4096 seek=5 count=1 conv=fsync 2>/dev/null "
                                 "&& echo WRITE-OK || echo WRITE-FAILED\n")
        vmlinuz, initrd = linux_guest(script)
        status, console = run_linux_tcg(vmlinuz, initrd, timeout=90, extra_args=_qemu_args(be.sock))
        assert status == 0, console
        assert "WRITE-FAILED" in console, console
        assert be.image.read_bytes() == bytes(64 * BLOCK)
    finally:
        be.stop()
