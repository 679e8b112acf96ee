"""pv.vhost_user.protocol: framing, fd accounting and payload validation (QEMU docs/interop/vhost-user.rst)."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from pv.vhost_user import protocol as P
from pv.vhost_user.backend import recv_with_fds, send_with_fds


def _hdr(request: int, size: int, flags: int = P.VHOST_USER_VERSION) -> bytes:
    return P.HEADER.pack(request, flags, size)


def _fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def efds() -> list[int]:
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(10)]
    yield fds
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------ framing
def test_header_is_12_bytes_native_order_request_flags_size() -> None:
    msg = P.Message(P.Request.SET_FEATURES, P.VHOST_USER_VERSION, struct.pack("=Q", 5))
    raw = P.encode(msg)
    assert len(raw) == 12 + 8
    assert struct.unpack("=III", raw[:12]) == (2, 1, 8)


def test_decoder_reassembles_a_message_delivered_one_byte_at_a_time() -> None:
    d = P.Decoder()
    raw = P.encode(P.Message(P.Request.SET_VRING_NUM, 1, P.VringState(0, 256).pack()))
    for i, b in enumerate(raw):
        assert d.next_message() is None or i == len(raw)
        d.feed(bytes([b]))
    msg = d.next_message()
    assert msg is not None and msg.request == P.Request.SET_VRING_NUM
    assert P.parse_state(msg) == P.VringState(0, 256)
    assert d.next_message() is None and d.buffered == 0


def test_decoder_splits_back_to_back_messages_and_wanted_counts_down() -> None:
    d = P.Decoder()
    assert d.wanted() == 12
    d.feed(_hdr(P.Request.SET_OWNER, 0) + _hdr(P.Request.SET_FEATURES, 8)[:5])
    first = d.next_message()
    assert first is not None and first.request == P.Request.SET_OWNER
    assert d.next_message() is None
    assert d.wanted() == 7
    d.feed(_hdr(P.Request.SET_FEATURES, 8)[5:])
    assert d.wanted() == 8
    d.feed(struct.pack("=Q", 1))
    second = d.next_message()
    assert second is not None and P.parse_u64(second) == 1


def test_decoder_attaches_fds_that_came_with_the_header(efds: list[int]) -> None:
    d = P.Decoder()
    d.feed(_hdr(P.Request.SET_VRING_KICK, 8), [efds[0]])
    d.feed(struct.pack("=Q", 0))
    msg = d.next_message()
    assert msg is not None and msg.fds == [efds[0]]


@pytest.mark.parametrize("flags", [0, 2, 3], ids=["version0", "version2", "version3"])
def test_header_with_a_version_other_than_1_is_fatal(flags: int) -> None:
    d = P.Decoder()
    d.feed(_hdr(P.Request.SET_OWNER, 0, flags))
    with pytest.raises(P.MalformedHeader) as e:
        d.next_message()
    assert e.value.fatal


def test_request_carrying_the_reply_flag_is_fatal() -> None:
    d = P.Decoder()
    d.feed(_hdr(P.Request.SET_OWNER, 0, 1 | P.FLAG_REPLY))
    with pytest.raises(P.MalformedHeader):
        d.next_message()


def test_header_with_undefined_flag_bits_is_fatal() -> None:
    d = P.Decoder()
    d.feed(_hdr(P.Request.SET_OWNER, 0, 1 | 0x10))
    with pytest.raises(P.MalformedHeader):
        d.next_message()


def test_decoder_refuses_to_continue_after_a_fatal_error() -> None:
    d = P.Decoder()
    d.feed(_hdr(P.Request.SET_OWNER, 0, 0))
    with pytest.raises(P.MalformedHeader):
        d.next_message()
    with pytest.raises(P.MalformedHeader):
        d.feed(_hdr(P.Request.SET_OWNER, 0))


def test_payload_size_above_the_largest_request_is_fatal_before_buffering_it() -> None:
    d = P.Decoder()
    d.feed(_hdr(P.Request.SET_MEM_TABLE, P.MAX_PAYLOAD + 1))
    assert d.wanted() <= P.MAX_PAYLOAD
    with pytest.raises(P.PayloadTooLarge) as e:
        d.next_message()
    assert e.value.fatal


def test_fds_arriving_mid_message_are_fatal_and_closed(efds: list[int]) -> None:
    d = P.Decoder()
    d.feed(_hdr(P.Request.SET_VRING_KICK, 8), [efds[0]])
    with pytest.raises(P.StrayFds):
        d.feed(b"\0" * 8, [efds[1]])
    assert not _fd_is_open(efds[0]) and not _fd_is_open(efds[1])


def test_more_fds_than_any_request_carries_is_fatal_and_closes_them(efds: list[int]) -> None:
    d = P.Decoder()
    with pytest.raises(P.TooManyFds):
        d.feed(_hdr(P.Request.SET_MEM_TABLE, 8), efds[:9])
    assert not any(_fd_is_open(fd) for fd in efds[:9])


def test_decoder_close_closes_fds_of_an_incomplete_message(efds: list[int]) -> None:
    d = P.Decoder()
    d.feed(_hdr(P.Request.SET_VRING_CALL, 8), [efds[0]])
    d.close()
    assert not _fd_is_open(efds[0])


# ------------------------------------------------------------------------------------------------ payloads
def _msg(request: int, payload: bytes = b"", fds: list[int] | None = None) -> P.Message:
    return P.Message(request, P.VHOST_USER_VERSION, payload, list(fds or []))


def test_empty_requests_take_no_payload_and_no_fds(efds: list[int]) -> None:
    P.parse_empty(_msg(P.Request.GET_FEATURES))
    with pytest.raises(P.BadPayloadSize):
        P.parse_empty(_msg(P.Request.GET_FEATURES, b"\0" * 8))
    with pytest.raises(P.BadFdCount):
        P.parse_empty(_msg(P.Request.SET_OWNER, b"", [efds[0]]))


def test_u64_payload_must_be_exactly_8_bytes() -> None:
    assert P.parse_u64(_msg(P.Request.SET_FEATURES, struct.pack("=Q", 1 << 32))) == 1 << 32
    for n in (0, 4, 16):
        with pytest.raises(P.BadPayloadSize):
            P.parse_u64(_msg(P.Request.SET_FEATURES, b"\0" * n))


def test_vring_state_is_index_and_num() -> None:
    assert P.parse_state(_msg(P.Request.SET_VRING_BASE, struct.pack("=II", 1, 7))) == P.VringState(1, 7)
    with pytest.raises(P.BadPayloadSize):
        P.parse_state(_msg(P.Request.SET_VRING_BASE, b"\0" * 4))


def test_vring_addr_roundtrips_and_rejects_unknown_flags() -> None:
    a = P.VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0)
    assert P.parse_vring_addr(_msg(P.Request.SET_VRING_ADDR, a.pack())) == a
    with pytest.raises(P.InvalidValue):
        P.parse_vring_addr(_msg(P.Request.SET_VRING_ADDR, P.VringAddr(0, 2, 0, 0, 0, 0).pack()))
    with pytest.raises(P.BadPayloadSize):
        P.parse_vring_addr(_msg(P.Request.SET_VRING_ADDR, a.pack()[:32]))


def test_vring_file_takes_the_fd_and_honours_the_nofd_bit(efds: list[int]) -> None:
    m = _msg(P.Request.SET_VRING_KICK, struct.pack("=Q", 3), [efds[0]])
    assert P.parse_vring_file(m) == P.VringFile(3, efds[0]) and m.fds == []
    m = _msg(P.Request.SET_VRING_CALL, struct.pack("=Q", 3 | P.VRING_NOFD_MASK))
    assert P.parse_vring_file(m) == P.VringFile(3, -1)


def test_vring_file_fd_count_must_match_the_nofd_bit(efds: list[int]) -> None:
    with pytest.raises(P.BadFdCount):
        P.parse_vring_file(_msg(P.Request.SET_VRING_KICK, struct.pack("=Q", 0)))
    with pytest.raises(P.BadFdCount):
        P.parse_vring_file(_msg(P.Request.SET_VRING_KICK, struct.pack("=Q", P.VRING_NOFD_MASK), [efds[0]]))
    with pytest.raises(P.BadFdCount):
        P.parse_vring_file(_msg(P.Request.SET_VRING_KICK, struct.pack("=Q", 0), efds[:2]))


def test_vring_file_rejects_bits_above_the_nofd_flag(efds: list[int]) -> None:
    with pytest.raises(P.InvalidValue):
        P.parse_vring_file(_msg(P.Request.SET_VRING_ERR, struct.pack("=Q", 1 << 9), [efds[0]]))


def _table(regions: list[tuple[int, int, int, int]]) -> bytes:
    return P.pack_mem_table([P.MemoryRegion(*r) for r in regions])


def test_mem_table_parses_regions_and_hands_them_the_fds_in_order(efds: list[int]) -> None:
    m = _msg(P.Request.SET_MEM_TABLE, _table([(0, 0x1000, 0x10000, 0), (0x2000, 0x1000, 0x20000, 0)]), efds[:2])
    regions = P.parse_mem_table(m)
    assert [r.fd for r in regions] == efds[:2] and m.fds == []
    assert regions[1] == P.MemoryRegion(0x2000, 0x1000, 0x20000, 0, efds[1])


@pytest.mark.parametrize("n", [0, 9])
def test_mem_table_region_count_must_be_1_to_8(n: int, efds: list[int]) -> None:
    payload = struct.pack("=II", n, 0) + b"\0" * 32 * min(n, 9)
    with pytest.raises((P.InvalidValue, P.BadPayloadSize)):
        P.parse_mem_table(_msg(P.Request.SET_MEM_TABLE, payload, efds[: min(n, 8)]))


def test_mem_table_payload_must_match_nregions(efds: list[int]) -> None:
    payload = _table([(0, 0x1000, 0, 0)]) + b"\0" * 32
    with pytest.raises(P.BadPayloadSize):
        P.parse_mem_table(_msg(P.Request.SET_MEM_TABLE, payload, efds[:1]))
    with pytest.raises(P.BadPayloadSize):
        P.parse_mem_table(_msg(P.Request.SET_MEM_TABLE, b"\0" * 4))


def test_mem_table_needs_one_fd_per_region(efds: list[int]) -> None:
    with pytest.raises(P.BadFdCount):
        P.parse_mem_table(_msg(P.Request.SET_MEM_TABLE, _table([(0, 0x1000, 0, 0)]), efds[:2]))


def test_mem_table_rejects_an_empty_region(efds: list[int]) -> None:
    with pytest.raises(P.InvalidValue, match="empty"):
        P.parse_mem_table(_msg(P.Request.SET_MEM_TABLE, _table([(0, 0, 0, 0)]), efds[:1]))


@pytest.mark.parametrize("region", [(2**64 - 0x1000, 0x2000, 0, 0), (0, 0x2000, 2**64 - 0x1000, 0),
                                    (0, 0x2000, 0, 2**64 - 0x1000)], ids=["gpa", "uva", "offset"])
def test_mem_table_rejects_ranges_that_wrap_the_address_space(region: tuple[int, int, int, int],
                                                              efds: list[int]) -> None:
    with pytest.raises(P.InvalidValue, match="wraps"):
        P.parse_mem_table(_msg(P.Request.SET_MEM_TABLE, _table([region]), efds[:1]))


def test_mem_table_rejects_overlapping_guest_ranges(efds: list[int]) -> None:
    payload = _table([(0, 0x2000, 0x10000, 0), (0x1000, 0x1000, 0x20000, 0)])
    with pytest.raises(P.InvalidValue, match="guest address ranges overlap"):
        P.parse_mem_table(_msg(P.Request.SET_MEM_TABLE, payload, efds[:2]))


def test_mem_table_rejects_overlapping_user_ranges(efds: list[int]) -> None:
    payload = _table([(0, 0x2000, 0x10000, 0), (0x4000, 0x1000, 0x11000, 0)])
    with pytest.raises(P.InvalidValue, match="user address ranges overlap"):
        P.parse_mem_table(_msg(P.Request.SET_MEM_TABLE, payload, efds[:2]))


def test_config_payload_roundtrips() -> None:
    c = P.ConfigPayload(0, 60, 0, bytes(60))
    assert P.parse_config(_msg(P.Request.GET_CONFIG, c.pack())) == c


def test_config_size_must_match_the_bytes_that_follow() -> None:
    with pytest.raises(P.BadPayloadSize):
        P.parse_config(_msg(P.Request.GET_CONFIG, struct.pack("=III", 0, 60, 0) + bytes(59)))
    with pytest.raises(P.BadPayloadSize):
        P.parse_config(_msg(P.Request.GET_CONFIG, b"\0" * 8))


def test_config_range_must_stay_within_256_bytes() -> None:
    with pytest.raises(P.InvalidValue):
        P.parse_config(_msg(P.Request.GET_CONFIG, struct.pack("=III", 250, 8, 0) + bytes(8)))


def test_config_flags_other_than_writable_or_migration_are_rejected() -> None:
    with pytest.raises(P.InvalidValue):
        P.parse_config(_msg(P.Request.SET_CONFIG, struct.pack("=III", 0, 1, 2) + bytes(1)))


# ------------------------------------------------------------------------------------------------ transport
def test_fds_sent_with_scm_rights_arrive_with_the_header_bytes(efds: list[int]) -> None:
    a, b = socket.socketpair()
    with a, b:
        send_with_fds(a, _hdr(P.Request.SET_VRING_CALL, 8) + struct.pack("=Q", 0), [efds[0]])
        data, fds, trunc = recv_with_fds(b, 12)
        assert len(data) == 12 and len(fds) == 1 and not trunc
        assert os.fstat(fds[0]).st_ino == os.fstat(efds[0]).st_ino
        os.close(fds[0])
        data, fds, _ = recv_with_fds(b, 8)
        assert data == struct.pack("=Q", 0) and fds == []


def test_too_many_fds_for_the_control_buffer_are_reported_as_truncated(efds: list[int]) -> None:
    a, b = socket.socketpair()
    many = [os.dup(efds[0]) for _ in range(40)]
    try:
        with a, b:
            send_with_fds(a, _hdr(P.Request.SET_OWNER, 0), many)
            _data, fds, trunc = recv_with_fds(b, 12)
            P.close_fds(fds)
            assert trunc
    finally:
        P.close_fds(many)
