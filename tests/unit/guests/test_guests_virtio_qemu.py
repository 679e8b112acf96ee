"""The virtio test guests (tests/guests/virtio_blk.S, virtio_net.S) under QEMU TCG: exact output, exit status,
and what the guest left in the disk image, checked on the host.

QEMU's virtio-pci devices (SeaBIOS assigns the BARs) are the reference the kvmdm transport is compared against in
tests/integration/test_virtio_guests_kvmdm.py; the helpers here (image layout, pattern, expected text) are shared
with it. Net tests need root for a tap in a private network namespace, where the namespace's kernel is the peer
that answers the guest's ARP request.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from guests.build import build_guest
from guests.qemu import QemuRun, debug_exit_status, run_qemu

pytestmark = pytest.mark.qemu

TESTS_GUESTS = Path(__file__).resolve().parents[2] / "guests"
EXIT_OK = debug_exit_status(0)
EXIT_FAIL = debug_exit_status(1)
EXIT_BAD_OPTION = debug_exit_status(2)

SERIAL = "kvmdm0"  # kvmdm's run_kvmdm uses the image file name as the serial: name the image like this
IMAGE_SECTORS = 8192  # 4 MiB
HOST_SECTORS = 8
SECTOR = 512
GUEST_MAC = "52:54:00:12:34:56"
PEER_MAC = "02:00:0a:00:02:02"
PEER_IP = "10.0.2.2/24"

_M64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------- shared helpers
def pattern_sector(seed: int, sector: int) -> bytes:
    """The 512 bytes virtio_blk.S writes to `sector` (formula in the guest's header comment)."""
    words = []
    for i in range(64):
        x = (seed ^ (sector * 0x9E3779B97F4A7C15) ^ (i * 0xD1B54A32D192ED03)) & _M64
        x ^= x >> 31
        x = (x * 0xBF58476D1CE4E5B9) & _M64
        x ^= x >> 29
        words.append(x)
    return struct.pack("<64Q", *words)


def host_text(sector: int) -> bytes:
    return b"KVMDM-HOST-DATA %d" % sector


def make_image(directory: Path, sectors: int = 64, total: int = IMAGE_SECTORS) -> Path:
    """A zeroed raw image named like the serial, with host text at the start of sectors [sectors, sectors+8)."""
    path = directory / SERIAL
    with open(path, "wb") as f:
        f.truncate(total * SECTOR)
        for s in range(sectors, sectors + HOST_SECTORS):
            f.seek(s * SECTOR)
            f.write(host_text(s) + b"\0")
    return path


def bad_pattern_sectors(image: Path, seed: int, sectors: int) -> list[int]:
    """Sectors in [0, sectors) of `image` that do not hold the guest's pattern for `seed`."""
    data = image.read_bytes()
    return [s for s in range(sectors) if data[s * SECTOR : (s + 1) * SECTOR] != pattern_sector(seed, s)]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_blk_output(sectors: int = 64, *, ro: bool = False, capacity: int = IMAGE_SECTORS,
                        serial: str = SERIAL) -> str:
    lines = [f"virtio_blk: capacity {capacity} sectors, {'read-only' if ro else 'read-write'}",
             "PASS flush negotiated"]
    if ro:
        lines += ["PASS write refused with IOERR", "PASS read status", "PASS sectors without the pattern",
                  f"virtio_blk: refused writes kept {sectors} sectors"]
    else:
        lines += ["PASS write status", "PASS flush status", "PASS read status", "PASS pattern read back",
                  f"virtio_blk: wrote, flushed and verified {sectors} sectors"]
    lines.append("PASS host sectors read status")
    lines += [f"virtio_blk: sector {s}: {host_text(s).decode()}" for s in range(sectors, sectors + HOST_SECTORS)]
    lines += ["PASS read past the end IOERR", "PASS get_id status", f"virtio_blk: serial {serial}",
              "virtio_blk: 0 failed"]
    return "\n".join(lines) + "\n"


def blk_elf() -> Path:
    return build_guest(TESTS_GUESTS / "virtio_blk.S")


def net_elf() -> Path:
    return build_guest(TESTS_GUESTS / "virtio_net.S")


def qemu_blk_args(image: Path, *, read_only: bool = False, serial: str = SERIAL,
                  device_opts: str = "disable-legacy=on") -> list[str]:
    drive = f"if=none,id=d0,file={image},format=raw" + (",readonly=on" if read_only else "")
    return ["-drive", drive, "-device", f"virtio-blk-pci,drive=d0,{device_opts},serial={serial}"]


def run_qemu_blk(image: Path | None, append: str, **kw: object) -> QemuRun:
    args = qemu_blk_args(image, **kw) if image is not None else []  # type: ignore[arg-type]
    return run_qemu(blk_elf(), append, "tcg", timeout=120, extra_args=args)


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


@contextmanager
def net_namespace() -> Iterator[str]:
    """A fresh network namespace, deleted afterwards whatever happens."""
    ns = f"kvmdm-vn-{uuid.uuid4().hex[:8]}"
    _ip("netns", "add", ns)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def configure_peer(ns: str, ifname: str, peer_ip: str | None) -> None:
    """The namespace's side of the tap: a fixed MAC, optionally 10.0.2.2/24 (the kernel then answers ARP)."""
    _ip("-n", ns, "link", "set", ifname, "address", PEER_MAC)
    if peer_ip is not None:
        _ip("-n", ns, "addr", "add", peer_ip, "dev", ifname)
    _ip("-n", ns, "link", "set", ifname, "up")


@contextmanager
def in_namespace(ns: str) -> Iterator[None]:
    """Run this thread in `ns` (processes it spawns and fds it opens belong there), then come back."""
    from pyroute2.netns import popns, pushns

    pushns(ns)
    try:
        yield
    finally:
        popns()


def run_qemu_net(ns: str, ifname: str, *, device: bool = True) -> QemuRun:
    args = ["-netdev", f"tap,id=n0,ifname={ifname},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,disable-legacy=on,mac={GUEST_MAC},romfile="] if device else []
    with in_namespace(ns):
        return run_qemu(net_elf(), "", "tcg", timeout=120, extra_args=args)


def expected_net_output() -> str:
    return f"virtio_net: mac={GUEST_MAC} tx ok rx ok\nvirtio_net: 10.0.2.2 is at {PEER_MAC}\n"


# ---------------------------------------------------------------------------------------------- virtio-blk
def test_blk_guest_writes_flushes_verifies_and_reads_host_data(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    run = run_qemu_blk(image, "sectors=64 seed=7")
    assert run.output == expected_blk_output(64)
    assert run.status == EXIT_OK
    assert bad_pattern_sectors(image, 7, 64) == []
    data = image.read_bytes()
    for s in range(64, 64 + HOST_SECTORS):  # the guest only read these
        assert data[s * SECTOR : s * SECTOR + 20].rstrip(b"\0") == host_text(s)
    assert data[72 * SECTOR :] == bytes(len(data) - 72 * SECTOR)  # nothing written past the range


def test_blk_guest_pattern_depends_on_seed_and_host_check_notices(tmp_path: Path) -> None:
    image = make_image(tmp_path, sectors=16)
    run = run_qemu_blk(image, "sectors=16 seed=0x1234")
    assert run.status == EXIT_OK, run.output
    assert bad_pattern_sectors(image, 0x1234, 16) == []
    assert bad_pattern_sectors(image, 0x1235, 16) == list(range(16))  # the host check can fail


def test_blk_guest_default_is_64_sectors(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    run = run_qemu_blk(image, "")
    assert run.output == expected_blk_output(64)
    assert bad_pattern_sectors(image, 0, 64) == []


def test_blk_guest_reports_the_device_serial(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    run = run_qemu_blk(image, "sectors=64", serial="other-serial")
    assert run.output == expected_blk_output(64, serial="other-serial")


def test_blk_guest_read_only_disk_refuses_the_write_and_image_is_unchanged(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    before = digest(image)
    run = run_qemu_blk(image, "sectors=64 ro=1", read_only=True)
    assert run.output == expected_blk_output(64, ro=True)
    assert run.status == EXIT_OK
    assert digest(image) == before


def test_blk_guest_fails_when_a_read_only_disk_refuses_an_expected_write(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    run = run_qemu_blk(image, "sectors=64", read_only=True)
    assert "FAIL write status got=0x1 want=0x0\n" in run.output
    assert "FAIL pattern read back got=0x40 want=0x0\n" in run.output
    assert run.output.endswith("virtio_blk: 2 failed\n")
    assert run.status == EXIT_FAIL


def test_blk_guest_ro_mode_fails_when_the_disk_accepts_the_write(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    run = run_qemu_blk(image, "sectors=64 ro=1")
    assert "FAIL write refused with IOERR got=0x0 want=0x1\n" in run.output
    assert "FAIL sectors without the pattern got=0x0 want=0x40\n" in run.output
    assert run.status == EXIT_FAIL
    assert bad_pattern_sectors(image, 0, 64) == []  # the write did land


def test_blk_guest_accepts_a_transitional_device_with_modern_capabilities(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    run = run_qemu_blk(image, "sectors=64", device_opts="disable-legacy=off")  # device ID 0x1001
    assert run.output == expected_blk_output(64)


def test_blk_guest_ignores_a_legacy_only_device(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    run = run_qemu_blk(image, "sectors=64", device_opts="disable-legacy=off,disable-modern=on")
    assert run.output == "virtio_blk: no virtio-blk device\n"
    assert run.status == EXIT_FAIL


def test_blk_guest_reports_a_missing_device() -> None:
    run = run_qemu_blk(None, "")
    assert run.output == "virtio_blk: no virtio-blk device\n"
    assert run.status == EXIT_FAIL


@pytest.mark.parametrize("append", ["sectors=0", "sectors=2049", "sectors=x"])
def test_blk_guest_rejects_bad_sector_counts(tmp_path: Path, append: str) -> None:
    image = make_image(tmp_path)
    before = digest(image)
    run = run_qemu_blk(image, append)
    assert run.output == "bad option: sectors\n"
    assert run.status == EXIT_BAD_OPTION
    assert digest(image) == before


def test_blk_guest_refuses_a_disk_smaller_than_its_range(tmp_path: Path) -> None:
    image = make_image(tmp_path, sectors=64)
    os.truncate(image, 71 * SECTOR)  # sectors=64 needs 64 + 8 host sectors
    run = run_qemu_blk(image, "sectors=64")
    assert run.output.startswith("virtio_blk: capacity 71 sectors, read-write\n")
    assert run.output.endswith("virtio_blk: disk too small\n")
    assert run.status == EXIT_FAIL


def test_blk_guest_bench_mode_prints_three_marked_phases(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    run = run_qemu_blk(image, "bench=1 mb=2 rand=64 seed=3")
    assert run.output == (f"virtio_blk: capacity {IMAGE_SECTORS} sectors, read-write\nPASS flush negotiated\n"
                          "virtio_blk: bench mb=2 rand=64\n<><><>\nvirtio_blk: bench done\nvirtio_blk: 0 failed\n")
    assert run.status == EXIT_OK


def test_blk_guest_bench_mode_refuses_more_than_the_disk(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    run = run_qemu_blk(image, "bench=1 mb=5")
    assert "virtio_blk: disk too small for the benchmark\n" in run.output
    assert run.output.endswith("virtio_blk: 1 failed\n")
    assert run.status == EXIT_FAIL


def test_blk_guest_bench_mode_counts_failed_requests(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    run = run_qemu_blk(image, "bench=1 mb=1 rand=4", read_only=True)  # the 1 MiB write fails
    assert run.output.endswith("<><><>\nvirtio_blk: bench done\nvirtio_blk: 1 failed\n")
    assert run.status == EXIT_FAIL


# ---------------------------------------------------------------------------------------------- virtio-net
@contextmanager
def qemu_tap(*, peer_ip: str | None = PEER_IP) -> Iterator[tuple[str, str]]:
    """(namespace, tap name): a persistent tap inside a fresh namespace, removed with it."""
    with net_namespace() as ns:
        ifname = "vtap0"
        _ip("-n", ns, "tuntap", "add", "dev", ifname, "mode", "tap", "vnet_hdr")
        try:
            configure_peer(ns, ifname, peer_ip)
            yield ns, ifname
        finally:
            subprocess.run(["ip", "-n", ns, "tuntap", "del", "dev", ifname, "mode", "tap"], capture_output=True,
                           timeout=30)


@pytest.mark.root
def test_net_guest_arp_request_is_answered_by_the_peer_over_a_tap() -> None:
    with qemu_tap() as (ns, ifname):
        run = run_qemu_net(ns, ifname)
    assert run.output == expected_net_output()
    assert run.status == EXIT_OK


@pytest.mark.root
def test_net_guest_times_out_when_nobody_answers() -> None:
    with qemu_tap(peer_ip=None) as (ns, ifname):
        run = run_qemu_net(ns, ifname)
    assert run.output == f"virtio_net: mac={GUEST_MAC} tx ok rx timeout\n"
    assert run.status == EXIT_FAIL


@pytest.mark.root
def test_net_guest_ignores_a_reply_for_another_address() -> None:
    # The peer owns 10.0.2.3, not 10.0.2.2: the kernel stays silent for 10.0.2.2 and the guest gives up.
    with qemu_tap(peer_ip="10.0.2.3/24") as (ns, ifname):
        run = run_qemu_net(ns, ifname)
    assert run.output.endswith("rx timeout\n")
    assert run.status == EXIT_FAIL


def test_net_guest_reports_a_missing_device() -> None:
    run = run_qemu(net_elf(), "", "tcg", timeout=60)
    assert run.output == "virtio_net: no virtio-net device\n"
    assert run.status == EXIT_FAIL


@pytest.mark.root
def test_namespace_helper_removes_the_namespace() -> None:
    with net_namespace() as ns:
        assert ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
