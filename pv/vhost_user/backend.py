"""vhost-user back-end: one front-end connection at a time drives an unchanged pv VirtioDevice.

The front-end (QEMU, or kvmdm's DM) owns the virtio transport; we receive guest RAM as fds, ring addresses as
*front-end user addresses*, and one kick / call / err eventfd per ring (QEMU docs/interop/vhost-user.rst). The
device logic is the inline one (pv.blk.Block, pv.net.Net): this module only turns the message stream into
``VirtioDevice.activate(mem, queues, health)`` calls with :class:`~pv.device.QueueConfig` built from the
front-end's eventfds, and stops the device again when a ring is stopped or the connection goes away.

Layers (CONVENTIONS §6): :mod:`pv.vhost_user.protocol` validates framing and payload shapes;
:class:`MemoryTable` validates the memory table against the fds it came with; :class:`VhostUserSession` checks
every request against the negotiated state before it changes anything. What reaches the device is a
:class:`~kvmcore.memory.GuestMemory` of checked regions and rings translated into it.

Ring life cycle ("Ring states"): a ring is *started* by SET_VRING_KICK and *stopped* by GET_VRING_BASE; with
VHOST_USER_F_PROTOCOL_FEATURES negotiated it starts disabled and SET_VRING_ENABLE enables it, without that it
starts enabled. We serve a ring when it is started and enabled (for blk and net "process without side effects"
is not possible, so a disabled ring is simply not processed). Any change to a running ring's configuration is
applied by stopping the device, recording every ring's position, and re-activating with the new set of rings.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from kvmcore.memory import PAGE_SIZE, GuestMemory, GuestMemoryError
from kvmcore.util import fdpass
from kvmcore.util.ratelimit import RateLimitedLog
from pv.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    VIRTIO_ID_NET,
    QueueConfig,
    VirtioDevice,
)
from pv.errors import InvalidQueueConfig
from pv.queue import MAX_QUEUE_SIZE, SplitQueue, avail_ring_size, desc_table_size, used_ring_size
from pv.vhost_user import protocol as P
from pv.vhost_user.protocol import (
    BadFdKind,
    FrontendError,
    InvalidValue,
    MemoryRegion,
    Message,
    NotNegotiated,
    ProtocolFeature,
    Request,
    UnknownRequest,
    VringAddr,
)
from pv.worker import QueueWorker

log = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY = 1 << 40  # 1 TiB of mapped guest RAM per connection (a limit, not a reservation)

_U16_MASK = 0xFFFF


# ----------------------------------------------------------------------------------------------- memory
def _is_mappable_file(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)  # memfd, tmpfs and hugetlbfs files are regular files


def _is_event_fd(st: os.stat_result) -> bool:
    # eventfd is an anonymous inode (no file type bits); the spec also allows pipes on platforms without it.
    # Without /proc (inside the jail) an eventfd cannot be told from other anon inodes, which is harmless here:
    # we only ever read or write 8 bytes to it.
    return stat.S_IFMT(st.st_mode) == 0 or stat.S_ISFIFO(st.st_mode)


class MemoryTable:
    """The front-end's memory table, mapped: guest RAM by GPA plus user-address translation for ring addresses.

    Owns the region fds (closed by :meth:`close`, also when construction fails).
    """

    def __init__(self, regions: list[MemoryRegion], *, max_total: int = DEFAULT_MAX_MEMORY) -> None:
        self.regions = regions
        self.mem: GuestMemory | None = None
        try:
            total = 0
            for i, r in enumerate(regions):
                try:
                    st = os.fstat(r.fd)
                except OSError as e:
                    raise BadFdKind(f"SET_MEM_TABLE: region {i} fd: {e.strerror}") from None
                if not _is_mappable_file(st):
                    raise BadFdKind(f"SET_MEM_TABLE: region {i} fd is not a mappable file (mode 0o{st.st_mode:o})")
                for what, v in (("guest address", r.guest_phys_addr), ("size", r.memory_size),
                                ("mmap offset", r.mmap_offset), ("user address", r.userspace_addr)):
                    if v % PAGE_SIZE:
                        raise InvalidValue(f"SET_MEM_TABLE: region {i} {what} 0x{v:x} is not page aligned")
                # Mapping past the end of the file would SIGBUS this process on first access.
                if r.mmap_offset + r.memory_size > st.st_size:
                    raise InvalidValue(
                        f"SET_MEM_TABLE: region {i} 0x{r.mmap_offset:x}+0x{r.memory_size:x} is beyond the "
                        f"end of its file (0x{st.st_size:x} bytes)"
                    )
                total += r.memory_size
            if total > max_total:
                raise InvalidValue(f"SET_MEM_TABLE: {total} bytes of guest RAM > limit {max_total}")
            try:
                self.mem = GuestMemory.from_fds(
                    [(r.guest_phys_addr, r.memory_size, r.fd, r.mmap_offset) for r in regions]
                )
            except (GuestMemoryError, OSError, ValueError, OverflowError) as e:
                raise InvalidValue(f"SET_MEM_TABLE: cannot map: {e}") from None
        except BaseException:
            self.close()
            raise

    def uva_to_gpa(self, uva: int, length: int, what: str) -> int:
        """GPA of front-end user range [uva, uva+length), which must lie inside one region."""
        for r in self.regions:
            if r.userspace_addr <= uva and uva + length <= r.userspace_addr + r.memory_size:
                return r.guest_phys_addr + (uva - r.userspace_addr)
        raise InvalidValue(f"{what} at user address 0x{uva:x}+0x{length:x} is outside the memory table")

    def close(self) -> None:
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        P.close_fds([r.fd for r in self.regions if r.fd >= 0])
        self.regions = []


# ----------------------------------------------------------------------------------------------- rings
@dataclass
class Vring:
    """What the front-end told us about one ring. fds are owned here (-1: none)."""

    index: int
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0  # last_avail_idx to resume from (SET_VRING_BASE; updated whenever the ring stops)
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    started: bool = False  # SET_VRING_KICK seen since the last stop
    enabled: bool = False

    def close_fds(self) -> None:
        P.close_fds([fd for fd in (self.kick_fd, self.call_fd, self.err_fd) if fd >= 0])
        self.kick_fd = self.call_fd = self.err_fd = -1


@dataclass
class SessionStats:
    messages: int = 0
    errors: int = 0  # frontend errors answered (REPLY_ACK failure) or that dropped the connection
    activations: int = 0
    needs_reset: list[str] = field(default_factory=list)


def offered_protocol_features(device: VirtioDevice) -> int:
    """MQ ("Back-ends should always implement ... MQ"), REPLY_ACK, RESET_DEVICE, and CONFIG for blk."""
    f = (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.RESET_DEVICE)
    if device.device_type == VIRTIO_ID_BLOCK:
        f |= 1 << ProtocolFeature.CONFIG
    return f


def queue_num(device: VirtioDevice) -> int:
    """GET_QUEUE_NUM: blk counts queues; QEMU's vhost-user-net compares the answer with queue *pairs*."""
    n = len(device.queue_max_sizes)
    if device.device_type == VIRTIO_ID_NET:
        return max(1, n // 2)
    return n


class _Health:
    """DeviceHealth for a device served over vhost-user: count, log, and signal the rings' err eventfds."""

    def __init__(self, session: VhostUserSession) -> None:
        self._session = session

    def needs_reset(self, reason: str) -> None:
        self._session._device_error(reason)

    def config_changed(self) -> None:
        # Would be VHOST_USER_SLAVE_CONFIG_CHANGE_MSG, which needs the SLAVE_REQ channel we do not offer.
        log.info("vhost-user %s: device config changed (not forwarded: no back-end channel)", self._session.name)


class VhostUserSession:
    """The state of one front-end connection, driving ``device``. Not thread-safe: one connection thread."""

    def __init__(self, device: VirtioDevice, *, max_memory: int = DEFAULT_MAX_MEMORY, name: str = "") -> None:
        self.device = device
        self.name = name or type(device).__name__.lower()
        self.max_memory = max_memory
        self.features_offered = (
            device.device_features()
            | (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_EVENT_IDX)
            | (1 << VIRTIO_F_INDIRECT_DESC)
            | (1 << P.VHOST_USER_F_PROTOCOL_FEATURES)
        )
        self.protocol_features_offered = offered_protocol_features(device)
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.protocol_features_set = False
        self.features_set = False
        self.owner = False
        self.table: MemoryTable | None = None
        self.vrings = [Vring(i) for i in range(len(device.queue_max_sizes))]
        self.stats = SessionStats()
        self._rlog = RateLimitedLog(log)
        self._running: list[tuple[Vring, SplitQueue]] = []  # rings the device serves right now
        self._retired_fds: list[int] = []  # replaced call fds a running worker may still hold
        self._err_lock = threading.Lock()  # err fds are written from worker threads, replaced from ours
        self._health = _Health(self)
        self._closed = False

    # ------------------------------------------------------------------------------------------ negotiated
    def _proto(self, bit: ProtocolFeature) -> bool:
        return bool(self.acked_protocol_features & (1 << bit))

    @property
    def protocol_features_negotiated(self) -> bool:
        # SET_PROTOCOL_FEATURES is only legal once GET_FEATURES offered the bit, and QEMU (hw/net/virtio-net.c
        # peer_attach) sends SET_VRING_ENABLE before its first SET_FEATURES: either one means negotiated.
        return self.protocol_features_set or bool(self.acked_features & (1 << P.VHOST_USER_F_PROTOCOL_FEATURES))

    # ------------------------------------------------------------------------------------------ dispatch
    def dispatch(self, msg: Message) -> tuple[Message | None, bool]:
        """Handle one message: (reply to send or None, keep the connection). Never raises; closes unused fds.

        Errors: with REPLY_ACK negotiated and need_reply set, answer non-zero and keep going ("The payload should
        be set to zero on success or non-zero on failure"); GET_CONFIG answers with an empty payload (its
        documented error reply); anything else drops the connection ("If back-end detects some error ... it
        may also close the connection"), since the front-end would otherwise continue on a state we refused.
        """
        self.stats.messages += 1
        wants_ack = msg.need_reply and self._proto(ProtocolFeature.REPLY_ACK)
        try:
            out = self._handle(msg)
        except FrontendError as e:
            self.stats.errors += 1
            self._rlog.warning("vhost-user %s: %s: %s", self.name, msg.name(), e)
            if e.fatal:
                return None, False
            if msg.request == Request.GET_CONFIG:
                return P.reply(msg.request), True
            if wants_ack and msg.request not in _HAS_REPLY:
                return P.reply_u64(msg.request, 1), True
            return None, False
        except Exception:  # a bug of ours: never take the process down, drop this front-end
            self.stats.errors += 1
            log.exception("vhost-user %s: internal error handling %s", self.name, msg.name())
            return None, False
        finally:
            msg.close_fds()
        if out is None and wants_ack and msg.request not in _HAS_REPLY:
            out = P.reply_u64(msg.request, 0)
        return out, True

    def _handle(self, msg: Message) -> Message | None:
        try:
            req = Request(msg.request)
        except ValueError:
            raise UnknownRequest(f"request {msg.request}") from None
        handler = _HANDLERS.get(req)
        if handler is None:
            raise UnknownRequest(f"{req.name} is not supported")
        return handler(self, msg)

    # ------------------------------------------------------------------------------------------ features
    def _get_features(self, msg: Message) -> Message:
        P.parse_empty(msg)
        return P.reply_u64(msg.request, self.features_offered)

    def _set_features(self, msg: Message) -> None:
        features = P.parse_u64(msg)
        if features & ~self.features_offered:
            raise InvalidValue(f"SET_FEATURES 0x{features:x} has bits not offered (0x{self.features_offered:x})")
        if not features & (1 << VIRTIO_F_VERSION_1):
            raise InvalidValue("SET_FEATURES without VIRTIO_F_VERSION_1: legacy devices are not supported")
        if any(v.started for v in self.vrings) and features != self.acked_features:
            raise InvalidValue("SET_FEATURES changing features while rings are started")
        with self._restart():
            self.acked_features = features
            self.features_set = True
            self.device.ack_features(features & ~(1 << P.VHOST_USER_F_PROTOCOL_FEATURES))
            if not self.protocol_features_negotiated:
                # "If VHOST_USER_F_PROTOCOL_FEATURES has not been negotiated, the ring starts directly in the
                # enabled state" (and SET_VRING_ENABLE is not available to change that).
                for v in self.vrings:
                    v.enabled = True
        return None

    def _get_protocol_features(self, msg: Message) -> Message:
        P.parse_empty(msg)
        # "Back-ends that report VHOST_USER_F_PROTOCOL_FEATURES must support this message even before
        # VHOST_USER_SET_FEATURES was called."
        return P.reply_u64(msg.request, self.protocol_features_offered)

    def _set_protocol_features(self, msg: Message) -> None:
        features = P.parse_u64(msg)
        if features & ~self.protocol_features_offered:
            raise InvalidValue(
                f"SET_PROTOCOL_FEATURES 0x{features:x} has bits not offered (0x{self.protocol_features_offered:x})"
            )
        self.acked_protocol_features = features
        self.protocol_features_set = True
        return None

    def _set_owner(self, msg: Message) -> None:
        P.parse_empty(msg)
        self.owner = True  # a "session start" flag; repeating it is harmless
        return None

    def _reset_owner(self, msg: Message) -> None:
        P.parse_empty(msg)
        # Deprecated: "back-ends either ignore this message, or use it to disable all rings". We stop them.
        self._stop_device()
        for v in self.vrings:
            v.started = False
        return None

    def _reset_device(self, msg: Message) -> None:
        P.parse_empty(msg)
        if not self._proto(ProtocolFeature.RESET_DEVICE):
            raise NotNegotiated("RESET_DEVICE without VHOST_USER_PROTOCOL_F_RESET_DEVICE")
        # "disable all rings and reset all internal device state to the initial state ... The back-end retains
        # ownership of the device". Protocol features describe the connection, not the device: kept.
        self._stop_device()
        for v in self.vrings:
            v.close_fds()
        self.vrings = [Vring(i) for i in range(len(self.device.queue_max_sizes))]
        self.acked_features = 0
        self.features_set = False
        self.device.ack_features(0)
        return None

    def _get_queue_num(self, msg: Message) -> Message:
        P.parse_empty(msg)
        if not self._proto(ProtocolFeature.MQ):
            raise NotNegotiated("GET_QUEUE_NUM without VHOST_USER_PROTOCOL_F_MQ")
        return P.reply_u64(msg.request, queue_num(self.device))

    # ------------------------------------------------------------------------------------------ memory
    def _set_mem_table(self, msg: Message) -> None:
        regions = P.parse_mem_table(msg)  # takes the fds
        table = MemoryTable(regions, max_total=self.max_memory)  # closes them on failure
        # Rings keep their user addresses; they are translated through the new table when restarted.
        with self._restart():
            old, self.table = self.table, table
            if old is not None:
                old.close()
        return None

    # ------------------------------------------------------------------------------------------ rings
    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise InvalidValue(f"vring index {index} >= {len(self.vrings)} rings")
        return self.vrings[index]

    def _set_vring_num(self, msg: Message) -> None:
        st = P.parse_state(msg)
        v = self._vring(st.index)
        limit = min(self.device.queue_max_sizes[st.index], MAX_QUEUE_SIZE)
        # Split rings: "Queue Size value is always a power of 2" (virtio 1.2 §2.7).
        if not (0 < st.num <= limit and st.num & (st.num - 1) == 0):
            raise InvalidValue(f"SET_VRING_NUM {st.num} for ring {st.index}: not a power of two in 1..{limit}")
        with self._restart():
            v.num = st.num
        return None

    def _set_vring_addr(self, msg: Message) -> None:
        addr = P.parse_vring_addr(msg)
        v = self._vring(addr.index)
        if addr.flags & P.VHOST_VRING_F_LOG:
            raise NotNegotiated("SET_VRING_ADDR with VHOST_VRING_F_LOG: dirty logging is not supported")
        if self.table is None:
            raise InvalidValue("SET_VRING_ADDR before SET_MEM_TABLE: ring addresses cannot be translated")
        self._translate(addr, v.num or 1)  # reject addresses outside the table now, not at start
        with self._restart():
            v.addr = addr
        return None

    def _translate(self, addr: VringAddr, num: int) -> tuple[int, int, int]:
        assert self.table is not None
        t = self.table
        return (
            t.uva_to_gpa(addr.desc_user_addr, desc_table_size(num), f"ring {addr.index} descriptor table"),
            t.uva_to_gpa(addr.avail_user_addr, avail_ring_size(num), f"ring {addr.index} available ring"),
            t.uva_to_gpa(addr.used_user_addr, used_ring_size(num), f"ring {addr.index} used ring"),
        )

    def _set_vring_base(self, msg: Message) -> None:
        st = P.parse_state(msg)
        v = self._vring(st.index)
        if st.num > _U16_MASK:  # split rings: last_avail_idx is a u16
            raise InvalidValue(f"SET_VRING_BASE {st.num} for ring {st.index} > 0xffff")
        with self._restart():
            v.base = st.num
        return None

    def _get_vring_base(self, msg: Message) -> Message:
        st = P.parse_state(msg)
        v = self._vring(st.index)
        # "stop ring upon receiving VHOST_USER_GET_VRING_BASE": the reply carries where to resume.
        with self._restart():
            v.started = False
            v.close_fds()  # the front-end sends new kick/call fds when it starts the ring again
        return P.reply(msg.request, P.VringState(v.index, v.base).pack())

    def _vring_fd(self, msg: Message) -> tuple[Vring, int]:
        f = P.parse_vring_file(msg)  # takes the fd
        try:
            v = self._vring(f.index)
            if f.fd >= 0:
                try:
                    st = os.fstat(f.fd)
                except OSError as e:
                    raise BadFdKind(f"{msg.name()}: {e.strerror}") from None
                if not _is_event_fd(st):
                    raise BadFdKind(f"{msg.name()}: fd is not an eventfd or pipe (mode 0o{st.st_mode:o})")
        except BaseException:
            if f.fd >= 0:
                os.close(f.fd)
            raise
        return v, f.fd

    def _set_vring_kick(self, msg: Message) -> None:
        v, fd = self._vring_fd(msg)
        if fd < 0:
            # NOFD asks the back-end to poll the ring; our workers are event driven.
            raise InvalidValue(f"SET_VRING_KICK ring {v.index} without fd: polling mode is not supported")
        try:
            with self._restart():
                old, v.kick_fd = v.kick_fd, fd
                v.started = True  # a kick fd starts the ring (we serve what is pending without waiting)
                if old >= 0:
                    os.close(old)
        except BaseException:
            if v.kick_fd != fd:
                os.close(fd)
            raise
        return None

    def _set_vring_call(self, msg: Message) -> None:
        v, fd = self._vring_fd(msg)
        live = [q for rv, q in self._running if rv is v]
        if live:
            # QEMU swaps call fds on running rings (vhost_virtqueue_mask) and "the back-end must support changing
            # some configuration aspects on the fly": switch the live queue over without a restart. The worker may
            # be about to write the old fd, so it stays open (retired) until the device stops, never reused.
            live[0].call_fd = fd
            if v.call_fd >= 0:
                self._retired_fds.append(v.call_fd)
            v.call_fd = fd
            return None
        with self._restart():
            old, v.call_fd = v.call_fd, fd
            if old >= 0:
                os.close(old)
        return None

    def _set_vring_err(self, msg: Message) -> None:
        v, fd = self._vring_fd(msg)
        with self._err_lock:
            old, v.err_fd = v.err_fd, fd
            if old >= 0:
                os.close(old)
        return None

    def _set_vring_enable(self, msg: Message) -> None:
        st = P.parse_state(msg)
        v = self._vring(st.index)
        if not self.protocol_features_negotiated:
            raise NotNegotiated("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        if st.num not in (0, 1):
            raise InvalidValue(f"SET_VRING_ENABLE ring {st.index} with {st.num}")
        with self._restart():
            v.enabled = bool(st.num)
        return None

    # ------------------------------------------------------------------------------------------ config
    def _get_config(self, msg: Message) -> Message:
        cfg = P.parse_config(msg)
        if not self._proto(ProtocolFeature.CONFIG):
            raise NotNegotiated("GET_CONFIG without VHOST_USER_PROTOCOL_F_CONFIG")
        buf = bytearray(cfg.size)
        self.device.read_config(cfg.offset, memoryview(buf))
        # "back-end's payload size MUST match the front-end's request"
        return P.reply(msg.request, P.ConfigPayload(cfg.offset, cfg.size, cfg.flags, bytes(buf)).pack())

    def _set_config(self, msg: Message) -> None:
        cfg = P.parse_config(msg)
        if not self._proto(ProtocolFeature.CONFIG):
            raise NotNegotiated("SET_CONFIG without VHOST_USER_PROTOCOL_F_CONFIG")
        # "back-ends MUST NOT accept SET_CONFIG for read-only configuration space fields unless the live
        # migration bit is set." Compare with what the device reports: a write that changes nothing is a no-op,
        # anything else would change a field our devices do not make writable.
        current = bytearray(cfg.size)
        self.device.read_config(cfg.offset, memoryview(current))
        if bytes(current) == cfg.data:
            return None
        if cfg.flags == P.CONFIG_FLAG_MIGRATION:
            raise NotNegotiated("SET_CONFIG for live migration: migration is not supported")
        raise InvalidValue(f"SET_CONFIG {cfg.offset}+{cfg.size}: read-only configuration space")

    # ------------------------------------------------------------------------------------------ running
    def _ring_ready(self, v: Vring) -> bool:
        return v.started and v.enabled and v.addr is not None and v.num > 0 and v.kick_fd >= 0

    class _Restart:
        def __init__(self, session: VhostUserSession) -> None:
            self.s = session

        def __enter__(self) -> None:
            self.s._stop_device()

        def __exit__(self, exc_type: object, *exc: object) -> None:
            # Restart whatever is runnable even if the mutation failed half-way (it validates before mutating).
            self.s._start_device()

    def _restart(self) -> VhostUserSession._Restart:
        """Stop the device (recording ring positions), let the caller change state, start what is ready."""
        return VhostUserSession._Restart(self)

    def _stop_device(self) -> None:
        if not self._running:
            return
        dev = self.device
        worker = getattr(dev, "worker", None)
        if isinstance(worker, QueueWorker):
            worker.stop()  # after the chain in progress: everything popped is in the used ring
        running, self._running = self._running, []
        dev.reset()  # stops any device thread; the queue objects keep their positions after close()
        for v, q in running:
            v.base = q.next_avail
        P.close_fds(self._retired_fds)

    def _start_device(self) -> None:
        """Activate the device on every ready ring. Rings whose addresses no longer translate stay stopped."""
        if self._closed or self.table is None or self.table.mem is None or not self.features_set:
            return
        mem = self.table.mem
        cfgs: list[QueueConfig] = []
        bad: list[str] = []
        event_idx = bool(self.acked_features & (1 << VIRTIO_F_EVENT_IDX))
        if self.device.device_type == VIRTIO_ID_NET and not all(self._ring_ready(v) for v in self.vrings):
            return  # pv.net.Net serves receiveq1 and transmitq1 together (§5.1.2): wait for both
        for v in self.vrings:
            if not self._ring_ready(v):
                continue
            assert v.addr is not None
            try:
                desc, avail, used = self._translate(v.addr, v.num)
            except InvalidValue as e:
                bad.append(str(e))
                v.started = False
                continue
            cfgs.append(QueueConfig(v.index, v.num, desc, avail, used, v.kick_fd, v.call_fd, event_idx))
        if cfgs:
            try:
                self._activate(mem, cfgs)
            except InvalidQueueConfig as e:
                bad.append(str(e))
        if bad:
            for reason in bad:
                self._device_error(reason)

    def _activate(self, mem: GuestMemory, cfgs: list[QueueConfig]) -> None:
        """``device.activate`` with each queue resumed at its ring's base (vhost-user's SET_VRING_BASE); the used
        index is whatever the ring holds (libvhost-user does the same: used_idx is read when the ring starts)."""
        dev = self.device
        self.stats.activations += 1
        by_index = {v.index: v for v in self.vrings}
        try:
            cfgs = [replace(c, next_avail=by_index[c.index].base, next_used=mem.read_u16(c.used_ring + 2))
                    for c in cfgs]
        except GuestMemoryError as e:
            raise InvalidQueueConfig(str(e)) from None
        dev.activate(mem, cfgs, self._health)
        self._running = [(by_index[q.index], q) for q in dev.active_queues() if isinstance(q, SplitQueue)]

    def _device_error(self, reason: str) -> None:
        """A ring hit a guest error (or failed to start): count, log, signal every err eventfd we were given."""
        self.stats.needs_reset.append(reason)
        self._rlog.warning("vhost-user %s: %s", self.name, reason)
        with self._err_lock:
            for v in self.vrings:
                if v.err_fd >= 0:
                    try:
                        os.eventfd_write(v.err_fd, 1)
                    except OSError:
                        pass

    # ------------------------------------------------------------------------------------------ teardown
    def close(self) -> None:
        """The connection is gone: stop the device, forget all state, close every fd and unmap guest RAM."""
        if self._closed:
            return
        self._closed = True
        try:
            self._stop_device()
        finally:
            with self._err_lock:
                for v in self.vrings:
                    v.close_fds()
            P.close_fds(self._retired_fds)
            if self.table is not None:
                self.table.close()
                self.table = None


# Requests whose protocol reply exists anyway (no extra REPLY_ACK: "brings no behavioural change").
_HAS_REPLY = frozenset({
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE, Request.GET_QUEUE_NUM,
    Request.GET_CONFIG,
})

_HANDLERS: dict[Request, Callable[[VhostUserSession, Message], Message | None]] = {
    Request.GET_FEATURES: VhostUserSession._get_features,
    Request.SET_FEATURES: VhostUserSession._set_features,
    Request.SET_OWNER: VhostUserSession._set_owner,
    Request.RESET_OWNER: VhostUserSession._reset_owner,
    Request.SET_MEM_TABLE: VhostUserSession._set_mem_table,
    Request.SET_VRING_NUM: VhostUserSession._set_vring_num,
    Request.SET_VRING_ADDR: VhostUserSession._set_vring_addr,
    Request.SET_VRING_BASE: VhostUserSession._set_vring_base,
    Request.GET_VRING_BASE: VhostUserSession._get_vring_base,
    Request.SET_VRING_KICK: VhostUserSession._set_vring_kick,
    Request.SET_VRING_CALL: VhostUserSession._set_vring_call,
    Request.SET_VRING_ERR: VhostUserSession._set_vring_err,
    Request.GET_PROTOCOL_FEATURES: VhostUserSession._get_protocol_features,
    Request.SET_PROTOCOL_FEATURES: VhostUserSession._set_protocol_features,
    Request.GET_QUEUE_NUM: VhostUserSession._get_queue_num,
    Request.SET_VRING_ENABLE: VhostUserSession._set_vring_enable,
    Request.GET_CONFIG: VhostUserSession._get_config,
    Request.SET_CONFIG: VhostUserSession._set_config,
    Request.RESET_DEVICE: VhostUserSession._reset_device,
}


# ----------------------------------------------------------------------------------------------- transport
_ANC_FDS = 2 * P.MAX_FDS_PER_MESSAGE  # room to notice "too many" instead of the kernel silently dropping them


def recv_with_fds(sock: socket.socket, n: int) -> tuple[bytes, list[int], bool]:
    """One recvmsg of up to ``n`` bytes: (data, fds received, control data truncated)."""
    return fdpass.recv_with_fds(sock, n, _ANC_FDS, socket.MSG_CMSG_CLOEXEC)


# Front-end side helper (tests, fuzzing): one sendmsg carrying data and fds.
send_with_fds = fdpass.send_with_fds


def serve_connection(conn: socket.socket, session: VhostUserSession) -> str:
    """Serve one front-end until EOF or a protocol error; returns why it ended. Closes the session, not conn."""
    decoder = P.Decoder()
    try:
        while True:
            data, fds, truncated = recv_with_fds(conn, decoder.wanted())
            if truncated:
                P.close_fds(fds)
                session.stats.errors += 1
                log.warning("vhost-user %s: control data truncated (too many fds): dropping", session.name)
                return "too many fds"
            if not data:
                P.close_fds(fds)
                return "eof"
            try:
                decoder.feed(data, fds)
                while (msg := decoder.next_message()) is not None:
                    out, keep = session.dispatch(msg)
                    if out is not None:
                        conn.sendall(P.encode(out))
                    if not keep:
                        return f"error in {msg.name()}"
            except FrontendError as e:
                session.stats.errors += 1
                log.warning("vhost-user %s: %s: dropping the connection", session.name, e)
                return str(e)
    except OSError as e:
        return f"socket error: {e}"
    finally:
        decoder.close()
        session.close()


class VhostUserServer:
    """Accepts front-ends on ``listener`` one at a time; each gets a fresh session on the same ``device``.

    A front-end that misbehaves loses its connection; the server goes on to the next one.
    """

    def __init__(self, listener: socket.socket, device: VirtioDevice, *, max_memory: int = DEFAULT_MAX_MEMORY,
                 name: str = "") -> None:
        self.listener = listener
        self.device = device
        self.max_memory = max_memory
        self.name = name or type(device).__name__.lower()
        self.connections = 0
        self.last_session: VhostUserSession | None = None
        self._stop = False

    def serve_one(self) -> str:
        conn, _ = self.listener.accept()
        self.connections += 1
        with conn:
            session = VhostUserSession(self.device, max_memory=self.max_memory, name=self.name)
            self.last_session = session
            why = serve_connection(conn, session)
        log.info("vhost-user %s: front-end %d disconnected: %s", self.name, self.connections, why)
        return why

    def serve_forever(self) -> None:
        while not self._stop:
            try:
                self.serve_one()
            except OSError as e:
                if self._stop:
                    return
                log.warning("vhost-user %s: accept failed: %s", self.name, e)

    def stop(self) -> None:
        """Stop accepting (from another thread): shuts the listener down so a blocked accept() returns."""
        self._stop = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def bind_listener(path: str) -> socket.socket:
    """A listening unix socket at ``path`` (a stale socket file left by a previous run is replaced)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock
