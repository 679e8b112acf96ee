"""virtio-net backend over a tap fd (virtio 1.2 §5.1), one receive and one transmit queue.

The tap is configured with IFF_VNET_HDR and a 12-byte header (TUNSETVNETHDRSZ), the size of the modern
``struct virtio_net_hdr`` with ``num_buffers`` (§5.1.6: with VIRTIO_F_VERSION_1 the header always has it), so:

* **tx** (§5.1.6.2): a chain's readable buffers (header + frame) go to the tap in one ``writev``; the kernel parses
  the header (checksum/GSO offload) exactly as the driver wrote it.
* **rx** (§5.1.6.3, §5.1.6.4): one ``read`` from the tap gives header + frame into a bounce buffer; the frame is
  copied into one rx chain, or with VIRTIO_NET_F_MRG_RXBUF across as many chains as it needs, and ``num_buffers``
  says how many (§5.1.6.3.2; 1 when not negotiated, §5.1.6.4). All chains of one packet become visible to the
  driver with a single used-idx store, since the driver reads ``num_buffers`` from the first and expects the rest.

Offloads: the guest-side features the driver accepts (GUEST_CSUM, GUEST_TSO4/6) are handed to TUNSETOFFLOAD, so
the kernel only gives us packets the driver can take (as QEMU ``virtio_net_apply_guest_offloads``).

One thread per device: epoll on a stop eventfd, the two kick eventfds and the tap fd. When the driver has no rx
buffers, the tap is taken out of the epoll set until the driver kicks the rx queue (no drop, no spin): the kernel
queues (and eventually drops, per its own txqueuelen policy) frames meanwhile. Guest errors reset the device
(``DeviceHealth.needs_reset``); nothing raises out of the thread.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import struct
from dataclasses import dataclass

from kvmcore.memory import GuestMemory, GuestMemoryError
from kvmcore.util.ratelimit import RateLimitedLog
from pv import netring, tap
from pv.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_NET,
    DeviceHealth,
    QueueConfig,
    VirtioDevice,
)
from pv.devthread import DeviceThread, drain_eventfd
from pv.errors import InvalidQueueConfig, VirtqueueError
from pv.queue import MAX_QUEUE_SIZE, DescriptorChain, SplitQueue

log = logging.getLogger(__name__)

# Feature bits (§5.1.3).
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22

VIRTIO_NET_S_LINK_UP = 1  # §5.1.4 status

# struct virtio_net_hdr (§5.1.6).
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80
NET_HDR = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
NET_HDR_SIZE = NET_HDR.size
assert NET_HDR_SIZE == 12
_NUM_BUFFERS_OFF = 10
_U16 = struct.Struct("<H")

# struct virtio_net_config up to max_virtqueue_pairs (§5.1.4): mac[6], status, max_virtqueue_pairs.
_CONFIG = struct.Struct("<6sHH")

RX_QUEUE = 0
TX_QUEUE = 1

# Largest frame the tap can hand us: a 64 KiB GSO super-frame plus Ethernet/VLAN headers (§5.1.6.3.1's 65562 is
# 12 + 65550), with slack; reads never truncate because the bounce buffer is this big.
MAX_FRAME = 65550
RX_BOUNCE_SIZE = NET_HDR_SIZE + MAX_FRAME + 256
MAX_TX_BYTES = NET_HDR_SIZE + MAX_FRAME
DEFAULT_BUDGET = 64  # packets per queue per round before looking at the other queue (fairness)

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

_GUEST_OFFLOADS = (
    (VIRTIO_NET_F_GUEST_CSUM, tap.TUN_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO4, tap.TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, tap.TUN_F_TSO6),
)


class NetGuestError(VirtqueueError):
    """The driver broke a virtio-net rule (§5.1.6) in a way the device cannot serve around."""


class TxChainWritable(NetGuestError):
    """A transmit chain has device-writable buffers."""

    rule = "§5.1.6.2: the driver adds a packet to the transmitq as device-readable buffers (header + data)"


class TxHeaderTooShort(NetGuestError):
    """A transmit chain is shorter than struct virtio_net_hdr."""

    rule = "§5.1.6: Packets are transmitted by placing them in the transmitq, preceded by a header"


class RxChainReadable(NetGuestError):
    """A receive chain has device-readable buffers."""

    rule = "§5.1.6.3: receive buffers are device-writable"


class RxBufferTooSmall(NetGuestError):
    """A receive chain cannot hold struct virtio_net_hdr."""

    rule = (
        "§5.1.6.3.1: If VIRTIO_NET_F_MRG_RXBUF is negotiated, each buffer MUST be at least the size of the "
        "struct virtio_net_hdr"
    )


ENGINES = ("c", "python")


def resolve_engine(engine: str | None) -> str:
    """The per-frame engine: ``engine``, else $KVMDM_NET_ENGINE, else C when it could be built."""
    choice = engine or os.environ.get("KVMDM_NET_ENGINE") or ("c" if netring.AVAILABLE else "python")
    if choice not in ENGINES:
        raise ValueError(f"virtio-net engine must be one of {', '.join(ENGINES)}, got {choice!r}")
    if choice == "c" and not netring.AVAILABLE:
        raise ValueError("virtio-net engine 'c' is not available here (see the warning about pv.netring)")
    return choice


def offload_flags(features: int) -> int:
    """TUN_F_* flags matching the guest offloads in ``features`` (TSO only with checksum offload, as tun requires)."""
    flags = 0
    for bit, tun_flag in _GUEST_OFFLOADS:
        if features & (1 << bit):
            flags |= tun_flag
    if not flags & tap.TUN_F_CSUM:
        flags = 0  # §5.1.3.1: GUEST_TSO4/6 require GUEST_CSUM; the transport enforces it, we stay consistent
    return flags


@dataclass
class NetMetrics:
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0  # the tap refused the frame (EINVAL, EIO, ...): completed without sending
    tx_bad_header: int = 0  # header asked for an offload the driver did not negotiate: dropped
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_buffers: int = 0  # rx chains used (> rx_packets with mergeable buffers)
    rx_too_big: int = 0  # frame larger than a non-mergeable rx chain: dropped (§5.1.6.3.1 SHOULD)
    rx_read_errors: int = 0
    rx_waits: int = 0  # times the device stopped reading the tap for want of rx buffers
    tx_waits: int = 0  # times tx paused because the tap was not writable (EAGAIN)
    rx_kicks: int = 0
    tx_kicks: int = 0
    rx_notifications: int = 0
    tx_notifications: int = 0
    guest_errors: int = 0
    device_errors: int = 0


class NetEngine:
    """The sans-thread core: serves the two queues against the tap when told to. Tests drive it directly.

    ``process_tx``/``process_rx`` return what the loop must wait for next. Guest errors propagate as
    VirtqueueError/GuestMemoryError (the loop turns them into NEEDS_RESET).

    ``engine="c"`` serves frames with pv.netring's C loop; any chain it does not take (every guest error, and the
    unusual) comes back here and goes through the Python path below, which stays the reference.
    """

    def __init__(
        self,
        rxq: SplitQueue,
        txq: SplitQueue,
        tap_fd: int,
        features: int,
        metrics: NetMetrics,
        *,
        budget: int = DEFAULT_BUDGET,
        engine: str = "python",
    ) -> None:
        self.rxq = rxq
        self.txq = txq
        self.fd = tap_fd
        self.metrics = metrics
        self.budget = budget
        self.mergeable = bool(features & (1 << VIRTIO_NET_F_MRG_RXBUF))
        self._rx_flags_mask = (
            0xFF if features & (1 << VIRTIO_NET_F_GUEST_CSUM) else 0
        )  # §5.1.6.4: without GUEST_CSUM the device MUST set flags to zero
        tx_gso = {VIRTIO_NET_HDR_GSO_NONE}
        if features & (1 << VIRTIO_NET_F_HOST_TSO4):
            tx_gso.add(VIRTIO_NET_HDR_GSO_TCPV4)
        if features & (1 << VIRTIO_NET_F_HOST_TSO6):
            tx_gso.add(VIRTIO_NET_HDR_GSO_TCPV6)
        if features & (1 << VIRTIO_NET_F_HOST_ECN):
            tx_gso |= {g | VIRTIO_NET_HDR_GSO_ECN for g in tx_gso if g}
        self._tx_gso = frozenset(tx_gso)
        self._tx_csum = bool(features & (1 << VIRTIO_NET_F_CSUM))
        self._bounce = bytearray(RX_BOUNCE_SIZE)
        self._bounce_mv = memoryview(self._bounce)
        self._rx_len = 0  # length of the frame (with header) waiting in the bounce buffer; 0: none
        self._rx_held: list[DescriptorChain] = []  # chains popped for the waiting frame (mergeable)
        self.rx_waiting_for_buffers = False
        self.tx_waiting_for_tap = False
        self.ring: netring.RingEngine | None = None
        if engine == "c":
            self.ring = netring.RingEngine(rxq.mem, rxq, txq)
            self.ring.set_tx_gso(self._tx_gso)
            self._bounce_c = self.ring.ffi.from_buffer(self._bounce)
        elif engine != "python":
            raise ValueError(f"engine must be 'c' or 'python', got {engine!r}")

    # ----------------------------------------------------------------- tx (§5.1.6.2)
    def process_tx(self) -> bool:
        """Send what the driver queued. Returns True if the budget ran out (call again without waiting)."""
        q = self.txq
        m = self.metrics
        budget = self.budget
        self.tx_waiting_for_tap = False
        more = False
        ring = self.ring
        try:
            while True:
                q.disable_notification()
                while budget:
                    if ring is not None:
                        status, done = ring.tx(self.fd, budget, self._tx_csum, MAX_TX_BYTES)
                        budget -= done
                        if status == netring.TAP_BLOCKED:
                            self.tx_waiting_for_tap = True
                            m.tx_waits += 1
                            break
                        if status != netring.DEFER:
                            break  # EMPTY, or BUDGET with budget now 0
                    chain = q.pop()  # the Python path: a chain C deferred, or every chain without C
                    if chain is None:
                        break
                    if not self._send(chain):
                        q.undo_pop()  # the tap is full: resend this chain when it becomes writable
                        self.tx_waiting_for_tap = True
                        m.tx_waits += 1
                        break
                    q.add_used(chain.head_index, 0)  # §5.1.6.2: nothing is written into a tx chain
                    budget -= 1
                if self.tx_waiting_for_tap:
                    break  # kicks stay suppressed; tap writability brings us back
                if not budget:
                    more = True
                    break
                if not q.enable_notification():
                    break
        finally:
            if ring is not None:
                self._merge_ring_stats(ring)
        if q.signal_used():
            m.tx_notifications += 1
        return more

    def _send(self, chain: DescriptorChain) -> bool:
        """One frame to the tap. False if the tap would block; guest errors raise."""
        m = self.metrics
        if chain.writable_len or len(chain.writable()):
            raise TxChainWritable(f"head {chain.head_index}")
        if chain.readable_len < NET_HDR_SIZE:
            raise TxHeaderTooShort(f"head {chain.head_index}: {chain.readable_len} bytes")
        views = chain.readable_views()
        first = views[0]
        if len(first) >= 2:
            flags, gso = first[0], first[1]
        else:
            hdr = chain.reader().read(2)
            flags, gso = hdr[0], hdr[1]
        # §5.1.6.2.1: without CSUM the driver MUST set flags to zero; GSO types need their HOST_* feature. The
        # kernel would act on them regardless of what we negotiated, so drop such frames instead.
        if (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and not self._tx_csum) or gso not in self._tx_gso:
            m.tx_bad_header += 1
            return True
        if chain.readable_len > MAX_TX_BYTES:
            m.tx_dropped += 1
            return True
        if len(views) > _IOV_MAX:
            views = [memoryview(b"".join(views))]
        try:
            n = os.writev(self.fd, views)
        except BlockingIOError:
            return False
        except OSError as e:
            # EINVAL/EIO etc.: the kernel rejected the frame (bad GSO header, runt frame): the guest's problem
            # but not a ring violation; count and complete it (QEMU/Firecracker drop too).
            m.tx_dropped += 1
            if e.errno not in (errno.EINVAL, errno.EIO, errno.EMSGSIZE, errno.EFAULT, errno.ENOBUFS):
                log.debug("virtio-net tx: %s", e)
            return True
        m.tx_packets += 1
        m.tx_bytes += max(0, n - NET_HDR_SIZE)
        return True

    # ----------------------------------------------------------------- rx (§5.1.6.3, §5.1.6.4)
    def process_rx(self) -> tuple[bool, bool]:
        """Move frames from the tap into rx chains.

        Returns ``(more, tap_empty)``: ``more`` if the budget ran out; ``tap_empty`` if the tap had nothing to
        read (wait for it to become readable). :attr:`rx_waiting_for_buffers` is set if the driver has no (or
        not enough) rx buffers: stop reading the tap until the driver kicks the rx queue.
        """
        q = self.rxq
        m = self.metrics
        budget = self.budget
        more = tap_empty = False
        self.rx_waiting_for_buffers = False
        ring = self.ring
        try:
            while True:
                q.disable_notification()
                while budget:
                    if ring is not None and not self._rx_held:
                        status, done, self._rx_len = ring.rx(
                            self.fd, budget, self.mergeable, self._rx_flags_mask, self._bounce_c,
                            len(self._bounce), self._rx_len,
                        )
                        budget -= done
                        if status == netring.EMPTY:
                            tap_empty = True
                            break
                        if status == netring.BUDGET:
                            break
                        if status == netring.NEED_BUFFERS and not self._rx_len:
                            self.rx_waiting_for_buffers = True
                            break
                        # DEFER, or a frame waiting for more buffers than are posted: one packet the Python way
                        # (it raises the guest's error, or holds the chains posted so far, as the reference does).
                    if not self._rx_len:
                        if not self._rx_held and q.avail_pending() == 0:
                            self.rx_waiting_for_buffers = True
                            break  # no buffer: leave the frame in the kernel (backpressure, not a drop)
                        n = self._read_tap()
                        if n == 0:
                            tap_empty = True
                            break
                        self._rx_len = n
                    if not self._deliver():
                        self.rx_waiting_for_buffers = True
                        break
                    budget -= 1
                if tap_empty:
                    break
                if self.rx_waiting_for_buffers:
                    # Re-arm kicks, then re-check (§2.7.10): buffers that arrived meanwhile are served now.
                    if q.enable_notification():
                        self.rx_waiting_for_buffers = False
                        continue
                    m.rx_waits += 1
                    break
                if not budget:
                    more = True
                    break
        finally:
            if ring is not None:
                self._merge_ring_stats(ring)
        if q.signal_used():
            m.rx_notifications += 1
        return more, tap_empty

    def close(self) -> None:
        """Drop the C engine's pins on guest memory (only once no thread runs this engine)."""
        if self.ring is not None:
            self.ring.close()
            self.ring = None

    def _merge_ring_stats(self, ring: netring.RingEngine) -> None:
        m = self.metrics
        for name, value in ring.take_stats().items():
            if value:
                setattr(m, name, getattr(m, name) + value)

    def _read_tap(self) -> int:
        """One frame (header + data) into the bounce buffer; 0 if none is waiting."""
        while True:
            try:
                n = os.readv(self.fd, [self._bounce_mv])
            except BlockingIOError:
                return 0
            except InterruptedError:
                continue
            except OSError as e:
                # A tap read error is the host's business (e.g. the link went away); count, report empty.
                self.metrics.rx_read_errors += 1
                log.debug("virtio-net rx: read: %s", e)
                return 0
            if n < NET_HDR_SIZE:
                if n == 0:
                    return 0  # EOF (a stand-in socket peer closed): nothing to deliver
                self.metrics.rx_read_errors += 1  # a short read cannot carry a header: skip it
                continue
            return n

    def _take_chain(self) -> DescriptorChain | None:
        chain = self.rxq.pop()
        if chain is None:
            return None
        if chain.readable_len or chain.readable():
            raise RxChainReadable(f"head {chain.head_index}")
        if chain.writable_len < NET_HDR_SIZE:
            raise RxBufferTooSmall(f"head {chain.head_index}: {chain.writable_len} bytes")
        return chain

    def _deliver(self) -> bool:
        """Copy the waiting frame into rx chains and publish them; False if more rx buffers are needed."""
        n = self._rx_len
        m = self.metrics
        rest: list[DescriptorChain] = []
        if self.mergeable:
            held = self._rx_held
            room = k = 0
            while room < n:
                if k == len(held):
                    if len(held) >= self.rxq.size:
                        # Even the whole ring cannot hold this frame (the driver posts tiny buffers): drop the
                        # frame and keep the chains for the next one, rather than wait for buffers that cannot
                        # come.
                        m.rx_too_big += 1
                        self._rx_len = 0
                        return True
                    chain = self._take_chain()
                    if chain is None:
                        return False  # keep the chains popped so far: the driver cannot reclaim them anyway
                    held.append(chain)
                room += held[k].writable_len
                k += 1
            chains, rest = held[:k], held[k:]  # chains left over from a dropped frame wait for the next one
        else:
            chain = self._take_chain()
            if chain is None:
                return False
            if chain.writable_len < n:
                # The driver gave buffers too small for this frame (§5.1.6.3.1 SHOULD): drop the frame, keep the
                # chain for the next one.
                self.rxq.undo_pop()
                m.rx_too_big += 1
                self._rx_len = 0
                return True
            chains = [chain]
        buf = self._bounce_mv
        self._bounce[0] &= self._rx_flags_mask
        _U16.pack_into(self._bounce, _NUM_BUFFERS_OFF, len(chains))  # §5.1.6.4 (1 without MRG_RXBUF)
        pos = 0
        used: list[tuple[int, int]] = []
        for chain in chains:
            start = pos
            for v in chain.writable_views():
                if pos >= n:
                    break
                k = min(len(v), n - pos)
                v[:k] = buf[pos : pos + k]
                pos += k
            used.append((chain.head_index, pos - start))
        self.rxq.add_used_many(used)
        m.rx_packets += 1
        m.rx_bytes += n - NET_HDR_SIZE
        m.rx_buffers += len(chains)
        self._rx_len = 0
        self._rx_held = rest
        return True


class Net(VirtioDevice):
    """virtio-net over ``tap_fd`` with MAC ``mac`` (6 bytes). The caller owns the fd (we never close it).

    ``tap_fd`` should be a tap opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR; any other message-preserving fd
    (a SOCK_SEQPACKET socket in tests) also works, carrying the 12-byte header in front of each frame, but then no
    checksum/GSO offloads are offered because nobody would honour them.
    """

    device_type = VIRTIO_ID_NET

    def __init__(self, tap_fd: int, mac: bytes, *, queue_size: int = 256, budget: int = DEFAULT_BUDGET,
                 engine: str | None = None) -> None:
        if len(mac) != 6:
            raise ValueError(f"mac must be 6 bytes, got {len(mac)}")
        if mac[0] & 1:
            raise ValueError(f"mac {mac.hex(':')} is a multicast address")
        if not (2 <= queue_size <= MAX_QUEUE_SIZE and queue_size & (queue_size - 1) == 0):
            raise ValueError(f"queue_size must be a power of two in 2..{MAX_QUEUE_SIZE}, got {queue_size}")
        os.fstat(tap_fd)  # fail fast on a closed fd (host error)
        self.engine_kind = resolve_engine(engine)
        self.tap_fd = tap_fd
        self.mac = bytes(mac)
        self.queue_max_sizes = (queue_size, queue_size)
        self.budget = budget
        self.is_tap = tap.is_tap(tap_fd)
        if self.is_tap:
            tap.set_vnet_hdr_size(tap_fd, NET_HDR_SIZE)
            tap.set_offload(tap_fd, 0)  # nothing until the driver says what it takes
        os.set_blocking(tap_fd, False)
        self.acked_features = 0
        self.link_up = True
        self.metrics = NetMetrics()
        self.engine: NetEngine | None = None
        self._health: DeviceHealth | None = None
        self._loop: _NetLoop | None = None
        self._queues: list[SplitQueue] = []

    @property
    def name(self) -> str:
        return "net"

    # ----------------------------------------------------------------- VirtioDevice
    def device_features(self) -> int:
        feats = (
            (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_EVENT_IDX)
            | (1 << VIRTIO_F_INDIRECT_DESC)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
        )
        if self.is_tap:
            feats |= (
                (1 << VIRTIO_NET_F_CSUM)
                | (1 << VIRTIO_NET_F_GUEST_CSUM)
                | (1 << VIRTIO_NET_F_HOST_TSO4)
                | (1 << VIRTIO_NET_F_HOST_TSO6)
                | (1 << VIRTIO_NET_F_GUEST_TSO4)
                | (1 << VIRTIO_NET_F_GUEST_TSO6)
            )
        return feats

    def ack_features(self, features: int) -> None:
        self.acked_features = features & self.device_features()

    def config_bytes(self) -> bytes:
        status = VIRTIO_NET_S_LINK_UP if self.link_up else 0
        return _CONFIG.pack(self.mac, status, 1)

    def read_config(self, offset: int, data: memoryview) -> None:
        cfg = self.config_bytes()
        n = len(data)
        chunk = cfg[offset : offset + n] if 0 <= offset < len(cfg) else b""
        data[: len(chunk)] = chunk
        data[len(chunk) :] = bytes(n - len(chunk))

    def set_link(self, up: bool) -> None:
        """Change the link status bit (§5.1.4) and raise a config-change interrupt if the device is live."""
        if up == self.link_up:
            return
        self.link_up = up
        if self._health is not None and self.acked_features & (1 << VIRTIO_NET_F_STATUS):
            self._health.config_changed()

    def active_queues(self) -> list[SplitQueue]:
        return list(self._queues)

    def activate(self, mem: GuestMemory, queues: list[QueueConfig], health: DeviceHealth) -> None:
        self.reset()
        self._health = health
        indirect = bool(self.acked_features & (1 << VIRTIO_F_INDIRECT_DESC))
        by_index: dict[int, SplitQueue] = {}
        try:
            for cfg in queues:
                q = SplitQueue(mem, cfg, indirect=indirect)
                self._queues.append(q)
                if cfg.index not in (RX_QUEUE, TX_QUEUE):
                    raise InvalidQueueConfig(f"net has no queue {cfg.index} (no MQ, no control queue)")
                if cfg.size > self.queue_max_sizes[cfg.index]:
                    raise InvalidQueueConfig(f"queue {cfg.index}: size {cfg.size} > {self.queue_max_sizes[0]}")
                q.validate()
                by_index[cfg.index] = q
            if RX_QUEUE not in by_index or TX_QUEUE not in by_index:
                raise InvalidQueueConfig("net needs both receiveq1 and transmitq1 (§5.1.2)")
        except InvalidQueueConfig as e:
            health.needs_reset(f"net: {e}")
            self._close_queues()
            return
        if self.is_tap:
            try:
                tap.set_offload(self.tap_fd, offload_flags(self.acked_features))
            except OSError as e:
                # Host error (an old kernel refusing a flag): run without guest offloads rather than not at all;
                # the driver was promised GUEST_* but will only ever get plain frames, which is still correct.
                log.warning("virtio-net: TUNSETOFFLOAD failed: %s", e)
        self.engine = NetEngine(
            by_index[RX_QUEUE], by_index[TX_QUEUE], self.tap_fd, self.acked_features, self.metrics,
            budget=self.budget, engine=self.engine_kind,
        )
        self._loop = _NetLoop(self.engine, self.tap_fd, health, self.metrics)
        self._loop.start()

    def reset(self) -> None:
        loop, self._loop = self._loop, None
        engine, self.engine = self.engine, None
        if loop is not None:
            own = loop.in_thread()
            loop.stop()
            if own:
                self._queues = []  # the thread still holds ring views until it unwinds; GC frees them
                return
        if engine is not None:
            engine.close()
        self._close_queues()
        if self.is_tap:
            try:
                tap.set_offload(self.tap_fd, 0)
            except OSError:
                pass

    def _close_queues(self) -> None:
        for q in self._queues:
            q.close()
        self._queues = []


class _NetLoop(DeviceThread):
    """The device thread: epoll over stop, kicks and the tap; calls the engine; never raises."""

    def __init__(self, engine: NetEngine, tap_fd: int, health: DeviceHealth, metrics: NetMetrics) -> None:
        super().__init__("virtio-net", health)
        self.engine = engine
        self.fd = tap_fd
        self.metrics = metrics
        self._rlog = RateLimitedLog(log)

    def loop(self, ep: select.epoll, stop_fd: int) -> None:
        eng = self.engine
        m = self.metrics
        rx_kick, tx_kick = eng.rxq.kick_fd, eng.txq.kick_fd
        tap_mask = 0
        tap_dead = False
        for fd in (rx_kick, tx_kick):
            if fd >= 0:
                ep.register(fd, select.EPOLLIN)
        ep.register(self.fd, 0)
        rx_pending = tx_pending = True  # serve whatever is already queued at DRIVER_OK
        while not self._stopping:
            # Tap interest: readable unless the driver has no rx buffers (then only its rx kick wakes us:
            # backpressure without dropping or spinning); writable only while tx waits for room.
            want = (0 if eng.rx_waiting_for_buffers else select.EPOLLIN) | (
                select.EPOLLOUT if eng.tx_waiting_for_tap else 0
            )
            if want != tap_mask and not tap_dead:
                ep.modify(self.fd, want)
                tap_mask = want
            for fd, ev in ep.poll(0 if rx_pending or tx_pending else -1):
                if fd == stop_fd:
                    return
                if fd == rx_kick:
                    drain_eventfd(fd)
                    m.rx_kicks += 1
                    rx_pending = True
                elif fd == tx_kick:
                    drain_eventfd(fd)
                    m.tx_kicks += 1
                    tx_pending = True
                elif fd == self.fd:
                    if ev & (select.EPOLLERR | select.EPOLLHUP):
                        # The interface went away (tun_chr_poll reports EPOLLERR) or a stand-in peer hung
                        # up. Level-triggered, so stop watching it or we would spin; drain what is left.
                        self._rlog.warning("virtio-net: tap fd %d reported error/hangup; rx stops", self.fd)
                        ep.unregister(self.fd)
                        tap_dead = True
                        rx_pending = True
                    if ev & select.EPOLLIN:
                        rx_pending = True
                    if ev & select.EPOLLOUT:
                        tx_pending = True
            if self._stopping:
                return
            try:
                if tx_pending:
                    tx_pending = eng.process_tx()
                if rx_pending:
                    rx_pending, _empty = eng.process_rx()
            except (VirtqueueError, GuestMemoryError) as e:
                m.guest_errors += 1
                self._rlog.warning("virtio-net: %s", e)
                self.fail(f"net: {e}", (eng.rxq, eng.txq))
                return

    def crashed(self, e: Exception) -> None:
        self.metrics.device_errors += 1
        self.fail(f"net: device error: {e!r}", (self.engine.rxq, self.engine.txq))
