"""The one device-thread skeleton of the inline virtio devices (pv.worker.QueueWorker, pv.net's and pv.console's
loops): a thread serving an epoll set that always holds a stop eventfd, a ``stop`` that may be called from the
thread itself (a device's ``reset`` reached through its own ``needs_reset``: it cannot join itself, so the thread
closes the eventfds on its way out), eventfd draining, and one failure path — completed chains are signalled to
the driver *before* the device reports NEEDS_RESET (virtio 1.2 §2.1.2), and nothing escapes the thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Iterable

from pv.device import DeviceHealth
from pv.queue import SplitQueue

log = logging.getLogger(__name__)


def new_eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def drain_eventfd(fd: int) -> None:
    """Consume a kick/wake (non-blocking: a spurious wake-up finds nothing)."""
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(fd)


class DeviceThread:
    """Subclasses implement :meth:`loop` (return to end the thread) and may override :meth:`crashed`."""

    def __init__(self, thread_name: str, health: DeviceHealth) -> None:
        self.thread_name = thread_name
        self.health = health
        self._stop_fd = new_eventfd()
        self._fds = [self._stop_fd]
        self._stopping = False
        self._self_stopped = False
        self._thread: threading.Thread | None = None

    def new_eventfd(self) -> int:
        """An eventfd owned by this thread object: closed with the stop eventfd."""
        fd = new_eventfd()
        self._fds.append(fd)
        return fd

    @property
    def stopping(self) -> bool:
        return self._stopping

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self.thread_name} worker already started")
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def in_thread(self) -> bool:
        return self._thread is not None and self._thread is threading.current_thread()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to stop after what it is serving, and wait for it (not when called from it)."""
        self._stopping = True
        if self._stop_fd < 0:
            return  # stopped already
        os.eventfd_write(self._stop_fd, 1)
        if self.in_thread():
            self._self_stopped = True  # the loop exits when our caller returns and closes the fds itself
            return
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"{self.thread_name} worker did not stop within {timeout} s")
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in self._fds:
            if fd >= 0:
                os.close(fd)
        self._fds = []
        self._stop_fd = -1

    def _run(self) -> None:
        ep = select.epoll()
        try:
            ep.register(self._stop_fd, select.EPOLLIN)
            self.loop(ep, self._stop_fd)
        except Exception as e:  # a device bug: never let it out of the thread
            log.exception("%s worker crashed", self.thread_name)
            self.crashed(e)
        finally:
            ep.close()
            if self._self_stopped:
                self._close_fds()

    def loop(self, ep: select.epoll, stop_fd: int) -> None:
        raise NotImplementedError

    def crashed(self, e: Exception) -> None:
        self.fail(f"{self.thread_name} worker crashed")

    def fail(self, reason: str, queues: Iterable[SplitQueue | None] = ()) -> None:
        """Give up on the device: publish completed chains, stop serving, report NEEDS_RESET."""
        for q in queues:
            if q is not None:
                with contextlib.suppress(Exception):
                    q.signal_used()
        self._stopping = True
        self.health.needs_reset(reason)
