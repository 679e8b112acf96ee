"""pv.vhost_user.backend driven by a Python mini-front-end over a socketpair (memfd guest RAM, mock rings).

Each test plays QEMU's part: handshake, memory table, rings laid out by MockSplitQueue, then virtio-blk requests
kicked through the eventfds the back-end was given. Negative tests cover every check of the session.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from kvmcore.memory import GuestMemory
from pv.blk import VIRTIO_BLK_F_RO, Block
from pv.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from pv.testing import MockSplitQueue, make_guest_memory
from pv.vhost_user import protocol as P
from pv.vhost_user.backend import VhostUserServer, bind_listener
from pv.vhost_user.testing import BackendThread, ConnectionClosed, MiniFrontend

R = P.Request
IMAGE_SIZE = 1 << 20
_REQ = struct.Struct("<IIQ")


def _open_fds() -> set[int]:
    listed = {int(n) for n in os.listdir("/proc/self/fd")}
    out = set()
    for fd in listed:  # drop the directory fd listdir itself used (closed by now)
        try:
            os.fstat(fd)
        except OSError:
            continue
        out.add(fd)
    return out


def _wait(pred: object, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.005)
    return False


def _readable(fd: int, timeout: float = 3.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


@pytest.fixture
def image() -> Iterator[int]:
    with tempfile.TemporaryFile() as f:
        f.truncate(IMAGE_SIZE)
        yield os.dup(f.fileno())


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = make_guest_memory()
    yield m
    m.close()


@pytest.fixture
def backend(image: int, mem: GuestMemory) -> Iterator[BackendThread]:
    bt = BackendThread(Block(image, num_queues=2, queue_size=64), mem, max_memory=64 << 20)
    yield bt
    bt.close()
    os.close(image)


@pytest.fixture
def fe(backend: BackendThread) -> MiniFrontend:
    return backend.frontend


def _ring(fe: MiniFrontend, index: int = 0, size: int = 16, **kw: object) -> MockSplitQueue:
    base = 0x1000 + index * 0x40000
    return MockSplitQueue(fe.mem, size, base=base, limit=base + 0x40000, index=index, seed=index,
                          kick_fd=fe.eventfd(), call_fd=fe.eventfd(), **kw)  # type: ignore[arg-type]


def _write(q: MockSplitQueue, sector: int, data: bytes) -> int:
    return q.add_chain([_REQ.pack(1, 0, sector), data, 1])


def _read(q: MockSplitQueue, sector: int, n: int) -> int:
    return q.add_chain([_REQ.pack(0, 0, sector), n, 1])


def _completed(q: MockSplitQueue, n: int = 1) -> list[tuple[int, int]]:
    assert _wait(lambda: q.used_idx() == (q.last_used + n) & 0xFFFF), "request not completed"
    return q.read_used()


def _expect_dropped(backend: BackendThread) -> None:
    assert backend.frontend.is_closed(), "back-end kept a connection it should have dropped"
    backend.join()


# ------------------------------------------------------------------------------------------------ negotiation
def test_get_features_offers_protocol_features_version_1_event_idx_indirect_and_the_device_bits(
    fe: MiniFrontend, backend: BackendThread
) -> None:
    f = fe.get_u64(R.GET_FEATURES)
    for bit in (P.VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC):
        assert f & (1 << bit)
    assert f & backend.session.device.device_features() == backend.session.device.device_features()


def test_blk_offers_mq_reply_ack_config_and_reset_device_protocol_features(fe: MiniFrontend) -> None:
    pf = fe.get_u64(R.GET_PROTOCOL_FEATURES)
    for bit in (P.ProtocolFeature.MQ, P.ProtocolFeature.REPLY_ACK, P.ProtocolFeature.CONFIG,
                P.ProtocolFeature.RESET_DEVICE):
        assert pf & (1 << bit)
    assert not pf & (1 << P.ProtocolFeature.LOG_SHMFD)


def test_get_queue_num_reports_the_blk_queue_count(fe: MiniFrontend) -> None:
    fe.handshake()
    assert fe.get_u64(R.GET_QUEUE_NUM) == 2


def test_get_queue_num_without_mq_negotiated_drops_the_connection(fe: MiniFrontend, backend: BackendThread) -> None:
    fe.send(R.GET_QUEUE_NUM)
    _expect_dropped(backend)


def test_set_features_acks_the_device_features_without_the_protocol_bit(fe: MiniFrontend,
                                                                       backend: BackendThread) -> None:
    feats = fe.handshake()
    assert fe.ack(R.SET_FEATURES, fe.u64(feats)) == 0
    assert backend.session.device.acked_features == feats & ~(1 << P.VHOST_USER_F_PROTOCOL_FEATURES)


def test_set_features_with_bits_not_offered_fails_the_reply_ack(fe: MiniFrontend) -> None:
    fe.handshake()
    assert fe.ack(R.SET_FEATURES, fe.u64(1 << VIRTIO_F_VERSION_1 | 1 << 63)) != 0
    assert fe.get_u64(R.GET_FEATURES)  # connection still serves


def test_set_features_without_version_1_is_rejected(fe: MiniFrontend) -> None:
    fe.handshake()
    assert fe.ack(R.SET_FEATURES, fe.u64(1 << P.VHOST_USER_F_PROTOCOL_FEATURES)) != 0


def test_set_protocol_features_with_bits_not_offered_drops_the_connection(fe: MiniFrontend,
                                                                          backend: BackendThread) -> None:
    fe.send(R.SET_PROTOCOL_FEATURES, fe.u64(1 << P.ProtocolFeature.PAGEFAULT))
    _expect_dropped(backend)


def test_reply_ack_answers_zero_for_a_request_that_succeeds(fe: MiniFrontend) -> None:
    fe.handshake()
    assert fe.ack(R.SET_OWNER) == 0


def test_requests_with_a_reply_get_no_extra_ack_even_with_need_reply(fe: MiniFrontend) -> None:
    fe.handshake()
    r = fe.call(R.GET_FEATURES, need_reply=True)
    assert len(r.payload) == 8 and r.flags & P.FLAG_REPLY
    fe.send(R.SET_OWNER, need_reply=True)
    assert struct.unpack("=Q", fe.recv_reply().payload) == (0,)  # the next reply is SET_OWNER's, not a stray


def test_unknown_request_fails_the_ack_and_the_connection_goes_on(fe: MiniFrontend) -> None:
    fe.handshake()
    assert fe.ack(200) != 0
    assert fe.ack(R.SET_LOG_BASE, fe.u64(0)) != 0  # known but not supported (no LOG_SHMFD)
    assert fe.ack(R.SET_OWNER) == 0


def test_unknown_request_without_need_reply_drops_the_connection(fe: MiniFrontend, backend: BackendThread) -> None:
    fe.send(200)
    _expect_dropped(backend)


def test_malformed_header_drops_the_connection(fe: MiniFrontend, backend: BackendThread) -> None:
    fe.send(R.SET_OWNER, flags=0)  # version 0
    _expect_dropped(backend)
    assert backend.session.stats.errors == 1


def test_oversized_payload_drops_the_connection(fe: MiniFrontend, backend: BackendThread) -> None:
    fe.sock.sendall(P.HEADER.pack(R.SET_MEM_TABLE, 1, 1 << 20))
    _expect_dropped(backend)


def test_wrong_payload_size_fails_the_ack(fe: MiniFrontend) -> None:
    fe.handshake()
    assert fe.ack(R.SET_VRING_NUM, b"\0" * 4) != 0


def test_fds_on_a_request_that_takes_none_fail_the_ack_and_are_closed(fe: MiniFrontend,
                                                                     backend: BackendThread) -> None:
    fe.handshake()
    before = _open_fds()
    assert fe.ack(R.SET_OWNER, b"", (fe.eventfd(),)) != 0
    assert _open_fds() - before == {fe.eventfds[-1]}  # the back-end closed its copy


# ------------------------------------------------------------------------------------------------ memory table
def _bad_table(fe: MiniFrontend, regions: list[tuple[int, int, int, int]], fds: list[int]) -> int:
    return fe.ack(R.SET_MEM_TABLE, P.pack_mem_table([P.MemoryRegion(*r) for r in regions]), fds)


def test_mem_table_with_an_eventfd_instead_of_memory_is_rejected(fe: MiniFrontend) -> None:
    fe.handshake()
    assert _bad_table(fe, [(0, 0x1000, 0x10000, 0)], [fe.eventfd()]) != 0


def test_mem_table_region_beyond_the_end_of_its_file_is_rejected(fe: MiniFrontend, mem: GuestMemory) -> None:
    fe.handshake()
    s = mem.slots()[0]
    assert _bad_table(fe, [(0, mem.size + 0x1000, 0x10000, 0)], [s.fd]) != 0
    assert _bad_table(fe, [(0, 0x1000, 0x10000, 1 << 40)], [s.fd]) != 0


def test_mem_table_with_unaligned_region_is_rejected(fe: MiniFrontend, mem: GuestMemory) -> None:
    fe.handshake()
    fd = mem.slots()[0].fd
    assert _bad_table(fe, [(0x800, 0x1000, 0x10000, 0)], [fd]) != 0
    assert _bad_table(fe, [(0, 0x1000, 0x10800, 0)], [fd]) != 0


def test_mem_table_larger_than_the_memory_limit_is_rejected(fe: MiniFrontend) -> None:
    fe.handshake()
    big = os.memfd_create("big", os.MFD_CLOEXEC)
    try:
        os.ftruncate(big, 128 << 20)  # sparse; the session's limit is 64 MiB
        assert _bad_table(fe, [(0, 128 << 20, 0x10000000, 0)], [big]) != 0
    finally:
        os.close(big)


def test_mem_table_with_overlapping_regions_is_rejected(fe: MiniFrontend, mem: GuestMemory) -> None:
    fe.handshake()
    fd = mem.slots()[0].fd
    assert _bad_table(fe, [(0, 0x2000, 0x10000, 0), (0x1000, 0x1000, 0x20000, 0)], [fd, fd]) != 0


def test_rejected_mem_table_keeps_the_previous_one(fe: MiniFrontend, backend: BackendThread) -> None:
    fe.handshake()
    table = backend.session.table
    assert _bad_table(fe, [(0, 0x1000, 0x10000, 0)], [fe.eventfd()]) != 0
    assert backend.session.table is table and table is not None and table.mem is not None


# ------------------------------------------------------------------------------------------------ rings
def test_blk_write_through_the_backend_lands_in_the_image_and_signals_call(fe: MiniFrontend, image: int) -> None:
    fe.handshake()
    q = _ring(fe)
    fe.setup_ring(q)
    head = _write(q, 3, b"\x5a" * 1024)
    q.kick()
    assert _completed(q) == [(head, 1)]
    assert os.pread(image, 1024, 3 * 512) == b"\x5a" * 1024
    assert _readable(q.call_fd) and os.eventfd_read(q.call_fd) >= 1
    assert q.read_buffer(q.buffers(head)[-1]) == b"\0"  # VIRTIO_BLK_S_OK


def test_blk_read_through_the_backend_returns_image_data(fe: MiniFrontend, image: int) -> None:
    os.pwrite(image, b"hello vhost-user".ljust(512, b"."), 512)
    fe.handshake()
    q = _ring(fe, event_idx=True)
    fe.setup_ring(q)
    head = _read(q, 1, 512)
    q.kick()
    assert _completed(q) == [(head, 513)]
    assert q.read_buffer(q.buffers(head)[1]).startswith(b"hello vhost-user")


def test_two_rings_are_served_independently(fe: MiniFrontend, image: int) -> None:
    fe.handshake()
    q0, q1 = _ring(fe, 0), _ring(fe, 1)
    fe.setup_ring(q0)
    fe.setup_ring(q1)
    _write(q0, 0, b"\x01" * 512)
    _write(q1, 1, b"\x02" * 512)
    q0.kick()
    q1.kick()
    _completed(q0)
    _completed(q1)
    assert os.pread(image, 1024, 0) == b"\x01" * 512 + b"\x02" * 512


def test_ring_with_protocol_features_is_not_served_until_enabled(fe: MiniFrontend) -> None:
    fe.handshake()
    q = _ring(fe)
    fe.setup_ring(q, enable=False)
    _write(q, 0, b"x" * 512)
    q.kick()
    time.sleep(0.2)
    assert q.used_idx() == 0
    assert fe.ack(R.SET_VRING_ENABLE, P.VringState(0, 1).pack()) == 0
    _completed(q)


def test_disabling_a_ring_stops_serving_it(fe: MiniFrontend) -> None:
    fe.handshake()
    q = _ring(fe)
    fe.setup_ring(q)
    assert fe.ack(R.SET_VRING_ENABLE, P.VringState(0, 0).pack()) == 0
    _write(q, 0, b"x" * 512)
    q.kick()
    time.sleep(0.2)
    assert q.used_idx() == 0


def test_without_protocol_features_a_ring_starts_enabled_on_its_kick_fd(fe: MiniFrontend) -> None:
    fe.handshake(protocol_features=False)
    q = _ring(fe)
    fe.setup_ring(q, enable=False)
    _write(q, 0, b"x" * 512)
    q.kick()
    _completed(q)


def test_set_vring_enable_without_protocol_features_drops_the_connection(fe: MiniFrontend,
                                                                        backend: BackendThread) -> None:
    fe.handshake(protocol_features=False)
    fe.send(R.SET_VRING_ENABLE, P.VringState(0, 1).pack())
    _expect_dropped(backend)


def test_get_vring_base_stops_the_ring_and_returns_last_avail_idx(fe: MiniFrontend) -> None:
    fe.handshake()
    q = _ring(fe)
    fe.setup_ring(q)
    for i in range(3):
        _write(q, i, b"y" * 512)
    q.kick()
    _completed(q, 3)
    assert fe.get_vring_base(0) == 3
    _write(q, 5, b"z" * 512)
    os.eventfd_write(q.kick_fd, 1)
    time.sleep(0.2)
    assert q.used_idx() == 3  # stopped: "the back-end must not process the ring at all"


def test_ring_restarted_with_set_vring_base_resumes_at_that_index(fe: MiniFrontend, image: int) -> None:
    fe.handshake()
    q = _ring(fe)
    fe.setup_ring(q)
    _write(q, 0, b"a" * 512)
    q.kick()
    _completed(q)
    base = fe.get_vring_base(0)
    _write(q, 1, b"b" * 512)  # published while the ring is stopped
    q.kick_fd, q.call_fd = fe.eventfd(), fe.eventfd()  # the old fds were given to (and closed by) the back-end
    fe.setup_ring(q, base=base)
    _completed(q)
    assert os.pread(image, 512, 512) == b"b" * 512
    assert fe.get_vring_base(0) == 2


def test_set_vring_base_beyond_a_u16_fails(fe: MiniFrontend) -> None:
    fe.handshake()
    assert fe.ack(R.SET_VRING_BASE, P.VringState(0, 0x10000).pack()) != 0


def test_call_fd_replaced_on_a_running_ring_is_the_one_signalled(fe: MiniFrontend) -> None:
    fe.handshake()
    q = _ring(fe)
    fe.setup_ring(q)
    new_call = fe.eventfd()
    assert fe.ack(R.SET_VRING_CALL, fe.u64(0), (new_call,)) == 0
    _write(q, 0, b"c" * 512)
    q.kick()
    _completed(q)
    assert _readable(new_call)
    assert not _readable(q.call_fd, 0.05)


def test_call_fd_with_nofd_flag_serves_without_interrupts(fe: MiniFrontend) -> None:
    fe.handshake()
    q = _ring(fe)
    fe.setup_ring(q)
    assert fe.ack(R.SET_VRING_CALL, fe.u64(P.VRING_NOFD_MASK)) == 0
    _write(q, 0, b"c" * 512)
    q.kick()
    _completed(q)


def test_kick_without_fd_polling_mode_is_rejected(fe: MiniFrontend) -> None:
    fe.handshake()
    assert fe.ack(R.SET_VRING_KICK, fe.u64(P.VRING_NOFD_MASK)) != 0


def test_kick_fd_that_is_not_an_eventfd_is_rejected_and_closed(fe: MiniFrontend, backend: BackendThread) -> None:
    fe.handshake()
    memfd = os.memfd_create("not-an-eventfd", os.MFD_CLOEXEC)
    try:
        assert fe.ack(R.SET_VRING_KICK, fe.u64(0), (memfd,)) != 0
        assert backend.session.vrings[0].kick_fd == -1
    finally:
        os.close(memfd)


@pytest.mark.parametrize("req", [R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ENABLE])
def test_vring_index_beyond_the_device_queues_is_rejected(fe: MiniFrontend, req: R) -> None:
    fe.handshake()
    assert fe.ack(req, P.VringState(2, 1).pack()) != 0


def test_vring_fd_index_beyond_the_device_queues_is_rejected(fe: MiniFrontend) -> None:
    fe.handshake()
    assert fe.ack(R.SET_VRING_CALL, fe.u64(5), (fe.eventfd(),)) != 0


@pytest.mark.parametrize("num", [0, 3, 128, 1 << 16])
def test_vring_num_must_be_a_power_of_two_up_to_the_device_maximum(fe: MiniFrontend, num: int) -> None:
    fe.handshake()
    assert fe.ack(R.SET_VRING_NUM, P.VringState(0, num).pack()) != 0  # device max is 64


def test_vring_addr_before_the_memory_table_is_rejected(fe: MiniFrontend) -> None:
    fe.get_u64(R.GET_FEATURES)
    fe.send(R.SET_PROTOCOL_FEATURES, fe.u64(fe.get_u64(R.GET_PROTOCOL_FEATURES)))
    assert fe.ack(R.SET_VRING_ADDR, P.VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0).pack()) != 0


@pytest.mark.parametrize("part", ["desc", "used", "avail"])
def test_vring_addr_outside_the_memory_table_is_rejected(fe: MiniFrontend, part: str) -> None:
    fe.handshake()
    fe.send(R.SET_VRING_NUM, P.VringState(0, 16).pack())
    good = {"desc": fe.uva(0x1000), "used": fe.uva(0x3000), "avail": fe.uva(0x2000)}
    good[part] = fe.uva(0x100000 + 0x1000)  # the hole between the two RAM regions
    addr = P.VringAddr(0, 0, good["desc"], good["used"], good["avail"], 0)
    assert fe.ack(R.SET_VRING_ADDR, addr.pack()) != 0
    # A ring that starts inside but runs past the end of its region is refused as well.
    end = fe.uva(0x100000 - 8)
    assert fe.ack(R.SET_VRING_ADDR, P.VringAddr(0, 0, end, good["used"], good["avail"], 0).pack()) != 0


def test_vring_addr_given_as_guest_address_not_user_address_is_rejected(fe: MiniFrontend) -> None:
    fe.handshake()
    assert fe.ack(R.SET_VRING_ADDR, P.VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0).pack()) != 0


def test_vring_addr_with_dirty_log_flag_is_rejected(fe: MiniFrontend) -> None:
    fe.handshake()
    addr = P.VringAddr(0, P.VHOST_VRING_F_LOG, fe.uva(0x1000), fe.uva(0x3000), fe.uva(0x2000), 0)
    assert fe.ack(R.SET_VRING_ADDR, addr.pack()) != 0


def test_guest_error_on_a_ring_signals_the_err_eventfd(fe: MiniFrontend, backend: BackendThread) -> None:
    fe.handshake()
    q = _ring(fe)
    err = fe.eventfd()
    assert fe.ack(R.SET_VRING_ERR, fe.u64(0), (err,)) == 0
    fe.setup_ring(q)
    q.write_desc(0, 0x100000 + 0x1000, 512, 0)  # buffer in the unbacked hole
    q.publish(0)
    q.kick()
    assert _readable(err)
    assert backend.session.stats.needs_reset


def test_ring_whose_table_moves_away_under_it_stays_stopped_and_signals_err(fe: MiniFrontend,
                                                                            backend: BackendThread) -> None:
    fe.handshake()
    q = _ring(fe)
    err = fe.eventfd()
    fe.send(R.SET_VRING_ERR, fe.u64(0), (err,))
    fe.setup_ring(q)
    fe.uva_base += 1 << 30  # same RAM announced at other user addresses: the ring no longer translates
    payload, fds = fe.mem_table()
    assert fe.ack(R.SET_MEM_TABLE, payload, fds) == 0
    assert _readable(err)
    assert not backend.session.vrings[0].started


# ------------------------------------------------------------------------------------------------ config / reset
def test_get_config_returns_the_block_config_space(fe: MiniFrontend, backend: BackendThread) -> None:
    fe.handshake()
    r = fe.call(R.GET_CONFIG, P.ConfigPayload(0, 60, 0, bytes(60)).pack())
    cfg = P.parse_config(P.Message(R.GET_CONFIG, 1, r.payload))
    assert cfg.size == 60 and struct.unpack_from("<Q", cfg.data)[0] == IMAGE_SIZE // 512
    expect = bytearray(60)
    backend.session.device.read_config(0, memoryview(expect))
    assert cfg.data == bytes(expect)


def test_get_config_with_a_bad_range_answers_an_empty_payload(fe: MiniFrontend) -> None:
    fe.handshake()
    r = fe.call(R.GET_CONFIG, P.ConfigPayload(250, 8, 0, bytes(8)).pack())
    assert r.payload == b""
    assert fe.get_u64(R.GET_FEATURES)


def test_set_config_changing_a_read_only_field_is_rejected(fe: MiniFrontend) -> None:
    fe.handshake()
    assert fe.ack(R.SET_CONFIG, P.ConfigPayload(0, 8, 0, struct.pack("<Q", 1)).pack()) != 0


def test_reset_device_stops_rings_and_forgets_features(fe: MiniFrontend, backend: BackendThread) -> None:
    fe.handshake()
    q = _ring(fe)
    fe.setup_ring(q)
    assert fe.ack(R.RESET_DEVICE) == 0
    assert backend.session.acked_features == 0 and not backend.session._running
    _write(q, 0, b"r" * 512)
    os.eventfd_write(q.kick_fd, 1)
    time.sleep(0.1)
    assert q.used_idx() == 0


def test_reset_device_without_the_protocol_feature_is_rejected(fe: MiniFrontend, backend: BackendThread) -> None:
    fe.handshake(protocol_features=False)
    fe.send(R.RESET_DEVICE)
    _expect_dropped(backend)


def test_read_only_image_offers_ro_and_fails_writes(mem: GuestMemory, image: int) -> None:
    bt = BackendThread(Block(image, read_only=True), mem)
    try:
        fe = bt.frontend
        assert fe.get_u64(R.GET_FEATURES) & (1 << VIRTIO_BLK_F_RO)
        fe.handshake()
        q = _ring(fe)
        fe.setup_ring(q)
        head = _write(q, 0, b"w" * 512)
        q.kick()
        _completed(q)
        assert q.read_buffer(q.buffers(head)[-1]) == b"\x01"  # VIRTIO_BLK_S_IOERR
        assert os.pread(image, 512, 0) == bytes(512)
    finally:
        bt.close()


# ------------------------------------------------------------------------------------------------ lifecycle
def test_disconnect_stops_the_device_and_closes_every_received_fd(mem: GuestMemory, image: int) -> None:
    before = _open_fds()
    bt = BackendThread(Block(image), mem)
    fe = bt.frontend
    fe.handshake()
    q = _ring(fe)
    fe.setup_ring(q)
    fe.send(R.SET_VRING_ERR, fe.u64(0), (fe.eventfd(),))
    _write(q, 0, b"d" * 512)
    q.kick()
    _completed(q)
    dev = bt.session.device
    bt.close()
    assert bt.result == "eof"
    assert getattr(dev, "worker", None) is None
    assert _wait(lambda: _open_fds() <= before), f"leaked fds: {_open_fds() - before}"


def test_server_keeps_serving_the_next_frontend_after_dropping_a_bad_one(tmp_path: object, image: int,
                                                                         mem: GuestMemory) -> None:
    path = os.path.join(str(tmp_path), "blk.sock")
    listener = bind_listener(path)
    server = VhostUserServer(listener, Block(image))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        bad = socket.socket(socket.AF_UNIX)
        bad.connect(path)
        bad.sendall(b"\xff" * 12)  # garbage header
        assert bad.recv(1) == b""
        bad.close()
        good = socket.socket(socket.AF_UNIX)
        good.connect(path)
        fe = MiniFrontend(good, mem)
        fe.handshake()
        q = _ring(fe)
        fe.setup_ring(q)
        _write(q, 0, b"s" * 512)
        q.kick()
        _completed(q)
        fe.close()
        assert _wait(lambda: server.connections == 2)
    finally:
        server.stop()
        t.join(5)
        listener.close()
    assert not t.is_alive()


def test_bind_listener_refuses_to_replace_a_regular_file(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "not-a-socket")
    open(path, "w").close()
    with pytest.raises(FileExistsError):
        bind_listener(path)


def test_frontend_closing_mid_message_ends_the_session(fe: MiniFrontend, backend: BackendThread) -> None:
    fe.sock.sendall(P.HEADER.pack(R.SET_FEATURES, 1, 8) + b"\0\0")
    fe.sock.shutdown(socket.SHUT_WR)
    assert backend.join() == "eof"
    with pytest.raises(ConnectionClosed):
        fe.recv_reply()
