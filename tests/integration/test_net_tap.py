"""virtio-net over a real tap, and the daemon's tap/bridge plumbing, each test inside a network namespace it creates.

Every root test forks a child that unshares a fresh network namespace (unshare(CLONE_NEWNET)) and runs the test
body there: taps, bridges and every frame stay inside it, and the namespace (with anything left in it) vanishes
when the child exits, even if the test fails. The parent reports the child's traceback.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon import net as dnet
from kvmcore.memory import GuestMemory
from pv import tap
from pv.device import VIRTIO_F_VERSION_1
from pv.net import (
    NET_HDR,
    NET_HDR_SIZE,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_MRG_RXBUF,
    Net,
    offload_flags,
)
from pv.testing import FakeHealth, MockSplitQueue, make_guest_memory

CLONE_NEWNET = 0x40000000
ETH_P_TEST = 0x88B5  # IEEE 802 local experimental ethertype: nothing else in the namespace sends it
MAC = bytes.fromhex("525400abcdef")


def run_in_netns(body: Callable[[], None], timeout: float = 30.0) -> None:
    """Run ``body`` in a forked child inside a brand-new network namespace; re-raise its failure here."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(r)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            # IPv6 autoconf would make the kernel send its own frames on the tap; keep the wire quiet.
            with open("/proc/sys/net/ipv6/conf/default/disable_ipv6", "w") as f:
                f.write("1")
            body()
            code = 0
        except BaseException:
            os.write(w, traceback.format_exc().encode()[-60000:])
        finally:
            os._exit(code)
    os.close(w)
    deadline = time.monotonic() + timeout
    out = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"netns child timed out after {timeout} s")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            out += chunk
    finally:
        os.close(r)
    _pid, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        pytest.fail(f"netns child failed:\n{out.decode(errors='replace')}", pytrace=False)


def links() -> set[str]:
    with dnet._ipr() as ipr:
        return {str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}


def link_info(name: str) -> dict[str, object]:
    with dnet._ipr() as ipr:
        idx = ipr.link_lookup(ifname=name)[0]
        link = ipr.get_links(idx)[0]
        return {
            "index": idx,
            "alias": link.get_attr("IFLA_IFALIAS"),
            "master": link.get_attr("IFLA_MASTER"),
            "up": bool(link["flags"] & 1),
            "kind": dnet._kind(ipr, idx),
        }


def packet_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_TEST))
    s.bind((ifname, ETH_P_TEST))
    s.settimeout(5)
    return s


def eth(payload: bytes, src: bytes = MAC, dst: bytes = b"\xff" * 6) -> bytes:
    return dst + src + struct.pack("!H", ETH_P_TEST) + payload


class Guest:
    """Driver side of a Net device: rings in guest memory, eventfds for kicks and calls."""

    def __init__(self, fd: int, features: int | None = None) -> None:
        self.mem: GuestMemory = make_guest_memory(8 << 20)
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]
        self.rx = MockSplitQueue(self.mem, 256, base=0x1000, limit=0x400000, kick_fd=self.fds[0], call_fd=self.fds[1])
        self.tx = MockSplitQueue(self.mem, 256, base=0x400000, index=1, kick_fd=self.fds[2], call_fd=self.fds[3])
        self.health = FakeHealth()
        self.dev = Net(fd, MAC)
        self.dev.ack_features(self.dev.device_features() if features is None else features)
        self.dev.activate(self.mem, [self.rx.config(), self.tx.config()], self.health)

    def close(self) -> None:
        self.dev.reset()
        for fd in self.fds:
            os.close(fd)
        self.mem.close()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.002)


# --------------------------------------------------------------------------------------------- naming (no root)
def test_tap_names_fit_ifnamsiz_and_keep_guests_with_a_common_prefix_apart() -> None:
    assert dnet.tap_name("web", 0) == "kvmdm-web-0"
    a, b = dnet.tap_name("database-primary", 3), dnet.tap_name("database-replica", 3)
    assert len(a) <= 15 and len(b) <= 15 and a != b
    assert a.startswith("kvmdm-") and a.endswith("-3")
    assert dnet.tap_name("x" * 64, 7) == dnet.tap_name("x" * 64, 7)  # deterministic


def test_invalid_interface_names_are_rejected_before_any_syscall() -> None:
    for bad in ("", "a" * 16, "a/b", " lead"):
        with pytest.raises(ValueError):
            tap.open_tap(bad)


# -------------------------------------------------------------------------------------- Net over a real tap
@pytest.mark.root
def test_guest_tx_frame_appears_on_the_tap_and_tap_frame_reaches_guest_rx() -> None:
    def body() -> None:
        ifname, fd = dnet.create_tap(None, bridge=None, owner_uid=None, guest="t", index=0)
        g = Guest(fd)
        try:
            assert g.dev.is_tap and tap.get_vnet_hdr_size(fd) == NET_HDR_SIZE
            ps = packet_socket(ifname)
            # guest -> host
            out = eth(b"from the guest " * 20)
            g.tx.add_chain([NET_HDR.pack(0, 0, 0, 0, 0, 0, 0), out[:20], out[20:]])
            g.tx.kick()
            assert ps.recv(65536) == out
            wait_for(lambda: g.tx.used_idx() == 1)
            # host -> guest
            for _ in range(8):
                g.rx.add_chain([2048])
            g.rx.kick()
            into = eth(b"to the guest " * 30, src=bytes.fromhex("020000000001"), dst=MAC)
            ps.send(into)
            wait_for(lambda: g.rx.used_idx() == 1)
            (head, n), = g.rx.read_used()
            got = g.rx.read_buffer(g.rx.buffers(head)[0])[:n]
            assert got[NET_HDR_SIZE:] == into
            assert struct.unpack_from("<H", got, 10)[0] == 1  # num_buffers
            assert g.health.resets == []
            ps.close()
        finally:
            g.close()
            os.close(fd)
        assert ifname not in links()  # non-persistent: gone with its last fd

    run_in_netns(body)


@pytest.mark.root
def test_burst_larger_than_the_rx_ring_is_delivered_in_order_as_the_guest_refills() -> None:
    def body() -> None:
        ifname, fd = dnet.create_tap(None, bridge=None, owner_uid=None, guest="b", index=0)
        g = Guest(fd, (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF))
        try:
            ps = packet_socket(ifname)
            sent = [eth(i.to_bytes(4, "big") + bytes(200)) for i in range(100)]
            for f in sent:
                ps.send(f)  # the tap queues them (txqueuelen 1000) while the guest has no buffers
            got: list[bytes] = []
            while len(got) < len(sent):
                for _ in range(16):
                    g.rx.add_chain([256])
                g.rx.kick()
                wait_for(lambda: g.rx.used_idx() != g.rx.last_used)
                time.sleep(0.01)
                for head, n in g.rx.read_used():
                    got.append(g.rx.read_buffer(g.rx.buffers(head)[0])[NET_HDR_SIZE:n])
            assert got == sent
            assert g.dev.metrics.rx_waits >= 1
            ps.close()
        finally:
            g.close()
            os.close(fd)

    run_in_netns(body)


@pytest.mark.root
def test_guest_offloads_are_applied_to_the_tap_and_refused_combinations_are_not_offered() -> None:
    def body() -> None:
        _ifname, fd = dnet.create_tap(None, bridge=None, owner_uid=None, guest="o", index=0)
        try:
            feats = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4)
            # What activate() passes to TUNSETOFFLOAD is accepted by the kernel.
            tap.set_offload(fd, offload_flags(feats))
            # tun refuses TSO without checksum offload (EINVAL), which offload_flags never produces.
            with pytest.raises(OSError):
                tap.set_offload(fd, tap.TUN_F_TSO4)
            g = Guest(fd, feats)
            g.close()
        finally:
            os.close(fd)

    run_in_netns(body)


# --------------------------------------------------------------------------------------------- daemon/net.py
@pytest.mark.root
def test_create_tap_with_new_bridge_marks_both_ours_and_cleanup_leaves_no_links() -> None:
    def body() -> None:
        before = links()
        ifname, fd = dnet.create_tap(None, bridge="kvbr0", owner_uid=65534, guest="web", index=1)
        try:
            assert ifname == "kvmdm-web-1"
            t, b = link_info(ifname), link_info("kvbr0")
            assert t["alias"] == "kvmdm:tap:web" and t["up"] and t["master"] == b["index"]
            assert b["alias"] == "kvmdm:bridge" and b["kind"] == "bridge" and b["up"]
            assert not dnet.release_bridge("kvbr0")  # still has a port
            assert dnet.remove_tap(ifname)
            assert not dnet.remove_tap(ifname)  # idempotent
            assert dnet.release_bridge("kvbr0")
        finally:
            os.close(fd)
        assert links() == before

    run_in_netns(body)


@pytest.mark.root
def test_pre_existing_bridge_and_tap_are_used_but_never_removed() -> None:
    def body() -> None:
        with dnet._ipr() as ipr:
            ipr.link("add", ifname="opbr", kind="bridge")
        opname, opfd = tap.open_tap("optap")
        tap.set_persist(opfd, True)
        os.close(opfd)
        ifname, fd = dnet.create_tap("optap", bridge="opbr", owner_uid=None)
        try:
            assert ifname == "optap"
            assert link_info("optap")["master"] == link_info("opbr")["index"]
            assert not dnet.remove_tap("optap")
            os.close(fd)
            fd = -1
            assert dnet.cleanup() == []
            assert {"optap", "opbr"} <= links()
        finally:
            if fd >= 0:
                os.close(fd)

    run_in_netns(body)


@pytest.mark.root
def test_cleanup_removes_only_the_named_guests_persistent_taps_then_our_empty_bridges() -> None:
    def body() -> None:
        before = links()
        a, fa = dnet.create_tap(None, bridge="kvbr1", owner_uid=None, guest="a", index=0, persist=True)
        b, fb = dnet.create_tap(None, bridge="kvbr1", owner_uid=None, guest="b", index=0, persist=True)
        os.close(fa)
        os.close(fb)
        assert {a, b, "kvbr1"} <= links()  # persistent: they outlive their fds
        assert dnet.cleanup("a") == [a]
        assert b in links() and "kvbr1" in links()  # bridge still has b
        assert sorted(dnet.cleanup()) == sorted([b, "kvbr1"])
        assert links() == before

    run_in_netns(body)


@pytest.mark.root
def test_create_tap_on_a_name_taken_by_a_non_tap_fails_cleanly() -> None:
    def body() -> None:
        with dnet._ipr() as ipr:
            ipr.link("add", ifname="notatap", kind="bridge")
        _n, pfd = tap.open_tap("notabr")
        tap.set_persist(pfd, True)
        os.close(pfd)
        before = links()
        with pytest.raises(dnet.NetError, match="not a tap"):
            dnet.create_tap("notatap", bridge=None, owner_uid=None)
        with pytest.raises(dnet.NetError, match="not a bridge"):
            dnet.create_tap(None, bridge="notabr", owner_uid=None, guest="c")
        assert links() == before  # the tap made before the bridge check was removed again

    run_in_netns(body)


@pytest.mark.root
def test_daemon_gives_each_nic_a_tap_on_its_bridge_and_destroy_leaves_no_links(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "daemon"))
    from kvmdmd_harness import Daemon, wait_until

    def body() -> None:
        before = links()
        daemon = Daemon(tmp_path).start()
        try:
            g = daemon.create_and_start("nic", nics=[{"bridge": "kvbr9"}, {}])
            pid = g["dm_pid"]
            t0, t1 = link_info("kvmdm-nic-0"), link_info("kvmdm-nic-1")
            assert t0["alias"] == "kvmdm:tap:nic" and t0["up"]
            assert t0["master"] == link_info("kvbr9")["index"] and t1["master"] is None
            tun_fds = [f for f in os.listdir(f"/proc/{pid}/fd")
                       if os.readlink(f"/proc/{pid}/fd/{f}") == "/dev/net/tun"]
            assert len(tun_fds) == 2  # one attached tap fd per nic, passed to the DM
            os.kill(pid, signal.SIGKILL)  # the taps die with the DM's fds; the restart makes new ones
            wait_until(lambda: (x := daemon.guest("nic"))["state"] == "running" and x["dm_pid"] != pid, 10)
            assert {"kvmdm-nic-0", "kvmdm-nic-1"} <= links()
            daemon.json("DELETE", "/v1/guests/nic")
            wait_until(lambda: links() == before, 5)
        finally:
            daemon.cleanup()

    run_in_netns(body, timeout=60)
