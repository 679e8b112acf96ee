"""virtio-rng (entropy device, virtio 1.2 §5.4): fill the driver's writable buffers from getrandom(2).

Bounded per chain (``max_bytes_per_request``, default 64 KiB, like Firecracker) so one request cannot make the
host generate gigabytes, with an optional token-bucket rate limit in bytes per second: when the bucket is empty
the worker is told to retry the chain later (:class:`pv.worker.Throttled`), so the guest waits instead of
spinning on zero-length completions.
"""

from __future__ import annotations

import logging
import os
import time

from kvmcore.util.ratelimit import RateLimitedLog
from pv.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_ID_RNG
from pv.queue import MAX_QUEUE_SIZE, DescriptorChain
from pv.worker import ChainHandler, Throttled, WorkerDevice

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES_PER_REQUEST = 64 * 1024


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` banked. ``clock`` is injectable for tests."""

    def __init__(self, rate: int, burst: int | None = None, clock: object = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = rate
        self.burst = burst if burst is not None else rate
        self._clock = clock
        self._tokens = float(self.burst)
        self._last: float = clock()  # type: ignore[operator]

    def _refill(self) -> None:
        now: float = self._clock()  # type: ignore[operator]
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now

    def take(self, want: int) -> int:
        """Take up to ``want`` whole tokens; returns how many were granted (possibly 0)."""
        self._refill()
        got = min(want, int(self._tokens))
        self._tokens -= got
        return got

    def wait_time(self) -> float:
        """Seconds until at least one token is available."""
        self._refill()
        return max(0.0, (1.0 - self._tokens) / self.rate)


class Rng(WorkerDevice):
    """virtio-rng with one request queue (§5.4.2)."""

    device_type = VIRTIO_ID_RNG

    def __init__(
        self,
        *,
        queue_size: int = 256,
        max_bytes_per_request: int = DEFAULT_MAX_BYTES_PER_REQUEST,
        rate_limit_bytes_per_sec: int | None = None,
        clock: object = time.monotonic,
    ) -> None:
        super().__init__()
        if not (2 <= queue_size <= MAX_QUEUE_SIZE and queue_size & (queue_size - 1) == 0):
            raise ValueError(f"queue_size must be a power of two in 2..{MAX_QUEUE_SIZE}, got {queue_size}")
        if max_bytes_per_request <= 0:
            raise ValueError(f"max_bytes_per_request must be positive, got {max_bytes_per_request}")
        self.queue_max_sizes = (queue_size,)
        self.max_bytes_per_request = max_bytes_per_request
        self.bucket = TokenBucket(rate_limit_bytes_per_sec, clock=clock) if rate_limit_bytes_per_sec else None
        self.bytes_served = 0
        self.requests = 0
        self.invalid_requests = 0  # chains without a device-writable buffer (§5.4.6: nothing to fill)
        self._rlog = RateLimitedLog(log)

    def device_features(self) -> int:
        return (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_INDIRECT_DESC)

    def read_config(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))  # §5.4.4: no device configuration

    def chain_handler(self, queue_index: int) -> ChainHandler:
        return self.process_request

    def process_request(self, chain: DescriptorChain) -> int:
        """Fill the chain's writable buffers with random bytes; returns bytes written. Raises only Throttled."""
        w = chain.writer()
        want = min(w.remaining, self.max_bytes_per_request)
        if want == 0:
            self.invalid_requests += 1
            self._rlog.warning("virtio-rng: request at head %d has no writable buffer", chain.head_index)
            return 0
        if self.bucket is not None:
            granted = self.bucket.take(want)
            if granted == 0:
                raise Throttled(self.bucket.wait_time())
            want = granted
        done = 0
        for view in w.take_views(want):
            pos = 0
            n = len(view)
            while pos < n:
                # getrandom may return fewer bytes than asked for large requests; loop (never blocks once the
                # pool is initialised, which it is long before any guest runs).
                chunk = os.getrandom(n - pos)
                view[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
            done += n
        self.requests += 1
        self.bytes_served += done
        return done
