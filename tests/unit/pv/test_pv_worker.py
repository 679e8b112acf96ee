"""QueueWorker end to end: kick eventfd -> used ring -> call eventfd, guest errors -> NEEDS_RESET, clean stop."""

from __future__ import annotations

import os
import select
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmcore.memory import GuestMemory
from pv.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, Block
from pv.device import VIRTIO_F_INDIRECT_DESC
from pv.queue import VIRTQ_DESC_F_NEXT, DescriptorChain, SplitQueue
from pv.rng import Rng
from pv.testing import FakeHealth, MockSplitQueue
from pv.worker import QueueWorker, Throttled

TIMEOUT = 5.0


def new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def wait_call(fd: int, timeout: float = TIMEOUT) -> bool:
    r, _w, _x = select.select([fd], [], [], timeout)
    if r:
        os.eventfd_read(fd)
    return bool(r)


def wait_until(pred: object, timeout: float = TIMEOUT) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.005)
    return False


@pytest.fixture
def fds() -> Iterator[tuple[int, int]]:
    kick, call = new_eventfd(), new_eventfd()
    yield kick, call
    os.close(kick)
    os.close(call)


def test_kick_is_served_and_the_call_eventfd_fires(
    mem: GuestMemory, fds: tuple[int, int], health: FakeHealth
) -> None:
    kick, call = fds
    mock = MockSplitQueue(mem, 16, kick_fd=kick, call_fd=call)
    dev = Rng()
    dev.ack_features(dev.device_features())
    dev.activate(mem, [mock.config()], health)
    try:
        head = mock.add_chain([64])
        mock.kick()
        assert wait_call(call)
        assert mock.read_used() == [(head, 64)]
        assert dev.worker is not None and dev.worker.stats(0).chains == 1
    finally:
        dev.reset()
    assert health.resets == []


def test_block_read_end_to_end_with_event_idx(
    mem: GuestMemory, fds: tuple[int, int], health: FakeHealth, tmp_path: Path
) -> None:
    kick, call = fds
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(range(256)) * 16)
    fd = os.open(img, os.O_RDWR)
    mock = MockSplitQueue(mem, 16, kick_fd=kick, call_fd=call, event_idx=True)
    dev = Block(fd)
    dev.ack_features(dev.device_features())
    dev.activate(mem, [mock.config()], health)
    try:
        heads = [
            mock.add_chain([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, i), 512, 1], indirect=i % 2 == 1)
            for i in range(3)
        ]
        mock.kick()
        assert wait_call(call)
        assert wait_until(lambda: mock.used_idx() == 3)
        assert sorted(h for h, _ in mock.read_used()) == sorted(heads)
        for i, h in enumerate(heads):
            data = mock.buffers(h)
            assert mock.read_buffer(data[1]) == (bytes(range(256)) * 16)[i * 512 : (i + 1) * 512]
            assert mock.read_buffer(data[2])[0] == VIRTIO_BLK_S_OK
        # §2.7.10: after draining, the device asks for a kick at the next slot.
        assert wait_until(lambda: mock.avail_event() == 3)
        # used_event is 0 (driver default): the second batch must not interrupt (entry 0 already passed).
        mock.add_chain([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0), 512, 1])
        mock.kick()
        assert wait_until(lambda: mock.used_idx() == 4)
        assert not wait_call(call, 0.2)
    finally:
        dev.reset()
        os.close(fd)
    assert health.resets == []


def test_guest_error_sets_needs_reset_and_the_queue_is_no_longer_served(
    mem: GuestMemory, fds: tuple[int, int], health: FakeHealth
) -> None:
    kick, call = fds
    mock = MockSplitQueue(mem, 16, kick_fd=kick, call_fd=call)
    dev = Rng()
    dev.ack_features(dev.device_features())
    dev.activate(mem, [mock.config()], health)
    try:
        good = mock.add_chain([8])
        mock.write_desc(15, 0x2000, 8, VIRTQ_DESC_F_NEXT, 15)  # a loop
        mock.publish(15)
        mock.kick()
        assert wait_until(lambda: len(health.resets) == 1)
        assert (
            "ChainTooLong" in health.resets[0]
            or "longer" in health.resets[0]
            or "exceeds" in health.resets[0]
        )
        # The chain completed before the bad one still reaches the driver.
        assert mock.read_used() == [(good, 8)]
        assert dev.worker is not None and not dev.worker.is_serving(0) and dev.worker.guest_errors == 1
        mock.add_chain([8])
        mock.kick()
        time.sleep(0.1)
        assert mock.used_idx() == 1  # not served any more
    finally:
        dev.reset()
    assert dev.worker is None


def test_indirect_not_negotiated_is_a_guest_error(
    mem: GuestMemory, fds: tuple[int, int], health: FakeHealth
) -> None:
    kick, call = fds
    mock = MockSplitQueue(mem, 16, kick_fd=kick, call_fd=call)
    dev = Rng()
    dev.ack_features(dev.device_features() & ~(1 << VIRTIO_F_INDIRECT_DESC))
    dev.activate(mem, [mock.config()], health)
    try:
        mock.add_chain([8], indirect=True)
        mock.kick()
        assert wait_until(lambda: len(health.resets) == 1)
    finally:
        dev.reset()


def test_device_bug_in_a_handler_never_escapes_the_thread(
    mem: GuestMemory, fds: tuple[int, int], health: FakeHealth
) -> None:
    kick, call = fds
    mock = MockSplitQueue(mem, 16, kick_fd=kick, call_fd=call)
    q = SplitQueue(mem, mock.config())
    q.validate()

    def buggy(chain: DescriptorChain) -> int:
        raise ZeroDivisionError("oops")

    w = QueueWorker("buggy", [(q, buggy)], health)
    errors: list[object] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_type)  # type: ignore[assignment,arg-type]
    try:
        w.start()
        mock.add_chain([1])
        mock.kick()
        assert wait_until(lambda: len(health.resets) == 1)
        assert "device error" in health.resets[0]
        assert w.device_errors == 1
    finally:
        w.stop()
        threading.excepthook = old_hook
        q.close()
    assert errors == []


def test_invalid_queue_config_at_activate_sets_needs_reset_and_starts_nothing(
    mem: GuestMemory, fds: tuple[int, int], health: FakeHealth
) -> None:
    kick, call = fds
    mock = MockSplitQueue(mem, 16, kick_fd=kick, call_fd=call)
    c = mock.config()
    c.used_ring += 2  # misaligned (§2.7: used ring alignment 4)
    dev = Rng()
    dev.activate(mem, [c], health)
    assert len(health.resets) == 1 and "aligned" in health.resets[0]
    assert dev.worker is None


def test_queue_larger_than_the_device_maximum_is_rejected(
    mem: GuestMemory, fds: tuple[int, int], health: FakeHealth
) -> None:
    kick, call = fds
    mock = MockSplitQueue(mem, 512, kick_fd=kick, call_fd=call)
    dev = Rng(queue_size=256)
    dev.activate(mem, [mock.config()], health)
    assert len(health.resets) == 1 and dev.worker is None


def test_budget_exhaustion_still_completes_every_chain(
    mem: GuestMemory, fds: tuple[int, int], health: FakeHealth
) -> None:
    kick, call = fds
    mock = MockSplitQueue(mem, 16, kick_fd=kick, call_fd=call)
    q = SplitQueue(mem, mock.config())
    q.validate()
    w = QueueWorker("budget", [(q, lambda c: 0)], health, budget=2)
    w.start()
    try:
        for _ in range(10):
            mock.add_chain([1])
        mock.kick()
        assert wait_until(lambda: mock.used_idx() == 10)
    finally:
        w.stop()
        q.close()


def test_throttled_chain_is_retried_later_not_dropped(
    mem: GuestMemory, fds: tuple[int, int], health: FakeHealth
) -> None:
    kick, call = fds
    mock = MockSplitQueue(mem, 16, kick_fd=kick, call_fd=call)
    q = SplitQueue(mem, mock.config())
    q.validate()
    attempts: list[int] = []

    def handler(chain: DescriptorChain) -> int:
        attempts.append(chain.head_index)
        if len(attempts) < 3:
            raise Throttled(0.02)
        return 1

    w = QueueWorker("throttle", [(q, handler)], health)
    w.start()
    try:
        head = mock.add_chain([1])
        mock.kick()
        assert wait_until(lambda: mock.used_idx() == 1)
        assert attempts == [head, head, head]
        assert w.stats(0).throttled == 2
    finally:
        w.stop()
        q.close()


def test_rng_rate_limit_through_the_worker(
    mem: GuestMemory, fds: tuple[int, int], health: FakeHealth
) -> None:
    kick, call = fds
    mock = MockSplitQueue(mem, 16, kick_fd=kick, call_fd=call)
    dev = Rng(rate_limit_bytes_per_sec=20000)
    dev.ack_features(dev.device_features())
    dev.activate(mem, [mock.config()], health)
    try:
        mock.add_chain([20000])
        mock.add_chain([20000])
        mock.kick()
        assert wait_until(lambda: mock.used_idx() == 2)
        lens = [n for _h, n in mock.read_used()]
        assert lens[0] == 20000 and 0 < lens[1] < 20000
    finally:
        dev.reset()


def test_stop_joins_the_thread_and_closes_the_stop_eventfd(mem: GuestMemory, health: FakeHealth) -> None:
    kick = new_eventfd()
    mock = MockSplitQueue(mem, 16, kick_fd=kick)
    q = SplitQueue(mem, mock.config())
    q.validate()
    w = QueueWorker("stop", [(q, lambda c: 0)], health)
    w.start()
    thread = w._thread
    assert thread is not None and thread.is_alive()
    w.stop()
    assert not thread.is_alive()
    assert w._stop_fd == -1
    q.close()
    os.close(kick)


def test_reset_then_activate_again_serves_from_scratch(
    mem: GuestMemory, fds: tuple[int, int], health: FakeHealth
) -> None:
    kick, call = fds
    dev = Rng()
    dev.ack_features(dev.device_features())
    for seed in (1, 2):
        mem.fill(0, 1 << 20, 0)
        mock = MockSplitQueue(mem, 16, kick_fd=kick, call_fd=call, seed=seed)
        dev.activate(mem, [mock.config()], health)
        head = mock.add_chain([4])
        mock.kick()
        assert wait_until(lambda: mock.used_idx() == 1)  # noqa: B023
        assert mock.read_used() == [(head, 4)]
        dev.reset()
    assert health.resets == []


@pytest.mark.parametrize("event_idx", [False, True])
def test_chain_published_between_drain_and_reenabling_kicks_is_not_missed(
    mem: GuestMemory, fds: tuple[int, int], health: FakeHealth, event_idx: bool
) -> None:
    """§2.7.10 race: the driver publishes after the device's last pop but sees kicks still suppressed, so it does
    not kick; the device must re-check avail idx after re-enabling notifications."""
    kick, call = fds
    mock = MockSplitQueue(mem, 16, kick_fd=kick, call_fd=call, event_idx=event_idx)

    class RacyQueue(SplitQueue):
        raced = False

        def pop(self) -> DescriptorChain | None:
            chain = super().pop()
            if chain is None and not self.raced:
                self.raced = True
                mock.add_chain([1])  # published, never kicked
            return chain

    q = RacyQueue(mem, mock.config())
    q.validate()
    w = QueueWorker("racy", [(q, lambda c: 1)], health)
    w.start()
    try:
        mock.add_chain([1])
        mock.kick()
        assert wait_until(lambda: mock.used_idx() == 2, timeout=2.0)
    finally:
        w.stop()
        q.close()


def test_reset_called_back_from_needs_reset_inside_the_worker_does_not_deadlock(
    mem: GuestMemory, fds: tuple[int, int]
) -> None:
    kick, call = fds
    mock = MockSplitQueue(mem, 16, kick_fd=kick, call_fd=call)
    dev = Rng()
    dev.ack_features(dev.device_features())

    class ResettingHealth(FakeHealth):
        def needs_reset(self, reason: str) -> None:
            super().needs_reset(reason)
            dev.reset()  # a transport that resets synchronously, from the worker thread

    health = ResettingHealth()
    dev.activate(mem, [mock.config()], health)
    worker = dev.worker
    assert worker is not None
    thread = worker._thread
    mock.publish(16)  # head out of range
    mock.kick()
    assert wait_until(lambda: len(health.resets) == 1)
    assert thread is not None and wait_until(lambda: not thread.is_alive())
    assert dev.worker is None and worker._stop_fd == -1
