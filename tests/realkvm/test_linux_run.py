"""`kvmdm run guest.json` runs the same Linux guest as the daemon test, in the foreground, with every device the
runner prepares itself: virtio-blk inline and vhost-user (a kvmdm-backend it starts), virtio-net inline and
vhost-user on taps it creates on the peer's bridges, virtio-rng, virtio-console, 2 vCPUs. ``poweroff`` in the
guest exits 0; afterwards no tap and no back-end of it is left and the bridges it did not create are still there.

Runs where KVM is hardware-assisted: in the real-KVM lane (``python -m tests.lane pytest``) on this project's
machines, directly elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.realkvm import guest
from tests.realkvm.netpeer import Peer, network_peer

pytestmark = [pytest.mark.realkvm, pytest.mark.root, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
CMDLINE = "console=ttyS0 quiet panic=-1"
RUN_LIMIT = 600.0  # generous: the lane's L1 runs on TCG; there a run takes ~25 s


def _links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def test_kvmdm_run_of_a_definition_boots_linux_with_every_device_and_cleans_up(tmp_path: Path) -> None:
    vmlinuz, initrd = guest.require(tmp_path / "linux")
    images = [tmp_path / "inline.raw", tmp_path / "vhost.raw"]
    host_data = [guest.make_image(img, seed=10 + i) for i, img in enumerate(images)]
    with network_peer(len(guest.NICS)) as peer:
        _run_and_check(tmp_path, vmlinuz, initrd, images, host_data, peer)


def _run_and_check(tmp_path: Path, vmlinuz: Path, initrd: Path, images: list[Path], host_data: list[bytes],
                   peer: Peer) -> None:
    definition = tmp_path / "lx.json"
    definition.write_text(json.dumps({
        "name": "lxrun", "kernel": str(vmlinuz), "initrd": str(initrd), "cmdline": f"{CMDLINE} lane.mode=full",
        "vcpus": 2, "memory_mib": 512, "rng": True, "console2": True,
        "disks": [{"path": str(images[0]), "serial": "INLINE0"},
                  {"path": str(images[1]), "backend": "vhost-user", "serial": "VHOST1"}],
        "nics": [{"bridge": peer.bridges[0]}, {"bridge": peer.bridges[1], "backend": "vhost-user"}],
    }))
    before = _links()
    rt = tmp_path / "tmpdir"
    rt.mkdir()
    r = subprocess.run([sys.executable, "-m", "daemon.cli", "run", str(definition), "--timeout", str(RUN_LIMIT)],
                       cwd=REPO, env={**os.environ, "TMPDIR": str(rt), "PYTHONPATH": str(REPO)},
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=RUN_LIMIT + 120)
    console = r.stdout.decode(errors="replace").replace("\r\n", "\n")
    print(console[-4000:])
    print(r.stderr.decode(errors="replace")[-2000:], file=sys.stderr)
    chk = guest.checks(console)
    assert chk.get("mode") == "full", console[-3000:]
    assert chk.get("nproc") == "2", chk
    assert chk.get("hwrng", "").startswith("virtio_rng") and chk.get("hwrng_bytes") == "64", chk
    assert chk.get("hvc0_write") == "0" and "[hvc0] hello from hvc0" in console, chk
    for disk, img, data in zip(guest.DISKS, images, host_data, strict=True):
        assert chk.get(f"{disk}_host_md5") == hashlib.md5(data).hexdigest(), (disk, chk)  # noqa: S324
        assert chk.get(f"{disk}_write") == "0", (disk, chk)
        assert chk.get(f"{disk}_read_md5") == chk.get(f"{disk}_write_md5"), (disk, chk)
        assert img.read_bytes()[: guest.MIB] == guest.expected_write(disk)
    for nic in guest.NICS:
        assert chk.get(f"{nic}_ping") == "0", (nic, console[-3000:])
        assert chk.get(f"{nic}_iperf_tx") == "0" and chk.get(f"{nic}_iperf_rx") == "0", (nic, console[-3000:])
    assert "GUEST-EXIT rc=0" in console, chk
    assert r.returncode == 0, r.stderr[-2000:]  # ACPI S5 power-off: a plain exit 0
    # What the runner made is gone; what it found (the peer's bridges) is not.
    assert _links() == before, (sorted(_links() - before), sorted(before - _links()))
    assert set(peer.bridges) <= _links()
    assert list(rt.iterdir()) == []  # back-end sockets and logs removed
    leftover = subprocess.run(["pgrep", "-f", "daemon.backend_main"], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", leftover.stdout
