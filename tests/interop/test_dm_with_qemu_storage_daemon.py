"""Our DM with someone else's vhost-user back-end: qemu-storage-daemon serves an image (raw, and qcow2 — which
kvmdm cannot read itself: the format comes for free through the back-end) to a kvmdm guest that verifies it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guests.build import build_guest
from guests.kvmdm import run_kvmdm
from pv.device import VIRTIO_ID_BLOCK
from pv.vhost_user.frontend import VhostUserDevice

pytestmark = [pytest.mark.kvm, pytest.mark.qemu]

GUEST = Path(__file__).resolve().parents[1] / "guests" / "virtio_blk.S"
HOST_SECTORS = range(64, 72)
SECTOR = 512


def _raw_image(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(16 << 20)
        for s in HOST_SECTORS:
            f.seek(s * SECTOR)
            f.write(b"KVMDM-HOST-DATA %d" % s)


def _export(image: Path, fmt: str, sock: Path) -> subprocess.Popen[bytes]:
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        pytest.fail("qemu-storage-daemon is missing (package qemu-system-common)")
    node = f"driver=file,node-name=f0,filename={image}"
    args = [qsd, "--blockdev", node]
    top = "f0"
    if fmt == "qcow2":
        args += ["--blockdev", "driver=qcow2,node-name=q0,file=f0"]
        top = "q0"
    args += ["--export", f"type=vhost-user-blk,id=e0,node-name={top},addr.type=unix,addr.path={sock},writable=on"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE)
    for _ in range(100):
        if sock.exists():
            return proc
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"qemu-storage-daemon did not create {sock}: {proc.communicate()[1].decode()}")


@pytest.fixture(params=["raw", "qcow2"])
def exported(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    raw = tmp_path / "disk.raw"
    _raw_image(raw)
    image = raw
    if request.param == "qcow2":
        image = tmp_path / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True)
    sock = tmp_path / "vub.sock"
    proc = _export(image, request.param, sock)
    try:
        yield sock, request.param
    finally:
        proc.terminate()
        proc.wait(10)


def _device(sock: Path) -> VhostUserDevice:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock))
    return VhostUserDevice(s, VIRTIO_ID_BLOCK, num_queues=1, config_size=60)


def test_kvmdm_guest_reads_and_writes_an_image_served_by_qemu_storage_daemon(exported: tuple[Path, str]) -> None:
    sock, _fmt = exported
    dev = _device(sock)
    try:
        run = run_kvmdm(build_guest(GUEST), "", virtio=[dev], timeout=120)
    finally:
        dev.close()
    assert run.reason.kind == "poweroff" and run.status == 1, run.output
    for s in HOST_SECTORS:
        assert f"sector {s}: KVMDM-HOST-DATA {s}\n" in run.output
    assert "PASS pattern read back" in run.output
    assert run.output.endswith("virtio_blk: 0 failed\n")


def test_vhost_user_requests_cost_the_dm_no_exits(tmp_path: Path) -> None:
    """The data path bypasses the DM: more requests, same number of MMIO exits (setup and teardown only)."""
    counts = []
    for sectors in (8, 256):
        raw = tmp_path / f"d{sectors}.raw"
        _raw_image(raw)
        sock = tmp_path / f"s{sectors}.sock"
        proc = _export(raw, "raw", sock)
        dev = _device(sock)
        try:
            run = run_kvmdm(build_guest(GUEST), f"sectors={sectors}", virtio=[dev], timeout=120)
        finally:
            dev.close()
            proc.terminate()
            proc.wait(10)
        assert run.status == 1, run.output
        counts.append(run.exits["MmioWrite"] + run.exits["MmioRead"])
    assert counts[0] == counts[1]


def test_backend_that_dies_before_the_guest_starts_is_reported_not_raised(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    _raw_image(raw)
    sock = tmp_path / "vub.sock"
    proc = _export(raw, "raw", sock)
    dev = _device(sock)
    proc.kill()
    proc.wait(10)
    try:
        run = run_kvmdm(build_guest(GUEST), "", virtio=[dev], timeout=120)
    finally:
        dev.close()
    # The device went to NEEDS_RESET at DRIVER_OK; the guest notices and fails its checks, the VMM lives on.
    assert run.reason.kind == "poweroff"
    assert "virtio_blk: 0 failed" not in run.output
    assert os.path.exists(raw)
