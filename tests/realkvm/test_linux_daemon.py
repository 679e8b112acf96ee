"""Debian's cloud kernel, unmodified, to userspace under the daemon's jailed DM on a hardware-style KVM, with
Linux's own drivers on every kvmdm device: virtio-blk inline and vhost-user, virtio-net inline and vhost-user
(ping and iperf3 both ways to a peer namespace), virtio-rng, virtio-console, 2 vCPUs; ``poweroff`` in the guest
ends the DM with exit 0 and state ``stopped``; ``reboot`` resets it (a fresh DM boots the same definition).

Runs where KVM is hardware-assisted: in the real-KVM lane (``python -m tests.lane pytest``) on this project's
machines, directly elsewhere. Every wait is for an event, with limits sized for the lane's TCG-emulated L1.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "daemon"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from kvmdmd_harness import wait_until  # noqa: E402
from test_real_dm_process_model import RealDaemon  # noqa: E402

from tests.realkvm import guest  # noqa: E402
from tests.realkvm.netpeer import Peer, network_peer  # noqa: E402

pytestmark = [pytest.mark.realkvm, pytest.mark.root, pytest.mark.timeout(900)]

CMDLINE = "console=ttyS0 quiet panic=-1"
BOOT_LIMIT = 600.0  # generous: the lane's L1 runs on TCG; on its machines a boot takes ~20 s


class LaneDaemon(RealDaemon):
    start_timeout = 180.0

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, extra=["--start-timeout", "180", "--backend-ready-timeout", "180"])


@pytest.fixture(scope="module")
def linux(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return guest.require(tmp_path_factory.mktemp("linux"))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[LaneDaemon]:
    d = LaneDaemon(tmp_path)
    d.start()
    yield d
    d.cleanup()


@pytest.fixture
def peer() -> Iterator[Peer]:
    with network_peer(len(guest.NICS)) as p:
        yield p


def _finished(d: LaneDaemon, name: str) -> dict[str, Any]:
    return wait_until(lambda: (g := d.guest(name))["state"] in ("stopped", "crashed", "failed") and g,
                      BOOT_LIMIT, 0.5)


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()  # noqa: S324 - what busybox md5sum in the guest prints


def test_linux_reaches_userspace_under_the_jailed_dm_and_drives_every_device(
        daemon: LaneDaemon, linux: tuple[Path, Path], peer: Peer, tmp_path: Path) -> None:
    vmlinuz, initrd = linux
    images = [tmp_path / "inline.raw", tmp_path / "vhost.raw"]
    host_data = [guest.make_image(img, seed=i) for i, img in enumerate(images)]
    daemon.create("lx", str(vmlinuz), initrd=str(initrd), cmdline=f"{CMDLINE} lane.mode=full", vcpus=2,
                  memory_mib=512, rng=True, console2=True, restart="never",
                  disks=[{"path": str(images[0]), "serial": "INLINE0"},
                         {"path": str(images[1]), "backend": "vhost-user", "serial": "VHOST1"}],
                  nics=[{"bridge": peer.bridges[0]}, {"bridge": peer.bridges[1], "backend": "vhost-user"}])
    daemon.start_guest("lx")
    out = _finished(daemon, "lx")
    console = daemon.console("lx").decode(errors="replace").replace("\r\n", "\n")
    chk = guest.checks(console)
    print(console[-4000:])
    assert "GUEST-READY" in console, console[-3000:]
    assert chk.get("mode") == "full", console[-3000:]
    assert chk.get("nproc") == "2", chk
    assert chk.get("hwrng", "").startswith("virtio_rng") and chk.get("hwrng_bytes") == "64", chk
    assert chk.get("hvc0_write") == "0" and "[hvc0] hello from hvc0" in console, chk
    for disk, img, data in zip(guest.DISKS, images, host_data, strict=True):
        assert chk.get(f"{disk}_host_md5") == _md5(data), (disk, chk)  # the guest read what the host wrote
        assert chk.get(f"{disk}_write") == "0", (disk, chk)
        assert chk.get(f"{disk}_read_md5") == chk.get(f"{disk}_write_md5"), (disk, chk)
        assert img.read_bytes()[: guest.MIB] == guest.expected_write(disk)  # and it reached the host's image
    for nic in guest.NICS:
        assert chk.get(f"{nic}_ping") == "0", (nic, console[-3000:])
        assert chk.get(f"{nic}_iperf_tx") == "0" and chk.get(f"{nic}_iperf_rx") == "0", (nic, console[-3000:])
    assert "GUEST-EXIT rc=0" in console, chk
    # poweroff in the guest (ACPI S5): the DM exits 0 and the guest is stopped.
    assert out["state"] == "stopped" and out["last_exit_code"] == 0, out


def test_reboot_in_the_guest_resets_it_and_the_second_boot_powers_off(
        daemon: LaneDaemon, linux: tuple[Path, Path], tmp_path: Path) -> None:
    vmlinuz, initrd = linux
    img = tmp_path / "mark.raw"
    guest.make_image(img, seed=7)
    daemon.create("rb", str(vmlinuz), initrd=str(initrd), cmdline=f"{CMDLINE} lane.mode=reboot", vcpus=2,
                  memory_mib=256, disks=[{"path": str(img)}], restart="on-failure")
    daemon.start_guest("rb")
    out = wait_until(lambda: (g := daemon.guest("rb"))["state"] in ("stopped", "crashed", "failed")
                     and g["restarts"] >= 1 and g, BOOT_LIMIT * 2, 0.5)
    # Both boots in one console log: a reset reboots the same machine and its log goes on (issue 10).
    console = daemon.console("rb").decode(errors="replace")
    _first, marked, second = console.partition("CHK boot=first")
    assert marked and guest.checks(second).get("boot") == "second", console[-3000:]
    assert not (daemon.state_dir / "guests" / "rb" / "console.log.1").exists()
    assert out["restarts"] == 1 and out["state"] == "stopped" and out["last_exit_code"] == 0, out
    assert img.read_bytes()[:8] == b"REBOOTED"
