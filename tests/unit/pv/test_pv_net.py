"""virtio-net backend (virtio 1.2 §5.1) against a SOCK_SEQPACKET socketpair standing in for the tap.

A SEQPACKET socket keeps message boundaries like a tap does: one message is one "header + frame". The engine
(``NetEngine``) is driven synchronously for exact assertions; the threaded device (``Net.activate``) is checked
for kicks, interrupts, backpressure and resets. Every test runs twice: with the Python per-frame path (the
reference) and with pv.netring's C loop.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmcore.memory import GuestMemory, GuestMemoryError
from pv import tap
from pv.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, VIRTIO_ID_NET
from pv.errors import VirtqueueError
from pv.net import (
    NET_HDR,
    NET_HDR_SIZE,
    TX_QUEUE,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    Net,
    NetEngine,
    NetMetrics,
    RxBufferTooSmall,
    RxChainReadable,
    TxChainWritable,
    TxHeaderTooShort,
    offload_flags,
)
from pv.queue import (
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    SplitQueue,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from pv.testing import POISON, FakeHealth, MockSplitQueue, make_guest_memory

MAC = bytes.fromhex("525400123456")
MERGE = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF)
PLAIN = 1 << VIRTIO_F_VERSION_1


def hdr(flags: int = 0, gso: int = 0, num_buffers: int = 0) -> bytes:
    return NET_HDR.pack(flags, gso, 0, 0, 0, 0, num_buffers)


def frame(n: int, seed: int = 7) -> bytes:
    return bytes((seed + i * 31) & 0xFF for i in range(n))


@pytest.fixture(params=["python", "c"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = make_guest_memory(8 << 20)
    yield m
    m.close()


@pytest.fixture
def pair() -> Iterator[tuple[int, socket.socket]]:
    """(device-side fd, test-side socket)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.settimeout(5)
    yield a.fileno(), b
    a.close()
    b.close()


class Rig:
    """Driver-side rx/tx mocks, the device-side queues and an engine over them."""

    def __init__(self, mem: GuestMemory, fd: int, features: int, size: int = 16, event_idx: bool = False,
                 engine: str = "python") -> None:
        self.rx = MockSplitQueue(mem, size, base=0x1000, limit=0x400000, seed=3, event_idx=event_idx)
        self.tx = MockSplitQueue(mem, size, base=0x400000, seed=4, index=TX_QUEUE, event_idx=event_idx)
        self.rxq = SplitQueue(mem, self.rx.config())
        self.txq = SplitQueue(mem, self.tx.config())
        self.rxq.validate()
        self.txq.validate()
        self.metrics = NetMetrics()
        self.engine = NetEngine(self.rxq, self.txq, fd, features, self.metrics, engine=engine)

    def close(self) -> None:
        self.engine.close()
        self.rxq.close()
        self.txq.close()


@pytest.fixture
def rig_factory(mem: GuestMemory, pair: tuple[int, socket.socket], engine: str) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(features: int = MERGE, **kw: object) -> Rig:
        r = Rig(mem, pair[0], features, engine=engine, **kw)  # type: ignore[arg-type]
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        r.close()


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def rx_payload(rig: Rig | Live, head: int) -> bytes:
    return b"".join(rig.rx.read_buffer(b) for b in rig.rx.buffers(head))


# ---------------------------------------------------------------------------------------------- identity / config
def test_net_identity_two_queues_and_features_without_offloads_on_a_non_tap_fd(pair: tuple[int, socket.socket]) -> None:
    dev = Net(pair[0], MAC)
    assert dev.device_type == VIRTIO_ID_NET == 1
    assert dev.queue_max_sizes == (256, 256)
    assert not dev.is_tap
    f = dev.device_features()
    for bit in (VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MRG_RXBUF):
        assert f & (1 << bit)
    # Nobody would honour checksum/GSO headers on a plain socket, so they are not offered.
    for bit in (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_GUEST_TSO4):
        assert not f & (1 << bit)


def test_config_space_is_mac_then_status_link_up_then_one_queue_pair_and_zero_beyond(
    pair: tuple[int, socket.socket],
) -> None:
    dev = Net(pair[0], MAC)
    buf = bytearray(b"\xff" * 16)
    dev.read_config(0, memoryview(buf))
    assert buf[:6] == MAC
    assert struct.unpack_from("<HH", buf, 6) == (1, 1)  # §5.1.4: VIRTIO_NET_S_LINK_UP, max_virtqueue_pairs
    assert buf[10:] == bytes(6)
    one = bytearray(b"\xff")
    dev.read_config(4096, memoryview(one))
    assert one == b"\0"
    dev.read_config(-1, memoryview(one))
    assert one == b"\0"


def test_link_down_clears_status_and_raises_a_config_change_once_live(
    mem: GuestMemory, pair: tuple[int, socket.socket]
) -> None:
    dev = Net(pair[0], MAC)
    health = FakeHealth()
    dev.ack_features(dev.device_features())
    rx = MockSplitQueue(mem, 8, base=0x1000, limit=0x100000)
    tx = MockSplitQueue(mem, 8, base=0x100000, index=1)
    dev.activate(mem, [rx.config(), tx.config()], health)
    try:
        dev.set_link(False)
        dev.set_link(False)  # no change, no interrupt
        buf = bytearray(2)
        dev.read_config(6, memoryview(buf))
        assert buf == b"\0\0"
        assert health.config_changes == 1
    finally:
        dev.reset()


@pytest.mark.parametrize(
    ("mac", "kw", "err"),
    [
        (b"\x52\x54\x00", {}, "6 bytes"),
        (bytes.fromhex("010203040506"), {}, "multicast"),
        (MAC, {"queue_size": 100}, "power of two"),
        (MAC, {"queue_size": 1 << 16}, "power of two"),
    ],
)
def test_constructor_rejects_bad_mac_and_queue_size(
    pair: tuple[int, socket.socket], mac: bytes, kw: dict[str, int], err: str
) -> None:
    with pytest.raises(ValueError, match=err):
        Net(pair[0], mac, **kw)


def test_constructor_fails_fast_on_a_closed_fd() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError):
        Net(r, MAC)


def test_offload_flags_follow_the_guest_features_and_need_guest_csum() -> None:
    g = lambda *bits: sum(1 << b for b in bits)  # noqa: E731
    assert offload_flags(0) == 0
    assert offload_flags(g(VIRTIO_NET_F_GUEST_CSUM)) == tap.TUN_F_CSUM
    assert offload_flags(g(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6)) == (
        tap.TUN_F_CSUM | tap.TUN_F_TSO4 | tap.TUN_F_TSO6
    )
    assert offload_flags(g(VIRTIO_NET_F_GUEST_TSO4)) == 0  # tun refuses TSO without CSUM
    assert offload_flags(g(VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_CSUM)) == 0  # host-side offloads need no ioctl


# ------------------------------------------------------------------------------------------------------------ tx
def test_tx_chain_header_and_frame_split_over_descriptors_reach_the_tap_as_one_message(
    rig_factory: Callable[..., Rig], pair: tuple[int, socket.socket]
) -> None:
    rig = rig_factory()
    data = hdr() + frame(300)
    head = rig.tx.add_chain([data[:5], data[5:40], data[40:]])
    assert rig.engine.process_tx() is False
    assert pair[1].recv(70000) == data
    assert rig.tx.read_used() == [(head, 0)]  # §5.1.6.2: the device writes nothing into tx chains
    assert rig.metrics.tx_packets == 1 and rig.metrics.tx_bytes == 300


def test_tx_sends_every_queued_chain_in_order(rig_factory: Callable[..., Rig], pair: tuple[int, socket.socket]) -> None:
    rig = rig_factory()
    frames = [hdr() + frame(60 + i, seed=i) for i in range(5)]
    heads = [rig.tx.add_chain([f]) for f in frames]
    rig.engine.process_tx()
    assert [pair[1].recv(70000) for _ in frames] == frames
    assert [h for h, _ in rig.tx.read_used()] == heads


def test_tx_with_writable_descriptor_is_a_guest_error(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    rig.tx.add_chain([hdr() + frame(60), 16])
    with pytest.raises(TxChainWritable):
        rig.engine.process_tx()


def test_tx_shorter_than_the_header_is_a_guest_error(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    rig.tx.add_chain([b"\0" * (NET_HDR_SIZE - 1)])
    with pytest.raises(TxHeaderTooShort):
        rig.engine.process_tx()


@pytest.mark.parametrize(
    "header", [hdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM), hdr(gso=VIRTIO_NET_HDR_GSO_TCPV4), hdr(gso=0x42)]
)
def test_tx_header_asking_for_unnegotiated_offload_is_dropped_and_completed(
    rig_factory: Callable[..., Rig], pair: tuple[int, socket.socket], header: bytes
) -> None:
    rig = rig_factory()
    head = rig.tx.add_chain([header + frame(80)])
    rig.engine.process_tx()
    assert rig.tx.read_used() == [(head, 0)]
    assert rig.metrics.tx_bad_header == 1 and rig.metrics.tx_packets == 0
    assert not readable(pair[1].fileno())


def test_tx_header_with_negotiated_offload_passes_through_unchanged(
    rig_factory: Callable[..., Rig], pair: tuple[int, socket.socket]
) -> None:
    rig = rig_factory(MERGE | (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4))
    data = NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16, 0) + frame(200)
    rig.tx.add_chain([data])
    rig.engine.process_tx()
    assert pair[1].recv(70000) == data


def test_tx_waits_without_losing_the_chain_when_the_tap_is_full(
    rig_factory: Callable[..., Rig], pair: tuple[int, socket.socket]
) -> None:
    rig = rig_factory()
    big = hdr() + frame(60000)
    sent = 0
    # Fill the peer's receive queue until the device's writes would block.
    for _ in range(200):
        rig.tx.add_chain([big])
        rig.engine.process_tx()
        rig.tx.read_used()
        if rig.engine.tx_waiting_for_tap:
            break
        sent += 1
    assert rig.engine.tx_waiting_for_tap and rig.metrics.tx_waits == 1
    assert rig.tx.used_idx() == sent  # the blocked chain was not completed (and not dropped)
    for _ in range(sent):
        pair[1].recv(70000)
    rig.engine.process_tx()
    assert not rig.engine.tx_waiting_for_tap
    assert rig.tx.used_idx() == sent + 1
    assert pair[1].recv(70000) == big


# ------------------------------------------------------------------------------------------------------------ rx
def test_rx_frame_lands_in_one_chain_with_header_and_num_buffers_1(
    rig_factory: Callable[..., Rig], pair: tuple[int, socket.socket]
) -> None:
    rig = rig_factory()
    head = rig.rx.add_chain([2048])
    data = frame(500)
    pair[1].send(hdr(num_buffers=0x7777) + data)
    more, _empty = rig.engine.process_rx()
    assert not more
    assert rig.engine.rx_waiting_for_buffers  # the only buffer is used up: stop reading the tap
    used = rig.rx.read_used()
    assert used == [(head, NET_HDR_SIZE + 500)]
    got = rx_payload(rig, head)
    assert got[:NET_HDR_SIZE] == hdr(num_buffers=1)
    assert got[NET_HDR_SIZE : NET_HDR_SIZE + 500] == data
    assert got[NET_HDR_SIZE + 500 :] == bytes([POISON]) * (2048 - 512)  # nothing written past the frame


def test_rx_without_mergeable_buffers_sets_num_buffers_to_1(
    rig_factory: Callable[..., Rig], pair: tuple[int, socket.socket]
) -> None:
    rig = rig_factory(PLAIN)
    head = rig.rx.add_chain([1600])
    pair[1].send(hdr() + frame(100))
    rig.engine.process_rx()
    assert rx_payload(rig, head)[:NET_HDR_SIZE] == hdr(num_buffers=1)  # §5.1.6.4


def test_rx_mergeable_frame_spans_several_chains_and_num_buffers_counts_them(
    rig_factory: Callable[..., Rig], pair: tuple[int, socket.socket]
) -> None:
    rig = rig_factory()
    heads = [rig.rx.add_chain([64]) for _ in range(6)]
    data = frame(200)  # 212 bytes with the header: 4 chains of 64
    pair[1].send(hdr() + data)
    rig.engine.process_rx()
    used = rig.rx.read_used()
    assert used == [(heads[0], 64), (heads[1], 64), (heads[2], 64), (heads[3], 20)]
    first = rx_payload(rig, heads[0])
    assert first[:NET_HDR_SIZE] == hdr(num_buffers=4)
    joined = b"".join(rx_payload(rig, h) for h in heads[:4])[: NET_HDR_SIZE + 200]
    assert joined[NET_HDR_SIZE:] == data
    assert rig.metrics.rx_packets == 1 and rig.metrics.rx_buffers == 4


def test_rx_mergeable_chain_with_several_descriptors_is_filled_in_order(
    rig_factory: Callable[..., Rig], pair: tuple[int, socket.socket]
) -> None:
    rig = rig_factory()
    head = rig.rx.add_chain([5, 7, 100])  # the header itself straddles two descriptors
    pair[1].send(hdr() + frame(90))
    rig.engine.process_rx()
    assert rig.rx.read_used() == [(head, 102)]
    got = rx_payload(rig, head)
    assert got[:NET_HDR_SIZE] == hdr(num_buffers=1) and got[NET_HDR_SIZE:102] == frame(90)


def test_rx_with_no_buffers_leaves_the_frame_in_the_tap_until_buffers_arrive(
    rig_factory: Callable[..., Rig], pair: tuple[int, socket.socket]
) -> None:
    rig = rig_factory()
    pair[1].send(hdr() + frame(100))
    rig.engine.process_rx()
    assert rig.engine.rx_waiting_for_buffers
    assert readable(pair[0])  # not read, so not dropped: the kernel keeps it
    assert rig.rx.used_flags() == 0  # kicks re-enabled so the driver tells us about new buffers (§2.7.10)
    head = rig.rx.add_chain([256])
    rig.engine.process_rx()
    assert rig.rx.read_used() == [(head, NET_HDR_SIZE + 100)]
    assert not readable(pair[0])


def test_rx_mergeable_frame_is_not_published_until_all_its_buffers_are_there(
    rig_factory: Callable[..., Rig], pair: tuple[int, socket.socket]
) -> None:
    rig = rig_factory(event_idx=True)
    h1, h2 = rig.rx.add_chain([64]), rig.rx.add_chain([64])
    pair[1].send(hdr() + frame(150))  # 162 bytes: 3 chains
    rig.engine.process_rx()
    assert rig.engine.rx_waiting_for_buffers
    assert rig.rx.used_idx() == 0  # no partial packet is visible
    assert not readable(pair[0])  # the frame was taken into the device, waiting for one more buffer
    assert rig.rx.avail_event() == 2  # EVENT_IDX: the next published buffer must kick us
    h3 = rig.rx.add_chain([64])
    rig.engine.process_rx()
    assert rig.rx.read_used() == [(h1, 64), (h2, 64), (h3, 34)]
    assert rx_payload(rig, h1)[:NET_HDR_SIZE] == hdr(num_buffers=3)


def test_rx_frame_bigger_than_a_non_mergeable_buffer_is_dropped_and_the_buffer_reused(
    rig_factory: Callable[..., Rig], pair: tuple[int, socket.socket]
) -> None:
    rig = rig_factory(PLAIN)
    head = rig.rx.add_chain([128])
    pair[1].send(hdr() + frame(1000))
    pair[1].send(hdr() + frame(50))
    rig.engine.process_rx()
    assert rig.metrics.rx_too_big == 1
    assert rig.rx.read_used() == [(head, NET_HDR_SIZE + 50)]
    assert rx_payload(rig, head)[NET_HDR_SIZE : NET_HDR_SIZE + 50] == frame(50)


def test_rx_header_flags_are_zeroed_unless_guest_csum_was_negotiated(
    rig_factory: Callable[..., Rig], pair: tuple[int, socket.socket]
) -> None:
    rig = rig_factory()
    head = rig.rx.add_chain([256])
    pair[1].send(hdr(flags=VIRTIO_NET_HDR_F_DATA_VALID) + frame(60))
    rig.engine.process_rx()
    assert rx_payload(rig, head)[0] == 0  # §5.1.6.4: flags zero without GUEST_CSUM
    rig2 = rig_factory(MERGE | (1 << VIRTIO_NET_F_GUEST_CSUM))
    head2 = rig2.rx.add_chain([256])
    pair[1].send(hdr(flags=VIRTIO_NET_HDR_F_DATA_VALID) + frame(60))
    rig2.engine.process_rx()
    assert rx_payload(rig2, head2)[0] == VIRTIO_NET_HDR_F_DATA_VALID


def test_rx_budget_returns_more_when_frames_remain(
    rig_factory: Callable[..., Rig], pair: tuple[int, socket.socket]
) -> None:
    rig = rig_factory(size=128)
    rig.engine.budget = 3
    for _ in range(5):
        rig.rx.add_chain([256])
        pair[1].send(hdr() + frame(40))
    more, _ = rig.engine.process_rx()
    assert more and rig.rx.used_idx() == 3
    more, _empty = rig.engine.process_rx()
    assert not more and rig.rx.used_idx() == 5


def test_rx_chain_with_readable_descriptor_is_a_guest_error(
    rig_factory: Callable[..., Rig], pair: tuple[int, socket.socket]
) -> None:
    rig = rig_factory()
    rig.rx.add_chain([b"x" * 16, 256])
    pair[1].send(hdr() + frame(40))
    with pytest.raises(RxChainReadable):
        rig.engine.process_rx()


@pytest.mark.parametrize("features", [MERGE, PLAIN])
def test_rx_chain_smaller_than_the_header_is_a_guest_error(
    rig_factory: Callable[..., Rig], pair: tuple[int, socket.socket], features: int
) -> None:
    rig = rig_factory(features)
    rig.rx.add_chain([NET_HDR_SIZE - 1])
    pair[1].send(hdr() + frame(40))
    with pytest.raises(RxBufferTooSmall):
        rig.engine.process_rx()


def test_rx_short_message_without_a_header_is_skipped(
    rig_factory: Callable[..., Rig], pair: tuple[int, socket.socket]
) -> None:
    rig = rig_factory()
    head = rig.rx.add_chain([256])
    pair[1].send(b"tiny")
    pair[1].send(hdr() + frame(30))
    rig.engine.process_rx()
    assert rig.metrics.rx_read_errors == 1
    assert rig.rx.read_used() == [(head, NET_HDR_SIZE + 30)]


# ------------------------------------------------------------------------------------------- threaded device
class Live:
    def __init__(self, mem: GuestMemory, fd: int, features: int | None = None, engine: str | None = None) -> None:
        self.rx_kick, self.tx_kick, self.rx_call, self.tx_call = (
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)
        )
        self.rx = MockSplitQueue(mem, 64, base=0x1000, limit=0x400000, kick_fd=self.rx_kick, call_fd=self.rx_call)
        self.tx = MockSplitQueue(mem, 64, base=0x400000, index=1, kick_fd=self.tx_kick, call_fd=self.tx_call)
        self.health = FakeHealth()
        self.dev = Net(fd, MAC, engine=engine)
        self.dev.ack_features(self.dev.device_features() if features is None else features)
        self.dev.activate(mem, [self.rx.config(), self.tx.config()], self.health)

    def close(self) -> None:
        self.dev.reset()
        for fd in (self.rx_kick, self.tx_kick, self.rx_call, self.tx_call):
            os.close(fd)


@pytest.fixture
def live(mem: GuestMemory, pair: tuple[int, socket.socket], engine: str) -> Iterator[Live]:
    lv = Live(mem, pair[0], engine=engine)
    yield lv
    lv.close()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.002)


def test_live_tx_kick_sends_the_frame_and_interrupts(live: Live, pair: tuple[int, socket.socket]) -> None:
    data = hdr() + frame(123)
    head = live.tx.add_chain([data])
    live.tx.kick()
    assert pair[1].recv(70000) == data
    wait_for(lambda: live.tx.used_idx() == 1)
    assert live.tx.read_used() == [(head, 0)]
    assert os.eventfd_read(live.tx_call) >= 1


def test_live_rx_waits_for_a_kick_when_out_of_buffers_then_delivers(
    live: Live, pair: tuple[int, socket.socket]
) -> None:
    pair[1].send(hdr() + frame(77))
    wait_for(lambda: live.dev.metrics.rx_waits >= 1)
    time.sleep(0.05)
    assert readable(pair[0])  # still in the tap: no drop
    waits = live.dev.metrics.rx_waits
    assert waits == 1  # and no spinning while waiting
    head = live.rx.add_chain([512])
    live.rx.kick()
    wait_for(lambda: live.rx.used_idx() == 1)
    assert live.rx.read_used() == [(head, NET_HDR_SIZE + 77)]
    assert os.eventfd_read(live.rx_call) >= 1
    assert live.health.resets == []


def test_live_rx_streams_many_frames_through_recycled_buffers(live: Live, pair: tuple[int, socket.socket]) -> None:
    for _ in range(32):
        live.rx.add_chain([2048])
    live.rx.kick()
    got: list[bytes] = []

    def collect() -> int:
        used = live.rx.read_used()
        for head, n in used:
            got.append(rx_payload(live, head)[NET_HDR_SIZE:n])  # type: ignore[arg-type]
        return len(used)

    for i in range(200):
        pair[1].send(hdr() + frame(100 + i, seed=i))
        if i % 16 == 15:
            wait_for(lambda n=i + 1: live.dev.metrics.rx_packets == n)  # type: ignore[misc]
            for _ in range(collect()):
                live.rx.add_chain([2048])  # recycle: the driver refills what it consumed
            live.rx.kick()
    wait_for(lambda: live.dev.metrics.rx_packets == 200)
    collect()
    assert got == [frame(100 + i, seed=i) for i in range(200)]
    assert live.health.resets == []


def test_live_hostile_tx_chain_sets_needs_reset_and_the_thread_survives_reset(
    live: Live, pair: tuple[int, socket.socket], mem: GuestMemory
) -> None:
    live.tx.add_chain([b"\0" * 4])
    live.tx.kick()
    wait_for(lambda: bool(live.health.resets))
    assert "shorter than struct virtio_net_hdr" in live.health.resets[0]
    assert live.dev.metrics.guest_errors == 1
    live.dev.reset()  # joins the finished thread; a second reset is harmless
    live.dev.reset()


def test_live_descriptor_outside_guest_ram_on_rx_sets_needs_reset(live: Live, pair: tuple[int, socket.socket]) -> None:
    i = live.rx._free.pop()
    live.rx.write_desc(i, 0x7FFF_0000, 4096, VIRTQ_DESC_F_WRITE)
    live.rx.publish(i)
    pair[1].send(hdr() + frame(20))
    live.rx.kick()
    wait_for(lambda: bool(live.health.resets))
    assert live.dev.metrics.guest_errors == 1


def test_activate_without_the_tx_queue_sets_needs_reset(mem: GuestMemory, pair: tuple[int, socket.socket]) -> None:
    dev = Net(pair[0], MAC)
    health = FakeHealth()
    rx = MockSplitQueue(mem, 8)
    dev.activate(mem, [rx.config()], health)
    assert health.resets and "transmitq" in health.resets[0]
    assert dev.engine is None
    dev.reset()


def test_activate_with_oversized_queue_sets_needs_reset(mem: GuestMemory, pair: tuple[int, socket.socket]) -> None:
    dev = Net(pair[0], MAC, queue_size=8)
    health = FakeHealth()
    rx = MockSplitQueue(mem, 16, base=0x1000, limit=0x100000)
    tx = MockSplitQueue(mem, 8, base=0x100000, index=1)
    dev.activate(mem, [rx.config(), tx.config()], health)
    assert health.resets and "size 16" in health.resets[0]
    dev.reset()


def test_rx_mergeable_frame_too_big_for_the_whole_ring_is_dropped_and_the_chains_reused(
    rig_factory: Callable[..., Rig], pair: tuple[int, socket.socket]
) -> None:
    rig = rig_factory(size=4)
    heads = [rig.rx.add_chain([NET_HDR_SIZE + 4]) for _ in range(4)]
    pair[1].send(hdr() + frame(100))  # needs 25 chains of 16 bytes; the ring holds 4
    pair[1].send(hdr() + frame(10))
    rig.engine.process_rx()
    assert rig.metrics.rx_too_big == 1
    used = rig.rx.read_used()
    assert used == [(heads[0], 16), (heads[1], 6)]  # the next frame got the held chains
    assert rx_payload(rig, heads[0])[:NET_HDR_SIZE] == hdr(num_buffers=2)


# ----------------------------------------------------------------------------------------------------- fuzz
_desc = st.tuples(
    st.integers(0, 0x90_0000),  # addr: mostly inside 8 MiB of RAM, sometimes not
    st.integers(0, 5000),
    st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 4, 7]),
    st.integers(0, 20),
)


def _writable_buffer_over_rings(descs: list[tuple[int, int, int, int]], mocks: tuple[MockSplitQueue, ...]) -> bool:
    rings = []
    for m in mocks:
        rings += [(m.desc_table, desc_table_size(m.size)), (m.avail_ring, avail_ring_size(m.size)),
                  (m.used_ring, used_ring_size(m.size))]
    return any(fl & VIRTQ_DESC_F_WRITE and a < base + size and base < a + ln
               for a, ln, fl, _nx in descs for base, size in rings)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    descs=st.lists(_desc, min_size=1, max_size=16),
    heads=st.lists(st.integers(0, 17), min_size=1, max_size=6),
    frames=st.lists(st.integers(0, 3000), max_size=4),
    features=st.sampled_from([MERGE, PLAIN]),
)
def test_fuzz_arbitrary_rings_only_ever_raise_guest_errors(
    mem: GuestMemory,
    pair: tuple[int, socket.socket],
    descs: list[tuple[int, int, int, int]],
    heads: list[int],
    frames: list[int],
    features: int,
    engine: str,
) -> None:
    while readable(pair[0]):
        os.read(pair[0], 1 << 17)
    rig = Rig(mem, pair[0], features, engine=engine)
    try:
        for mock in (rig.rx, rig.tx):
            for i, (addr, ln, fl, nx) in enumerate(descs):
                mock.write_desc(i, addr, ln, fl, nx)
            mock.publish(*heads)
        for n in frames:
            pair[1].send(hdr() + frame(n))
        for step in (rig.engine.process_tx, rig.engine.process_rx):
            try:
                step()
            except (VirtqueueError, GuestMemoryError):
                pass
        # Whatever was completed is well-formed (ids are heads, rx lengths within chains) — unless the "driver"
        # pointed a device-writable buffer into its own rings: then the device's frame bytes legitimately land on
        # them, and the guest has only hurt itself.
        if not _writable_buffer_over_rings(descs, (rig.rx, rig.tx)):
            for mock in (rig.rx, rig.tx):
                for head, n in mock.read_used():
                    assert 0 <= head < 16 and n <= 16 * 5000
    finally:
        rig.close()
        while readable(pair[1].fileno()):
            pair[1].recv(1 << 17)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(64, 700), min_size=1, max_size=12),
    frames=st.lists(st.integers(14, 3000), min_size=1, max_size=5),
)
def test_fuzz_mergeable_rx_reassembles_every_frame_exactly(
    mem: GuestMemory, pair: tuple[int, socket.socket], sizes: list[int], frames: list[int], engine: str
) -> None:
    rig = Rig(mem, pair[0], MERGE, size=64, engine=engine)
    try:
        sent = [frame(n, seed=n) for n in frames]
        for f in sent:
            pair[1].send(hdr() + f)
        got: list[bytes] = []
        pending: list[tuple[int, int]] = []
        for _round in range(200):
            if len(rig.rx._free) >= len(sizes):
                for s in sizes:
                    rig.rx.add_chain([s])
            rig.engine.process_rx()
            pending += rig.rx.read_used()
            while pending:
                first_head = pending[0][0]
                nb = struct.unpack_from("<H", rx_payload(rig, first_head), 10)[0]
                if len(pending) < nb:
                    break  # §5.1.6.3.2: num_buffers chains make one packet
                parts = pending[:nb]
                del pending[:nb]
                blob = b"".join(rx_payload(rig, h)[:n] for h, n in parts)
                got.append(blob[NET_HDR_SIZE:])
            if len(got) == len(sent):
                break
        assert got == sent
        assert not pending
    finally:
        rig.close()
