"""One thread serving a device's virtqueues: epoll on the kick eventfds, drain, signal (Firecracker event_handler).

Backends supply a *chain handler* per queue: a function from a validated :class:`~pv.queue.DescriptorChain` to
the number of bytes it wrote into the chain's writable buffers. The worker owns everything else: popping,
returning chains to the used ring, notification suppression with the §2.7.10 re-check, interrupts, fairness
between queues, throttling, and turning guest errors into DEVICE_NEEDS_RESET without ever letting an exception
out of the thread.
"""

from __future__ import annotations

import logging
import select
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvmcore.memory import GuestMemory, GuestMemoryError
from kvmcore.util.ratelimit import RateLimitedLog
from pv.device import VIRTIO_F_INDIRECT_DESC, DeviceHealth, QueueConfig, VirtioDevice
from pv.devthread import DeviceThread, drain_eventfd
from pv.errors import InvalidQueueConfig, VirtqueueError
from pv.queue import DescriptorChain, SplitQueue

log = logging.getLogger(__name__)

ChainHandler = Callable[[DescriptorChain], int]


class Throttled(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a chain handler that must not serve this chain yet (rate limit); retried after ``delay`` s."""

    def __init__(self, delay: float) -> None:
        super().__init__(f"throttled for {delay:.3f} s")
        self.delay = delay


@dataclass
class QueueStats:
    chains: int = 0
    notifications: int = 0
    kicks: int = 0
    throttled: int = 0


@dataclass
class _QueueState:
    queue: SplitQueue
    handler: ChainHandler
    stats: QueueStats = field(default_factory=QueueStats)
    pending: bool = True  # serve without waiting for a kick (start-up; budget exhausted last round)
    retry_at: float | None = None  # throttled until this monotonic time
    dead: bool = False


class QueueWorker(DeviceThread):
    """Serves ``queues`` in one thread until :meth:`stop`. ``budget`` bounds chains per queue per round."""

    def __init__(
        self,
        name: str,
        queues: Sequence[tuple[SplitQueue, ChainHandler]],
        health: DeviceHealth,
        *,
        budget: int | None = None,
    ) -> None:
        super().__init__(f"virtio-{name}", health)
        self.name = name
        self._health = health
        self._states = [_QueueState(q, h) for q, h in queues]
        self._budget = budget
        self._rlog = RateLimitedLog(log)
        self.guest_errors = 0
        self.device_errors = 0

    def stats(self, queue_index: int) -> QueueStats:
        for st in self._states:
            if st.queue.index == queue_index:
                return st.stats
        raise KeyError(queue_index)

    def is_serving(self, queue_index: int) -> bool:
        return any(st.queue.index == queue_index and not st.dead for st in self._states)

    def in_worker_thread(self) -> bool:
        return self.in_thread()

    # ----------------------------------------------------------------- the loop
    def loop(self, ep: select.epoll, stop_fd: int) -> None:
        by_fd: dict[int, _QueueState] = {}
        for st in self._states:
            ep.register(st.queue.kick_fd, select.EPOLLIN)
            by_fd[st.queue.kick_fd] = st
        while True:
            timeout = self._poll_timeout()
            for fd, _ev in ep.poll(timeout):
                if fd == stop_fd:
                    return
                st = by_fd[fd]
                drain_eventfd(fd)
                st.stats.kicks += 1
                if not st.dead:
                    st.pending = True
            now = time.monotonic()
            for st in self._states:
                if self._stopping:
                    return
                if st.dead:
                    continue
                if st.retry_at is not None:
                    if now < st.retry_at:
                        continue
                    st.retry_at = None
                    st.pending = True
                if st.pending:
                    self._serve(st)
                    if st.dead:
                        ep.unregister(st.queue.kick_fd)

    def crashed(self, e: Exception) -> None:
        self.device_errors += 1
        self._health.needs_reset(f"virtio worker {self.name} crashed")

    def _poll_timeout(self) -> float:
        if any(st.pending and not st.dead and st.retry_at is None for st in self._states):
            return 0
        retry = [st.retry_at for st in self._states if st.retry_at is not None and not st.dead]
        if retry:
            return max(0.0, min(retry) - time.monotonic())
        return -1

    def _serve(self, st: _QueueState) -> None:
        """Pop until empty (or out of budget / throttled), then signal once (§2.7.7, §2.7.10)."""
        q = st.queue
        handler = st.handler
        budget = self._budget or q.size
        st.pending = False
        pop = q.pop  # bound once: this loop runs per request
        add_used = q.add_used
        stats = st.stats
        try:
            while True:
                q.disable_notification()
                while budget and not self._stopping:
                    chain = pop()
                    if chain is None:
                        break
                    try:
                        written = handler(chain)
                    except Throttled as t:
                        q.undo_pop()
                        stats.throttled += 1
                        st.retry_at = time.monotonic() + t.delay
                        break
                    add_used(chain.head_index, written)
                    stats.chains += 1
                    budget -= 1
                if st.retry_at is not None:
                    break  # leave kicks suppressed; the timer brings us back
                if self._stopping:
                    return  # the device is being reset; the rings are about to go away
                if not budget:
                    st.pending = True  # let the other queues run; come back without waiting for a kick
                    break
                if not q.enable_notification():
                    break  # empty, and kicks re-armed with the race closed
            if q.signal_used():
                st.stats.notifications += 1
        except (VirtqueueError, GuestMemoryError) as e:
            self.guest_errors += 1
            self._rlog.warning("virtio %s queue %d: %s", self.name, q.index, e)
            self._kill(st, str(e))
        except Exception as e:
            self.device_errors += 1
            log.exception("virtio %s queue %d: device bug", self.name, q.index)
            self._kill(st, f"device error: {e!r}")

    def _kill(self, st: _QueueState, reason: str) -> None:
        st.dead = True
        st.pending = False
        st.retry_at = None
        # Chains already completed must still reach the driver before it sees NEEDS_RESET.
        try:
            st.queue.signal_used()
        except Exception:
            pass
        self._health.needs_reset(f"{self.name} queue {st.queue.index}: {reason}")


class WorkerDevice(VirtioDevice):
    """A VirtioDevice whose queues are served by one QueueWorker; subclasses provide per-queue chain handlers."""

    def __init__(self) -> None:
        self.acked_features = 0
        self.worker: QueueWorker | None = None
        self.queues: list[SplitQueue] = []

    @abstractmethod
    def chain_handler(self, queue_index: int) -> ChainHandler:
        """The function serving chains of queue ``queue_index`` (called once per activate)."""

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def active_queues(self) -> list[SplitQueue]:
        return list(self.queues)

    def activate(self, mem: GuestMemory, queues: list[QueueConfig], health: DeviceHealth) -> None:
        self.reset()
        indirect = bool(self.acked_features & (1 << VIRTIO_F_INDIRECT_DESC))
        served: list[tuple[SplitQueue, ChainHandler]] = []
        for cfg in queues:
            q = SplitQueue(mem, cfg, indirect=indirect)
            try:
                if not 0 <= cfg.index < len(self.queue_max_sizes):
                    raise InvalidQueueConfig(f"{self.name} has no queue {cfg.index}")
                if cfg.size > self.queue_max_sizes[cfg.index]:
                    raise InvalidQueueConfig(
                        f"queue {cfg.index}: size {cfg.size} > {self.queue_max_sizes[cfg.index]}"
                    )
                q.validate()
            except InvalidQueueConfig as e:
                # Driver error (§2.1.1): the device cannot run; the other queues would be useless without it.
                health.needs_reset(f"{self.name}: {e}")
                for other in served:
                    other[0].close()
                q.close()
                return
            self.queues.append(q)
            served.append((q, self.chain_handler(cfg.index)))
        self.worker = QueueWorker(self.name, served, health)
        self.worker.start()

    def reset(self) -> None:
        if self.worker is not None:
            own_thread = self.worker.in_worker_thread()
            self.worker.stop()
            self.worker = None
            if own_thread:
                # Called back from needs_reset() inside the worker: it still holds the queues until it unwinds,
                # so leave their ring views to the garbage collector.
                self.queues = []
                return
        for q in self.queues:
            q.close()
        self.queues = []
