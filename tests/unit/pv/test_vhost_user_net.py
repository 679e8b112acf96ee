"""pv.net.Net served over vhost-user to the mini-front-end; a SOCK_SEQPACKET pair stands in for the tap."""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from kvmcore.memory import GuestMemory
from pv.net import NET_HDR_SIZE, Net
from pv.testing import MockSplitQueue, make_guest_memory
from pv.vhost_user import protocol as P
from pv.vhost_user.testing import BackendThread, MiniFrontend

R = P.Request
MAC = bytes.fromhex("525400123456")
FRAME = bytes.fromhex("ffffffffffff") + MAC + b"\x08\x00" + bytes(range(50))


def _wait(pred: object, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.005)
    return False


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = make_guest_memory()
    yield m
    m.close()


@pytest.fixture
def net(mem: GuestMemory) -> Iterator[tuple[BackendThread, socket.socket]]:
    dev_end, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    bt = BackendThread(Net(dev_end.fileno(), MAC, queue_size=64), mem)
    yield bt, peer
    bt.close()
    dev_end.close()
    peer.close()


def _rings(fe: MiniFrontend) -> tuple[MockSplitQueue, MockSplitQueue]:
    mk = [MockSplitQueue(fe.mem, 16, base=0x1000 + i * 0x40000, limit=0x41000 + i * 0x40000, index=i, seed=i,
                         kick_fd=fe.eventfd(), call_fd=fe.eventfd()) for i in (0, 1)]
    return mk[0], mk[1]


def test_net_get_queue_num_counts_queue_pairs_and_config_is_not_offered(
        net: tuple[BackendThread, socket.socket]) -> None:
    fe = net[0].frontend
    assert not fe.get_u64(R.GET_PROTOCOL_FEATURES) & (1 << P.ProtocolFeature.CONFIG)
    fe.handshake()
    assert fe.get_u64(R.GET_QUEUE_NUM) == 1


def test_net_waits_for_both_rings_before_starting(net: tuple[BackendThread, socket.socket]) -> None:
    bt, _peer = net
    fe = bt.frontend
    fe.handshake()
    rx, _tx = _rings(fe)
    fe.setup_ring(rx)
    assert not bt.session._running and not bt.session.stats.needs_reset  # no "needs both queues" reset


def test_net_tx_frame_reaches_the_tap_and_rx_frame_reaches_the_guest(net: tuple[BackendThread, socket.socket]
                                                                     ) -> None:
    bt, peer = net
    fe = bt.frontend
    fe.handshake()
    rx, tx = _rings(fe)
    fe.setup_ring(rx)
    fe.setup_ring(tx)
    head = tx.add_chain([bytes(NET_HDR_SIZE) + FRAME])
    tx.kick()
    peer.settimeout(3)
    assert peer.recv(2048)[NET_HDR_SIZE:] == FRAME
    assert _wait(lambda: tx.used_idx() == 1) and tx.read_used() == [(head, 0)]
    rx_head = rx.add_chain([2048])
    rx.kick()
    peer.send(bytes(NET_HDR_SIZE) + FRAME)
    assert _wait(lambda: rx.used_idx() == 1)
    (h, n), = rx.read_used()
    assert h == rx_head and n == NET_HDR_SIZE + len(FRAME)
    assert rx.read_buffer(rx.buffers(h)[0])[NET_HDR_SIZE:n] == FRAME
    num_buffers = struct.unpack_from("<H", rx.read_buffer(rx.buffers(h)[0]), 10)[0]
    assert num_buffers == 1


def test_net_call_fd_swapped_while_running_keeps_the_ring_position(net: tuple[BackendThread, socket.socket]
                                                                   ) -> None:
    bt, peer = net
    fe = bt.frontend
    fe.handshake()
    rx, tx = _rings(fe)
    fe.setup_ring(rx)
    fe.setup_ring(tx)
    tx.add_chain([bytes(NET_HDR_SIZE) + FRAME])
    tx.kick()
    peer.settimeout(3)
    peer.recv(2048)
    assert _wait(lambda: tx.used_idx() == 1)
    activations = bt.session.stats.activations
    new_call = fe.eventfd()
    assert fe.ack(R.SET_VRING_CALL, fe.u64(1), (new_call,)) == 0
    assert bt.session.stats.activations == activations  # swapped in place, no restart from index 0
    tx.set_used_event(1)  # EVENT_IDX is negotiated: ask for an interrupt when used idx passes 1
    tx.add_chain([bytes(NET_HDR_SIZE) + FRAME[::-1]])
    tx.kick()
    assert peer.recv(2048)[NET_HDR_SIZE:] == FRAME[::-1]
    assert _wait(lambda: tx.used_idx() == 2)
    assert select.select([new_call], [], [], 3)[0], "the new call eventfd was not signalled"


def test_net_resumes_a_ring_at_the_base_set_vring_base_gives(net: tuple[BackendThread, socket.socket]) -> None:
    """vhost-user "Starting and stopping rings": a ring restarts at SET_VRING_BASE's index, not at 0 — chains
    before it were already served (e.g. by a back-end that crashed and was restarted)."""
    bt, peer = net
    fe = bt.frontend
    fe.handshake()
    rx, tx = _rings(fe)
    tx.set_avail_idx(5)  # the driver had made 5 chains available, all used before the restart
    tx.set_used_idx(5)
    fe.setup_ring(rx)
    fe.setup_ring(tx, base=5)
    tx.add_chain([bytes(NET_HDR_SIZE) + FRAME])  # lands in avail slot 5
    tx.kick()
    peer.settimeout(3)
    assert peer.recv(2048)[NET_HDR_SIZE:] == FRAME  # exactly one frame: slots 0-4 were not replayed
    assert _wait(lambda: tx.used_idx() == 6)
    assert not bt.session.stats.needs_reset
    assert fe.get_vring_base(1) == 6
