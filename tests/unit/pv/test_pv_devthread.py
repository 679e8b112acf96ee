"""pv.devthread: the one device-thread skeleton (stop eventfd, self-stop, failure path) the virtio loops share."""

from __future__ import annotations

import select
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from pv.devthread import DeviceThread  # noqa: E402
from pv.testing import FakeHealth  # noqa: E402


class _Order:
    def __init__(self) -> None:
        self.events: list[str] = []


class _Queue:
    def __init__(self, order: _Order, name: str, broken: bool = False) -> None:
        self.order, self.name, self.broken = order, name, broken

    def signal_used(self) -> None:
        if self.broken:
            raise OSError("call fd gone")
        self.order.events.append(f"signal {self.name}")


class _Health(FakeHealth):
    def __init__(self, order: _Order) -> None:
        super().__init__()
        self.order = order

    def needs_reset(self, reason: str) -> None:
        self.order.events.append("needs_reset")
        super().needs_reset(reason)


def test_fail_publishes_completed_chains_before_needs_reset_even_if_one_queue_is_broken() -> None:
    order = _Order()
    t = DeviceThread("virtio-x", _Health(order))
    queues: list[Any] = [_Queue(order, "a", broken=True), None, _Queue(order, "b")]
    t.fail("guest error", queues)
    assert order.events == ["signal b", "needs_reset"] and t.stopping
    t.stop()


class _Crasher(DeviceThread):
    def loop(self, ep: select.epoll, stop_fd: int) -> None:
        raise ValueError("device bug")


def test_an_exception_in_the_loop_never_escapes_and_ends_in_needs_reset() -> None:
    health = FakeHealth()
    t = _Crasher("virtio-crash", health)
    t.start()
    assert t._thread is not None
    t._thread.join(5)
    assert health.resets == ["virtio-crash worker crashed"]
    t.stop()
    assert t._stop_fd == -1


class _SelfStopper(DeviceThread):
    def __init__(self, health: FakeHealth) -> None:
        super().__init__("virtio-self", health)
        self.extra = self.new_eventfd()
        self.go = threading.Event()

    def loop(self, ep: select.epoll, stop_fd: int) -> None:
        self.go.wait(5)
        self.stop()  # e.g. reset() reached through our own needs_reset()
        assert ep.poll(1) == [(stop_fd, select.EPOLLIN)]


def test_stop_from_the_thread_itself_returns_and_the_thread_closes_every_fd_on_exit() -> None:
    health = FakeHealth()
    t = _SelfStopper(health)
    t.start()
    thread = t._thread
    assert thread is not None
    t.go.set()
    thread.join(5)
    assert not thread.is_alive() and t._stop_fd == -1 and t._fds == []
    assert health.resets == []  # the loop's own checks held (a failed assert there would report a crash)
    t.stop()  # a second stop is harmless


def test_a_thread_starts_once() -> None:
    t = _Crasher("virtio-once", FakeHealth())
    t.start()
    with pytest.raises(RuntimeError, match="already started"):
        t.start()
    assert t._thread is not None
    t._thread.join(5)
    t.stop()
