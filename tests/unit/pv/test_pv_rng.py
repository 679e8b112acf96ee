"""virtio-rng (virtio 1.2 §5.4)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmcore.memory import GuestMemory
from pv.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_ID_RNG
from pv.queue import SplitQueue
from pv.rng import Rng, TokenBucket
from pv.testing import POISON, MockSplitQueue, make_guest_memory
from pv.worker import Throttled


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def big_mem() -> Iterator[GuestMemory]:
    m = make_guest_memory(4 << 20)
    yield m
    m.close()


def one(mem: GuestMemory, dev: Rng, segments: list[bytes | int]) -> tuple[MockSplitQueue, int, int]:
    mock = MockSplitQueue(mem, 16)
    q = SplitQueue(mem, mock.config())
    q.validate()
    head = mock.add_chain(segments)
    try:
        chain = q.pop()
        assert chain is not None
        n = dev.process_request(chain)
    finally:
        q.close()  # ring views must go before the memory can be unmapped
    return mock, head, n


def test_rng_identity_features_and_empty_config() -> None:
    dev = Rng()
    assert dev.device_type == VIRTIO_ID_RNG
    f = dev.device_features()
    assert f == (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_INDIRECT_DESC)
    buf = bytearray(b"\xff" * 8)
    dev.read_config(0, memoryview(buf))
    assert buf == bytes(8)
    assert dev.queue_max_sizes == (256,)


def test_fills_every_writable_buffer_with_random_bytes(mem: GuestMemory) -> None:
    dev = Rng()
    mock, head, n = one(mem, dev, [300, 1000])
    assert n == 1300
    a, b = (mock.read_buffer(x) for x in mock.buffers(head))
    # 1300 bytes of getrandom output cannot plausibly keep a 64-byte run of the poison value
    assert bytes([POISON]) * 64 not in a + b
    assert len(set(a + b)) > 200
    assert dev.bytes_served == 1300 and dev.requests == 1


def test_bytes_per_request_are_bounded(big_mem: GuestMemory) -> None:
    dev = Rng(max_bytes_per_request=64 * 1024)
    mock, head, n = one(big_mem, dev, [40 * 1024, 40 * 1024])
    assert n == 64 * 1024
    second = mock.read_buffer(mock.buffers(head)[1])
    assert second[24 * 1024 :] == bytes([POISON]) * (16 * 1024)  # untouched beyond the bound
    assert bytes([POISON]) * 64 not in second[: 24 * 1024]


def test_chain_without_writable_buffer_completes_with_len_0(mem: GuestMemory) -> None:
    dev = Rng()
    _mock, _head, n = one(mem, dev, [b"readable only"])
    assert n == 0 and dev.invalid_requests == 1


def test_rate_limit_grants_burst_then_throttles_then_refills(mem: GuestMemory) -> None:
    clock = Clock()
    dev = Rng(rate_limit_bytes_per_sec=100, clock=clock)
    _m, _h, n = one(mem, dev, [1000])
    assert n == 100  # the bucket starts full: one second's worth
    with pytest.raises(Throttled) as exc:
        one(mem, dev, [1000])
    assert 0 < exc.value.delay <= 0.011
    clock.t += 0.5
    _m, _h, n = one(mem, dev, [1000])
    assert n == 50


def test_token_bucket_never_banks_more_than_burst() -> None:
    clock = Clock()
    b = TokenBucket(10, burst=20, clock=clock)
    clock.t += 1000
    assert b.take(1000) == 20
    assert b.take(1) == 0 and b.wait_time() == pytest.approx(0.1)


@pytest.mark.parametrize("kw", [{"queue_size": 3}, {"max_bytes_per_request": 0}])
def test_bad_rng_config_fails_fast(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Rng(**kw)  # type: ignore[arg-type]
