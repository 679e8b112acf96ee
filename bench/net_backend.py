"""Throughput of the virtio-net backend (pv.net.Net) over a real tap, in a private network namespace.

    sudo .venv/bin/python bench/net_backend.py [--frames 20000] [--size 1500] [--batch 128]

The process first unshares a new network namespace (root needed), so the tap, the AF_PACKET peer and every frame
stay inside it and vanish when it exits. A MockSplitQueue plays the guest driver:

* tx: the "guest" queues ``batch`` frames, kicks; the peer reads them from an AF_PACKET socket on the tap;
* rx: the peer sends ``batch`` frames into the tap; the "guest" posts buffers and waits for them in the used ring.

Prints frames/s and MB/s (payload bytes, 1 MB = 1e6 B) per direction. Driver-side Python costs are included, so
the numbers are a lower bound for the device itself.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon import net as dnet  # noqa: E402
from pv.net import NET_HDR, NET_HDR_SIZE, Net  # noqa: E402
from pv.testing import MockSplitQueue, make_guest_memory  # noqa: E402

CLONE_NEWNET = 0x40000000
ETH_P_BENCH = 0x88B6
MAC = bytes.fromhex("525400000001")


class _Health:
    def __init__(self) -> None:
        self.resets: list[str] = []

    def needs_reset(self, reason: str) -> None:
        self.resets.append(reason)

    def config_changed(self) -> None:
        pass


def _unshare_net() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) (are you root?)")
    with open("/proc/sys/net/ipv6/conf/default/disable_ipv6", "w") as f:
        f.write("1")


def _wait_used(mock: MockSplitQueue, target: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while (mock.used_idx() - mock.last_used) & 0xFFFF < target:
        if time.monotonic() > end:
            raise TimeoutError(f"only {(mock.used_idx() - mock.last_used) & 0xFFFF} of {target} chains completed")
        time.sleep(0)


def run(frames: int, size: int, batch: int) -> dict[str, float]:
    ifname, fd = dnet.create_tap(None, bridge=None, owner_uid=None, guest="bench", index=0)
    if size > 1514:
        with dnet._ipr() as ipr:  # jumbo frames: raise the tap's MTU so AF_PACKET may send them
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], mtu=size - 14)
    mem = make_guest_memory(64 << 20)
    efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]
    rx = MockSplitQueue(mem, 256, base=0x1000, limit=32 << 20, kick_fd=efds[0], call_fd=efds[1], max_gap=0)
    tx = MockSplitQueue(mem, 256, base=32 << 20, index=1, kick_fd=efds[2], call_fd=efds[3], max_gap=0)
    health = _Health()
    dev = Net(fd, MAC)
    dev.ack_features(dev.device_features())
    dev.activate(mem, [rx.config(), tx.config()], health)
    peer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_BENCH))
    peer.bind((ifname, ETH_P_BENCH))
    peer.settimeout(10)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    payload = bytes(size - 14)
    out = b"\xff" * 6 + MAC + struct.pack("!H", ETH_P_BENCH) + payload
    into = MAC + bytes.fromhex("020000000002") + struct.pack("!H", ETH_P_BENCH) + payload
    hdr = NET_HDR.pack(0, 0, 0, 0, 0, 0, 0)
    res: dict[str, float] = {}
    try:
        # ---- tx: guest -> tap
        t0 = time.perf_counter()
        done = 0
        while done < frames:
            n = min(batch, frames - done)
            tx.reset_data()
            for _ in range(n):
                tx.add_chain([hdr + out])
            tx.kick()
            for _ in range(n):
                peer.recv(65536)
            _wait_used(tx, n)
            tx.read_used()
            done += n
        dt = time.perf_counter() - t0
        res["tx_fps"], res["tx_MBps"] = frames / dt, frames * size / dt / 1e6
        # ---- rx: tap -> guest
        t0 = time.perf_counter()
        done = 0
        while done < frames:
            n = min(batch, frames - done)
            rx.reset_data()
            for _ in range(n):
                rx.add_chain([NET_HDR_SIZE + size])
            rx.kick()
            for _ in range(n):
                peer.send(into)
            _wait_used(rx, n)
            rx.read_used()
            done += n
        dt = time.perf_counter() - t0
        res["rx_fps"], res["rx_MBps"] = frames / dt, frames * size / dt / 1e6
        if health.resets:
            raise RuntimeError(f"device reset: {health.resets}")
    finally:
        peer.close()
        dev.reset()
        for e in efds:
            os.close(e)
        mem.close()
        os.close(fd)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=20000)
    p.add_argument("--size", type=int, default=1500, help="Ethernet frame size without the virtio header")
    p.add_argument("--batch", type=int, default=128, help="frames per kick (<= 256)")
    a = p.parse_args(argv)
    if not 60 <= a.size <= 65535 or not 1 <= a.batch <= 256:
        p.error("--size must be 60..65535 and --batch 1..256")
    _unshare_net()
    r = run(a.frames, a.size, a.batch)
    print(f"frames={a.frames} size={a.size} batch={a.batch}")
    print(f"tx: {r['tx_fps']:10.0f} frames/s {r['tx_MBps']:8.1f} MB/s")
    print(f"rx: {r['rx_fps']:10.0f} frames/s {r['rx_MBps']:8.1f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
