"""The virtio guests under kvmdm (KVM, our virtio-pci transport and pv backends) against QEMU (TCG, its own
virtio-pci and SeaBIOS-assigned BARs), each on its own copy of the same disk image or on its own tap: same serial
output, same status, same bytes left in the image. Also counts the userspace exits a blk request costs under
kvmdm: with the notify address behind an ioeventfd and completions polled from the used ring, none.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from guests.kvmdm import KvmdmRun, run_kvmdm
from tests.unit.guests.test_guests_virtio_qemu import (
    EXIT_FAIL,
    EXIT_OK,
    GUEST_MAC,
    SERIAL,
    bad_pattern_sectors,
    blk_elf,
    configure_peer,
    digest,
    expected_blk_output,
    expected_net_output,
    in_namespace,
    make_image,
    net_elf,
    net_namespace,
    qemu_tap,
    run_qemu_blk,
    run_qemu_net,
)

pytestmark = [pytest.mark.kvm, pytest.mark.qemu]


def _pair(tmp_path: Path, sectors: int = 64) -> tuple[Path, Path]:
    """Two identical images, both named like the serial (kvmdm takes the serial from the file name)."""
    (tmp_path / "k").mkdir()
    (tmp_path / "q").mkdir()
    return make_image(tmp_path / "k", sectors), make_image(tmp_path / "q", sectors)


def _kvmdm_blk(image: Path, append: str, *, read_only: bool = False) -> KvmdmRun:
    return run_kvmdm(blk_elf(), append, timeout=120, disks=[(image, read_only)])


def test_blk_guest_output_status_and_image_match_qemu(tmp_path: Path) -> None:
    ours_img, theirs_img = _pair(tmp_path)
    ours = _kvmdm_blk(ours_img, "sectors=64 seed=42")
    theirs = run_qemu_blk(theirs_img, "sectors=64 seed=42")
    assert ours.output == theirs.output == expected_blk_output(64)
    assert ours.status == theirs.status == EXIT_OK
    assert ours.reason.kind == "poweroff"
    assert bad_pattern_sectors(ours_img, 42, 64) == []
    assert ours_img.read_bytes() == theirs_img.read_bytes()


def test_blk_guest_large_transfer_matches_qemu(tmp_path: Path) -> None:
    ours_img, theirs_img = _pair(tmp_path, sectors=2048)  # one 1 MiB request each way
    ours = _kvmdm_blk(ours_img, "sectors=2048 seed=5")
    theirs = run_qemu_blk(theirs_img, "sectors=2048 seed=5")
    assert ours.output == theirs.output == expected_blk_output(2048)
    assert bad_pattern_sectors(ours_img, 5, 2048) == []
    assert ours_img.read_bytes() == theirs_img.read_bytes()


def test_blk_guest_read_only_disk_matches_qemu_and_stays_unchanged(tmp_path: Path) -> None:
    ours_img, theirs_img = _pair(tmp_path)
    before = digest(ours_img)
    ours = _kvmdm_blk(ours_img, "sectors=64 ro=1", read_only=True)
    theirs = run_qemu_blk(theirs_img, "sectors=64 ro=1", read_only=True)
    assert ours.output == theirs.output == expected_blk_output(64, ro=True)
    assert ours.status == theirs.status == EXIT_OK
    assert digest(ours_img) == digest(theirs_img) == before


def test_blk_guest_expecting_a_write_fails_on_a_read_only_kvmdm_disk(tmp_path: Path) -> None:
    ours_img, theirs_img = _pair(tmp_path)
    before = digest(ours_img)
    ours = _kvmdm_blk(ours_img, "sectors=64", read_only=True)
    theirs = run_qemu_blk(theirs_img, "sectors=64", read_only=True)
    assert "FAIL write status got=0x1 want=0x0\n" in ours.output
    assert ours.output == theirs.output
    assert ours.status == theirs.status == EXIT_FAIL
    assert digest(ours_img) == before


def test_blk_guest_serial_is_the_image_name(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    renamed = image.with_name("disk-b")
    image.rename(renamed)
    run = _kvmdm_blk(renamed, "sectors=64")
    assert run.output == expected_blk_output(64, serial="disk-b")
    assert SERIAL not in run.output


def test_blk_guest_reports_a_missing_device_like_qemu() -> None:
    ours = run_kvmdm(blk_elf(), "", timeout=60)
    assert ours.output == "virtio_blk: no virtio-blk device\n"
    assert ours.status == EXIT_FAIL


def _bench_exits(image: Path, rand: int) -> tuple[KvmdmRun, Counter[str]]:
    # kickall=1: the guest notifies for every request even while the device sets VIRTQ_USED_F_NO_NOTIFY, so each
    # of the 1024 extra requests really writes the notify register and the ioeventfd has something to absorb.
    run = _kvmdm_blk(image, f"bench=1 mb=2 rand={rand} kickall=1")
    assert run.output.endswith("<><><>\nvirtio_blk: bench done\nvirtio_blk: 0 failed\n"), run.output
    return run, run.exits


def test_blk_requests_cost_no_userspace_exits_in_steady_state(tmp_path: Path) -> None:
    # Two runs that differ only in the number of 4 KiB random reads; the setup's MMIO exits (status, features,
    # queue registers, config reads) are the same, and the notify writes must be absorbed by the ioeventfd.
    image = make_image(tmp_path)
    _, few = _bench_exits(image, 8)
    _, many = _bench_exits(image, 1032)
    for kind in ("MmioWrite", "MmioRead"):
        assert many[kind] == few[kind], (kind, few, many)
    extra = sum(many.values()) - sum(few.values())
    assert extra <= 12, (few, many)  # only the longer "rand=1032" in the banner: 2 chars x (LSR read + THR write)
    assert extra / 1024 < 0.05


def test_exit_counter_sees_per_request_mmio_without_ioeventfd(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Negative control for the test above: when KVM refuses the ioeventfd, the transport falls back to handling
    # the notify write in userspace, and the same difference shows up as one MMIO write exit per request.
    from daemon import vmm

    def refuse(self: object, *args: object) -> None:
        raise OSError(95, "ioeventfd refused by the test")

    monkeypatch.setattr(vmm._PciPlatformAdapter, "register_ioeventfd", refuse)
    image = make_image(tmp_path)
    _, few = _bench_exits(image, 8)
    _, many = _bench_exits(image, 1032)
    assert many["MmioWrite"] - few["MmioWrite"] == 1024


# ---------------------------------------------------------------------------------------------- virtio-net
@pytest.mark.root
def test_net_guest_arp_exchange_matches_qemu() -> None:
    pytest.importorskip("pv.net")
    from pv import tap
    from pv.net import Net

    with net_namespace() as ns:
        with in_namespace(ns):
            ifname, fd = tap.open_tap("vtapk0")
        try:
            configure_peer(ns, ifname, "10.0.2.2/24")
            ours = run_kvmdm(net_elf(), "", timeout=120, virtio=[Net(fd, bytes.fromhex(GUEST_MAC.replace(":", "")))])
        finally:
            os.close(fd)
    with qemu_tap() as (ns, qifname):
        theirs = run_qemu_net(ns, qifname)
    assert ours.output == theirs.output == expected_net_output()
    assert ours.status == theirs.status == EXIT_OK


@pytest.mark.root
def test_net_guest_times_out_under_kvmdm_when_nobody_answers() -> None:
    pytest.importorskip("pv.net")
    from pv import tap
    from pv.net import Net

    with net_namespace() as ns:
        with in_namespace(ns):
            ifname, fd = tap.open_tap("vtapk0")
        try:
            configure_peer(ns, ifname, None)
            run = run_kvmdm(net_elf(), "", timeout=120, virtio=[Net(fd, bytes.fromhex(GUEST_MAC.replace(":", "")))])
        finally:
            os.close(fd)
    assert run.output == f"virtio_net: mac={GUEST_MAC} tx ok rx timeout\n"
    assert run.status == EXIT_FAIL
