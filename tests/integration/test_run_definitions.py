"""`kvmdm run guest.json`: the project's virtio test guests run in the foreground from a guest definition, with the
disks and nics the runner prepares itself (daemon.runner.ForegroundResources) and builds through the same recipe
as the daemon's DMs (daemon.builder): inline and vhost-user virtio-blk (daemon-managed back-end and an external
one), inline and vhost-user virtio-net on taps enslaved to a bridge. Afterwards no tap, bridge, back-end process
or runtime dir is left, also after SIGTERM/SIGINT and after an error half-way; a bad definition exits 2 and
creates nothing.

Net tests run the runner inside a fresh network namespace (`ip netns exec`), where a bridge with 10.0.2.2/24 is
the peer that answers the virtio_net guest's ARP request (tests/guests/virtio_net.S).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.unit.guests.test_guests_virtio_qemu import (
    GUEST_MAC,
    PEER_MAC,
    bad_pattern_sectors,
    blk_elf,
    digest,
    expected_blk_output,
    expected_net_output,
    in_namespace,
    make_image,
    net_elf,
)

REPO = Path(__file__).resolve().parents[2]
BACKEND_MARKER = b"daemon.backend_main"
pytestmark = [pytest.mark.kvm, pytest.mark.timeout(180)]


def _define(tmp_path: Path, **doc: Any) -> Path:
    p = tmp_path / "guest.json"
    p.write_text(json.dumps({"name": "rt", "memory_mib": 32, **doc}))
    return p


def _env(tmp_path: Path) -> dict[str, str]:
    """TMPDIR of the test's own, so that the runner's runtime dir (back-end sockets, logs) can be checked gone."""
    rt = tmp_path / "tmpdir"
    rt.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(rt), "PYTHONPATH": str(REPO)}


def _cmd(netns: str | None, *args: str) -> list[str]:
    cmd = [sys.executable, "-m", "daemon.cli", "run", *args]
    return ["ip", "netns", "exec", netns, *cmd] if netns else cmd


def kvmdm_run(tmp_path: Path, *args: str, netns: str | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cmd(netns, *args), cwd=REPO, env=_env(tmp_path), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def _backend_pids(needle: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            except OSError:
                continue
            if BACKEND_MARKER in cmd and needle.encode() in cmd:
                out.append(int(d))
    return out


def _assert_clean(tmp_path: Path, needle: str) -> None:
    assert list((tmp_path / "tmpdir").iterdir()) == [], "the runner left its runtime dir behind"
    assert _backend_pids(needle) == [], "a back-end process outlived the runner"


# --------------------------------------------------------------------------------------------------- virtio-blk
def test_inline_disk_from_a_definition_runs_the_blk_guest(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    p = _define(tmp_path, kernel=str(blk_elf()), cmdline="sectors=64 seed=9",
                disks=[{"path": image.name, "serial": "FROM-JSON"}])  # relative: to the definition's dir
    r = kvmdm_run(tmp_path, str(p))
    assert r.stdout == expected_blk_output(64, serial="FROM-JSON"), r.stderr
    assert r.returncode == 0, r.stderr
    assert bad_pattern_sectors(image, 9, 64) == []


def test_command_line_overrides_replace_the_definition_s_cmdline_and_memory(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    before = digest(image)
    p = _define(tmp_path, kernel=str(blk_elf()), cmdline="sectors=64 seed=1",
                disks=[{"path": str(image), "read_only": True, "serial": "RO"}])
    r = kvmdm_run(tmp_path, str(p), "--cmdline", "sectors=64 ro=1", "--mem", "64M", "--vcpus", "1")
    assert r.stdout == expected_blk_output(64, ro=True, serial="RO"), r.stderr
    assert r.returncode == 0
    assert digest(image) == before


def test_vhost_user_disk_gets_a_back_end_process_that_is_reaped_afterwards(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    p = _define(tmp_path, kernel=str(blk_elf()), cmdline="sectors=64 seed=4",
                disks=[{"path": str(image), "backend": "vhost-user", "serial": "VU-RUN"}])
    r = kvmdm_run(tmp_path, str(p))
    assert r.stdout == expected_blk_output(64, serial="VU-RUN"), r.stderr
    assert r.returncode == 0
    assert bad_pattern_sectors(image, 4, 64) == []  # written by the back-end process
    _assert_clean(tmp_path, str(image))


def test_vhost_user_disk_on_an_external_back_end_socket_is_only_connected_to(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    sock = tmp_path / "ext.sock"
    ext = subprocess.Popen([sys.executable, "-m", "daemon.backend_main", "blk", "--socket", str(sock), "--image",
                            str(image), "--serial", "EXTERNAL", "--no-jail"], cwd=REPO, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert ext.stderr is not None
        deadline = time.monotonic() + 20
        while not (sock.exists() and b"READY" in ext.stderr.readline()):
            assert time.monotonic() < deadline and ext.poll() is None, "external back-end did not start"
        p = _define(tmp_path, kernel=str(blk_elf()), cmdline="sectors=64 seed=6",
                    disks=[{"path": str(sock), "backend": "vhost-user"}])
        r = kvmdm_run(tmp_path, str(p))
        assert r.stdout == expected_blk_output(64, serial="EXTERNAL"), r.stderr
        assert r.returncode == 0
        assert ext.poll() is None  # not ours: left running
        assert bad_pattern_sectors(image, 6, 64) == []
    finally:
        ext.kill()
        ext.wait(10)


def test_demo_and_bare_kernel_modes_still_work(tmp_path: Path) -> None:
    r = kvmdm_run(tmp_path, "--kernel", str(blk_elf()), "--mem", "32M")
    assert r.stdout == "virtio_blk: no virtio-blk device\n" and r.returncode == 1  # the guest's FAIL status


# ------------------------------------------------------------------------------------------------- definitions
@pytest.mark.parametrize("doc, message", [
    ({"kernel": "/nonexistent/kernel.elf"}, "kernel: file does not exist"),
    ({"disks": [{"path": "/nonexistent/disk.raw"}]}, "disks[0].path: file does not exist"),
    ({"nics": [{"mac": "ff:ff:ff:ff:ff:ff"}]}, "nics[0].mac: must be a unicast address"),
    ({"vcpus": 0}, "vcpus: must be between 1 and 32, got 0"),
    ({"nic": []}, "nic: unknown key"),
], ids=["kernel", "disk", "mac", "vcpus", "unknown-key"])
def test_a_bad_definition_exits_2_naming_the_file_and_the_field(tmp_path: Path, doc: dict[str, Any],
                                                                message: str) -> None:
    p = _define(tmp_path, **{"kernel": str(blk_elf()), "nics": [{}], **doc})
    r = kvmdm_run(tmp_path, str(p))
    assert r.returncode == 2, r.stderr
    assert f"kvmdm: error: {p}: " in r.stderr and message in r.stderr, r.stderr
    assert r.stdout == ""


# --------------------------------------------------------------------------------------------------- virtio-net
def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


def _links(ns: str) -> set[str]:
    out = subprocess.run(["ip", "-n", ns, "-o", "link"], check=True, capture_output=True, text=True).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


@contextmanager
def netns(*, peer_bridge: str | None = "kvbr0") -> Iterator[str]:
    """A fresh network namespace without IPv6 chatter; ``peer_bridge`` there with the peer's MAC and 10.0.2.2/24
    (the namespace's kernel then answers the guest's ARP request through the bridge)."""
    ns = f"kvmdm-rn-{uuid.uuid4().hex[:8]}"
    _ip("netns", "add", ns)
    try:
        for knob in ("all", "default"):
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{knob}.disable_ipv6=1"],
                           check=True, capture_output=True)
        if peer_bridge is not None:
            _ip("-n", ns, "link", "add", peer_bridge, "type", "bridge")
            _ip("-n", ns, "link", "set", peer_bridge, "address", PEER_MAC)
            _ip("-n", ns, "addr", "add", "10.0.2.2/24", "dev", peer_bridge)
            _ip("-n", ns, "link", "set", peer_bridge, "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.mark.root
@pytest.mark.parametrize("backend", ["inline", "vhost-user"])
def test_nic_on_a_bridge_runs_the_net_guest_and_its_tap_is_gone_afterwards(tmp_path: Path, backend: str) -> None:
    with netns() as ns:
        before = _links(ns)
        p = _define(tmp_path, kernel=str(net_elf()), nics=[{"mac": GUEST_MAC, "bridge": "kvbr0", "backend": backend}])
        r = kvmdm_run(tmp_path, str(p), netns=ns)
        assert r.stdout == expected_net_output(), r.stderr
        assert r.returncode == 0, r.stderr
        assert _links(ns) == before == {"lo", "kvbr0"}  # tap kvmdm-rt-0 deleted, the operator's bridge kept
    _assert_clean(tmp_path, "kvmdm-rt-0")


@pytest.mark.root
def test_a_missing_bridge_is_created_for_the_run_and_removed_after_it(tmp_path: Path) -> None:
    with netns(peer_bridge=None) as ns:
        p = _define(tmp_path, kernel=str(net_elf()), nics=[{"mac": GUEST_MAC, "bridge": "kvbrnew", "tap": "kvtap9"}])
        r = kvmdm_run(tmp_path, str(p), netns=ns)
        # Nobody on the new bridge answers: the guest's tx works, its rx times out (exit 1, the guest's FAIL).
        assert r.stdout == f"virtio_net: mac={GUEST_MAC} tx ok rx timeout\n", r.stderr
        assert r.returncode == 1
        assert _links(ns) == {"lo"}


@pytest.mark.root
def test_a_bad_definition_with_nics_creates_no_tap(tmp_path: Path) -> None:
    with netns() as ns:
        (tmp_path / "junk.elf").write_bytes(b"not a kernel")
        for doc, message in (({"kernel": str(tmp_path / "junk.elf")}, "kernel: "),
                             ({"nics": [{}, {"bridge": "lo"}]}, "nics[1].bridge: lo exists and is not a bridge"),
                             ({"disks": [{"path": str(tmp_path)}]}, "disks[0].path: must be a regular file")):
            p = _define(tmp_path, **{"kernel": str(net_elf()), "nics": [{}, {"backend": "vhost-user"}], **doc})
            r = kvmdm_run(tmp_path, str(p), netns=ns)
            assert r.returncode == 2 and message in r.stderr and str(p) in r.stderr, r.stderr
            assert _links(ns) == {"lo", "kvbr0"}
        _assert_clean(tmp_path, str(tmp_path))


@pytest.mark.root
def test_a_tap_that_cannot_be_had_half_way_undoes_the_taps_and_back_ends_made_before_it(tmp_path: Path) -> None:
    from pv import tap

    image = make_image(tmp_path)
    with netns() as ns:
        with in_namespace(ns):
            _, held = tap.open_tap("kvbusy0")  # someone else's tap, in use: opening it again gives EBUSY
        try:
            p = _define(tmp_path, kernel=str(net_elf()),
                        disks=[{"path": str(image), "backend": "vhost-user"}],
                        nics=[{"bridge": "kvbr0", "backend": "vhost-user"}, {"bridge": "kvbr0"},
                              {"tap": "kvbusy0"}])
            r = kvmdm_run(tmp_path, str(p), netns=ns)
            assert r.returncode == 1, r.stderr
            assert "kvmdm: error: nics[2]: cannot open tap kvbusy0" in r.stderr, r.stderr
            assert _links(ns) == {"lo", "kvbr0", "kvbusy0"}  # ours gone, the other one untouched
        finally:
            os.close(held)
    _assert_clean(tmp_path, str(image))


@pytest.mark.root
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_running_guest_and_everything_is_cleaned_up(tmp_path: Path, signum: int) -> None:
    from guests.build import build_guest

    image = make_image(tmp_path)
    with netns() as ns:
        p = _define(tmp_path, kernel=str(build_guest("uart_irq")), cmdline="timeout=60000",
                    disks=[{"path": str(image), "backend": "vhost-user"}, {"path": str(image), "read_only": True}],
                    nics=[{"bridge": "kvbr0"}, {"bridge": "kvbr0", "backend": "vhost-user"}])
        proc = subprocess.Popen(_cmd(ns, str(p)), cwd=REPO, env=_env(tmp_path), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            seen = b""
            while b"READY" not in seen:  # the guest waits for console input from here on
                chunk = proc.stdout.read1(256)
                assert chunk, proc.stderr.read() if proc.stderr else ""
                seen += chunk
            assert {"kvmdm-rt-0", "kvmdm-rt-1"} <= _links(ns)
            assert len(_backend_pids(str(tmp_path / "tmpdir"))) == 2
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 1, err
        assert f"kvmdm: stopped by {signal.Signals(signum).name}" in err.decode()
        assert _links(ns) == {"lo", "kvbr0"}
    _assert_clean(tmp_path, str(tmp_path / "tmpdir"))
