"""The DM's vhost-user front-end: a VirtioDevice whose queues are served by a back-end in another process.

This is the stub-domain data path. At DRIVER_OK the transport hands us each queue's ring addresses, its kick
eventfd (already an ioeventfd on the queue's notify address) and its call eventfd (already an irqfd on the queue's
MSI-X vector). We pass all of it, with guest RAM's memfd, to the back-end (QEMU docs/interop/vhost-user.rst,
"Starting and stopping rings"): the guest's notify write then wakes the back-end directly in the kernel, and the
back-end's call write interrupts the guest directly — the DM's vCPU threads see no exit per request, and no
request byte passes through the DM.

The back-end is a peer we do not trust either: every reply is checked (request type, REPLY flag, size), every
request has a timeout, and anything unexpected — including the back-end hanging up while the rings run — puts
the device in NEEDS_RESET with the reason instead of raising into the transport.

Back-end restart (:meth:`VhostUserDevice.reattach`): when the back-end hangs up while the rings run, the watcher
first waits up to :data:`REATTACH_GRACE` seconds for the daemon to restart the back-end and hand us a freshly
connected socket; only if none comes does the device go to NEEDS_RESET. So the guest never sees a NEEDS_RESET
that is later taken back (virtio 1.2 §2.1.2: once set, the driver must reset the device). On re-attach we redo
the handshake, SET_MEM_TABLE and every ring, with SET_VRING_BASE = the ring's *used* index read from guest memory.

Why that resumes a blk ring correctly (only used for kvmdm's own blk back-end, which the daemon manages; an
external back-end is never re-attached):

* kvmdm's blk back-end (pv.blk.Block on pv.worker.QueueWorker) serves one ring in one thread, popping a chain,
  executing it synchronously and adding it to the used ring before popping the next: it completes requests in
  avail order, one at a time. So at any instant ``used.idx`` is the avail position of the first request that is
  not completed (as far as the guest can tell: a request is completed only once ``used.idx`` covers it,
  §2.7.8), and every avail entry before it is completed exactly once.
* The new back-end starts at ``last_avail_idx = used.idx`` (and reads ``used.idx`` itself as its next used
  slot), so it re-executes exactly the requests that were popped but not published at the crash — at most the
  one in progress — and then continues with the ones the guest queued meanwhile. None is lost; none is
  completed twice (the old back-end's unpublished used element is overwritten in the same slot).
* Re-executing a request is harmless: a read reads the same sectors into the same buffers, a write writes the
  same bytes to the same sectors, a flush flushes again. GET_ID re-reads the serial.
* Descriptors and buffers of in-flight requests stay untouched by the guest until they are in the used ring
  (§2.7.13.1), so the re-executed request sees the data the guest queued.
* The guest may have kicked while no back-end listened, and the old back-end may have consumed a kick it never
  acted on: after re-enabling the rings we kick each one ourselves (a spurious notification is allowed, §2.7.10).

Off the vCPU thread: starting the rings (DRIVER_OK) and stopping them (status 0) take a dozen blocking round trips,
each allowed :data:`REQUEST_TIMEOUT`. They run in order on the device's own control thread, so the vCPU that wrote
the status register returns at once and one slow back-end stalls no vCPU and no other device. A start does not
need to be waited for: the guest's first kick waits in its eventfd until the back-end polls it, and a start that
fails ends in NEEDS_RESET. A stop must be waited for — the driver may reuse the ring memory once reset is done —
so until the back-end has answered GET_VRING_BASE for every ring, :meth:`VhostUserDevice.reset_pending` is true
and the transport's status register does not read 0 (virtio 1.2 §4.1.4.3.2: the driver waits for 0). A start
still queued when the guest resets is dropped. :meth:`reattach` (the daemon's control thread) and the jobs
take one lock, so the connection sees one conversation at a time.

virtio-net cannot be resumed that way (a transmit in flight would be sent twice, receive buffers may hold
half-written frames): a net device whose back-end is re-attached while its rings run goes to NEEDS_RESET with
that reason, and the new connection serves it after the driver resets the device.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import replace

from kvmcore.memory import GuestMemory, GuestMemoryError
from kvmcore.util.fdpass import send_with_fds
from pv.device import VIRTIO_ID_BLOCK, VIRTIO_ID_NET, DeviceHealth, QueueConfig, VirtioDevice
from pv.vhost_user import protocol as P

log = logging.getLogger(__name__)

_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")
_CONFIG_HDR = struct.Struct("=III")
OUR_PROTOCOL_FEATURES = (
    (1 << P.ProtocolFeature.MQ) | (1 << P.ProtocolFeature.REPLY_ACK) | (1 << P.ProtocolFeature.CONFIG)
)
REQUEST_TIMEOUT = 5.0
REATTACH_GRACE = 5.0  # seconds a hung-up back-end may take to be re-attached before NEEDS_RESET


class BackendError(Exception):
    """The vhost-user back-end broke the protocol, refused a request, timed out or hung up."""


class VhostUserConnection:
    """Blocking request/reply on a connected vhost-user socket (front-end side)."""

    def __init__(self, sock: socket.socket, timeout: float = REQUEST_TIMEOUT) -> None:
        self.sock = sock
        self.timeout = timeout
        self.reply_ack = False
        self.lock = threading.Lock()

    def _send(self, msg: P.Message) -> None:
        """One frame, encoded by protocol.encode as the back-end's replies are; fds ride on its first byte."""
        try:
            send_with_fds(self.sock, P.encode(msg), msg.fds)
        except OSError as e:
            raise BackendError(f"sending {msg.name()}: {e.strerror or e}") from None

    def _recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            r, _, _ = select.select([self.sock], [], [], self.timeout)
            if not r:
                raise BackendError(f"back-end did not answer within {self.timeout:g} s")
            try:
                chunk = self.sock.recv(n - len(out))
            except OSError as e:
                raise BackendError(f"receiving: {e.strerror or e}") from None
            if not chunk:
                raise BackendError("back-end closed the connection")
            out += chunk
        return bytes(out)

    def _reply(self, request: int, max_size: int) -> bytes:
        req, flags, size = P.HEADER.unpack(self._recv_exact(P.HEADER.size))
        if req != request or not flags & P.FLAG_REPLY or flags & P.FLAG_VERSION_MASK != P.VHOST_USER_VERSION:
            raise BackendError(f"unexpected reply (request {req}, flags 0x{flags:x}) to {P.Request(request).name}")
        if size > max_size:
            raise BackendError(f"{P.Request(request).name} reply of {size} bytes (at most {max_size})")
        return self._recv_exact(size) if size else b""

    def get(self, request: int, payload: bytes = b"", max_size: int = 8) -> bytes:
        """A request the back-end always answers (GET_*)."""
        with self.lock:
            self._send(P.Message(request, P.VHOST_USER_VERSION, payload))
            return self._reply(request, max_size)

    def get_u64(self, request: int) -> int:
        data = self.get(request)
        if len(data) != 8:
            raise BackendError(f"{P.Request(request).name} reply is {len(data)} bytes, expected 8")
        return int(_U64.unpack(data)[0])

    def set(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        """A request without a reply; with REPLY_ACK negotiated, wait for the back-end's status."""
        with self.lock:
            flags = P.VHOST_USER_VERSION | (P.FLAG_NEED_REPLY if self.reply_ack else 0)
            self._send(P.Message(request, flags, payload, list(fds or [])))
            if self.reply_ack:
                data = self._reply(request, 8)
                if len(data) != 8 or _U64.unpack(data)[0] != 0:
                    raise BackendError(f"back-end refused {P.Request(request).name}")


class VhostUserDevice(VirtioDevice):
    """A virtio device (blk, net, ...) whose data path is a vhost-user back-end reached through ``sock``."""

    def __init__(self, sock: socket.socket, device_type: int, *, num_queues: int, queue_size: int = 256,
                 config_size: int = 0, config: bytes | None = None,
                 reattach_grace: float = REATTACH_GRACE) -> None:
        """config: the device config space when the front-end owns it (net: MAC and link status, as QEMU does;
        a back-end without VHOST_USER_PROTOCOL_F_CONFIG cannot supply it)."""
        self.device_type = device_type
        self.conn = VhostUserConnection(sock)
        self.sock = sock
        self.reattach_grace = reattach_grace
        self.backend_features, self.protocol_features = self._handshake(self.conn)
        if self.protocol_features & (1 << P.ProtocolFeature.MQ):
            backend_queues = self.conn.get_u64(P.Request.GET_QUEUE_NUM)
            if device_type == VIRTIO_ID_NET:
                backend_queues *= 2  # net back-ends count queue pairs (vhost-user.rst, VHOST_USER_GET_QUEUE_NUM)
            num_queues = max(1, min(num_queues, backend_queues))
        self.queue_max_sizes = (queue_size,) * num_queues
        self.config = bytearray(config if config is not None else bytes(config_size))
        if config is None and config_size and self.protocol_features & (1 << P.ProtocolFeature.CONFIG):
            reply = self.conn.get(P.Request.GET_CONFIG, _CONFIG_HDR.pack(0, config_size, 0) + bytes(config_size),
                                  max_size=_CONFIG_HDR.size + config_size)
            if len(reply) != _CONFIG_HDR.size + config_size:
                raise BackendError(f"GET_CONFIG reply is {len(reply)} bytes")
            self.config[:] = reply[_CONFIG_HDR.size :]
        self.acked_features = 0
        self._active: list[QueueConfig] = []
        self._watch_stop = -1
        self._watcher: threading.Thread | None = None
        self._mem: GuestMemory | None = None
        self._health: DeviceHealth | None = None
        # Bumped by reattach() and reset(): a watcher waiting out the grace period sees it and stands down.
        self._epoch = 0
        self._cond = threading.Condition()
        self._failed = False  # NEEDS_RESET was reported for the current activation
        self.reattaches = 0
        # Control-plane jobs (start, stop) run in order on one thread (see the module docstring).
        self._ctl_lock = threading.Lock()  # one conversation on the connection at a time
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._ctl_thread: threading.Thread | None = None
        self._generation = 0  # bumped by every reset: a start queued before it is dropped
        self._pending_jobs = 0
        self._pending_stops = 0
        self._may_run = False  # a start was queued since the last stop

    @staticmethod
    def _handshake(conn: VhostUserConnection) -> tuple[int, int]:
        """GET_FEATURES, protocol features, SET_OWNER: (back-end features, negotiated protocol features)."""
        features = conn.get_u64(P.Request.GET_FEATURES)
        proto = 0
        if features & (1 << P.VHOST_USER_F_PROTOCOL_FEATURES):
            offered = conn.get_u64(P.Request.GET_PROTOCOL_FEATURES)
            proto = offered & OUR_PROTOCOL_FEATURES
            conn.set(P.Request.SET_PROTOCOL_FEATURES, _U64.pack(proto))
            conn.reply_ack = bool(proto & (1 << P.ProtocolFeature.REPLY_ACK))
        conn.set(P.Request.SET_OWNER)
        return features, proto

    # ---------------------------------------------------------------- VirtioDevice
    def device_features(self) -> int:
        return self.backend_features & ~(1 << P.VHOST_USER_F_PROTOCOL_FEATURES)

    def read_config(self, offset: int, data: memoryview) -> None:
        end = min(offset + len(data), len(self.config))
        if 0 <= offset < end:
            data[: end - offset] = self.config[offset:end]

    def activate(self, mem: GuestMemory, queues: list[QueueConfig], health: DeviceHealth) -> None:
        """Queue the start of the rings on the control thread and return (the vCPU does not wait). A back-end
        that has already hung up fails here at once (a non-blocking poll), so the driver sees NEEDS_RESET as
        soon as it reads the status after DRIVER_OK."""
        if self._hung_up():
            self._mem, self._health = mem, health
            log.warning("vhost-user activation failed: the back-end has hung up")
            self._needs_reset(health, "vhost-user back-end: back-end closed the connection")
            return
        with self._cond:
            generation = self._generation
            self._may_run = True

        def start() -> None:
            with self._cond:
                if self._generation != generation:
                    return  # the guest reset the device before its rings were started: nothing to start
            with self._ctl_lock:
                self._mem, self._health, self._failed = mem, health, False
                try:
                    self._start(mem, queues)
                except BackendError as e:
                    log.warning("vhost-user activation failed: %s", e)
                    self._needs_reset(health, f"vhost-user back-end: {e}")
                    return
                self._watch(health)

        self._submit(start)

    def _hung_up(self) -> bool:
        """The peer closed its end (EOF or error pending). While idle a back-end sends nothing, so readable data
        would be a protocol error that the start's first reply check reports anyway."""
        try:
            p = select.poll()
            p.register(self.sock.fileno(), select.POLLIN | select.POLLRDHUP)
            events = p.poll(0)
        except (OSError, ValueError):
            return True
        return any(ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL) for _, ev in events)

    def reset_pending(self) -> bool:
        with self._cond:
            return self._pending_stops > 0

    def settle(self, timeout: float = 2 * REQUEST_TIMEOUT) -> bool:
        """Wait until every queued start and stop has run; False on timeout (tests, close)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending_jobs == 0, timeout=timeout)

    def _submit(self, job: Callable[[], None]) -> None:
        with self._cond:
            self._pending_jobs += 1
            if self._ctl_thread is None:
                self._ctl_thread = threading.Thread(target=self._control_loop, name="vhost-user-ctl", daemon=True)
                self._ctl_thread.start()
        self._jobs.put(job)

    def _control_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # a job has its own error handling; nothing may kill the thread that runs them
                log.exception("vhost-user control job failed")
            finally:
                with self._cond:
                    self._pending_jobs -= 1
                    self._cond.notify_all()

    def _needs_reset(self, health: DeviceHealth, reason: str) -> None:
        self._failed = True
        health.needs_reset(reason)

    def reattach(self, sock: socket.socket) -> bool:
        """Switch to a new back-end connection (the daemon restarted the back-end). Returns True if running rings
        were resumed on it (see the module docstring for why that is correct for blk), False if there was
        nothing to resume or the device had to go to NEEDS_RESET. Raises BackendError if the new back-end fails
        the handshake or does not offer the features the driver negotiated; the old connection is then kept."""
        with self._ctl_lock:
            return self._reattach(sock)

    def _reattach(self, sock: socket.socket) -> bool:
        conn = VhostUserConnection(sock)
        features, proto = self._handshake(conn)
        need = self.acked_features & ~(1 << P.VHOST_USER_F_PROTOCOL_FEATURES)
        if features & need != need or proto != self.protocol_features:
            raise BackendError(f"new back-end offers features 0x{features:x}/0x{proto:x}, the device runs with "
                               f"0x{need:x}/0x{self.protocol_features:x}")
        self._stop_watcher()  # also makes a watcher in its grace period stand down
        old = self.sock
        self.conn, self.sock = conn, sock
        old.close()
        self.reattaches += 1
        queues, mem, health = self._active, self._mem, self._health
        if not queues or mem is None or health is None or self._failed:
            # Rings not running (or the guest already saw NEEDS_RESET and must reset): the next activate uses
            # the new back-end.
            self._active = []
            return False
        if self.device_type != VIRTIO_ID_BLOCK:
            self._active = []
            self._needs_reset(health, "vhost-user back-end restarted; virtio-net rings cannot be resumed safely "
                                      "(in-flight frames would be lost or sent twice): reset the device")
            return False
        try:
            resumed = [replace(q, next_avail=mem.read_u16(q.used_ring + 2)) for q in queues]
        except GuestMemoryError as e:
            self._active = []
            self._needs_reset(health, f"vhost-user re-attach: used ring unreadable: {e}")
            return False
        self._active = []
        try:
            self._start(mem, resumed)
        except BackendError:
            # The new back-end died half-way (it may be restarted again): keep the rings to resume, and let a
            # watcher on the dead socket wait out the grace period for the next re-attach, as after a hang-up.
            self._active = list(queues)
            self._watch(health)
            raise
        for q in resumed:
            # A kick the guest sent while nobody listened, or one the dead back-end consumed, must not be lost.
            os.eventfd_write(q.kick_fd, 1)
        self._watch(health)
        log.info("vhost-user back-end re-attached; rings resumed at used idx %s",
                 [q.next_avail for q in resumed])
        return True

    def _start(self, mem: GuestMemory, queues: list[QueueConfig]) -> None:
        if not mem.shareable:
            # The builder allocates shareable RAM whenever a definition has a vhost-user device; this is a bug.
            raise BackendError("guest RAM is not shareable (anonymous memory): a vhost-user back-end cannot map it")
        c = self.conn
        features = self.acked_features
        if self.protocol_features or self.backend_features & (1 << P.VHOST_USER_F_PROTOCOL_FEATURES):
            features |= 1 << P.VHOST_USER_F_PROTOCOL_FEATURES
        c.set(P.Request.SET_FEATURES, _U64.pack(features))
        slots = mem.slots()
        regions = [P.MemoryRegion(s.gpa, s.size, s.host_addr, s.fd_offset) for s in slots]
        c.set(P.Request.SET_MEM_TABLE, P.pack_mem_table(regions), [s.fd for s in slots])

        def uva(gpa: int) -> int:
            # Ring addresses travel as *our* user addresses; the back-end maps them through the table.
            for s in slots:
                if s.gpa <= gpa < s.gpa + s.size:
                    return s.host_addr + gpa - s.gpa
            raise BackendError(f"ring address 0x{gpa:x} is not in guest RAM")

        for q in queues:
            c.set(P.Request.SET_VRING_NUM, _STATE.pack(q.index, q.size))
            # 0 on a fresh start (§2.7); the used idx on a re-attach (see the module docstring).
            c.set(P.Request.SET_VRING_BASE, _STATE.pack(q.index, q.next_avail & 0xFFFF))
            addr = P.VringAddr(q.index, 0, uva(q.desc_table), uva(q.used_ring), uva(q.avail_ring), 0)
            c.set(P.Request.SET_VRING_ADDR, addr.pack())
            c.set(P.Request.SET_VRING_KICK, _U64.pack(q.index), [q.kick_fd])
            c.set(P.Request.SET_VRING_CALL, _U64.pack(q.index), [q.call_fd])
            self._active.append(q)
            if self.backend_features & (1 << P.VHOST_USER_F_PROTOCOL_FEATURES):
                # With PROTOCOL_FEATURES rings start disabled ("Ring states"); enable them explicitly.
                c.set(P.Request.SET_VRING_ENABLE, _STATE.pack(q.index, 1))

    def _watch(self, health: DeviceHealth) -> None:
        """While rings run the back-end sends nothing on this socket: readable means it hung up or misbehaves."""
        self._watch_stop = os.eventfd(0, os.EFD_CLOEXEC)
        stop_fd = self._watch_stop
        sock_fd = self.sock.fileno()
        with self._cond:
            epoch = self._epoch

        def run() -> None:
            try:
                r, _, _ = select.select([sock_fd, stop_fd], [], [])
            except (OSError, ValueError):
                r = []  # the socket is gone: as good as a hang-up (the grace period still applies)
            if stop_fd in r:
                return
            log.warning("vhost-user back-end hung up while its rings were running; waiting %.1f s for a "
                        "re-attach", self.reattach_grace)
            with self._cond:
                moved_on = self._cond.wait_for(lambda: self._epoch != epoch, timeout=self.reattach_grace)
                if moved_on:
                    return
                # Still under the lock: a reattach() arriving now waits and then sees _failed.
                self._needs_reset(health, f"vhost-user back-end disconnected and not re-attached within "
                                          f"{self.reattach_grace:g} s")

        self._watcher = threading.Thread(target=run, name="vhost-user-watch", daemon=True)
        self._watcher.start()

    def _stop_watcher(self) -> None:
        with self._cond:
            self._epoch += 1
            self._cond.notify_all()
        if self._watcher is not None:
            os.eventfd_write(self._watch_stop, 1)
            self._watcher.join(timeout=1)
            os.close(self._watch_stop)
            self._watcher = None
            self._watch_stop = -1

    def reset(self) -> None:
        """Queue the stop of the rings; :meth:`reset_pending` stays true until the back-end confirmed it."""
        with self._cond:
            self._generation += 1
            if not self._may_run and self._pending_jobs == 0:
                return  # no ring was started since the last stop (a driver's reset at probe): nothing to wait for
            self._may_run = False
            self._pending_stops += 1

        def stop() -> None:
            try:
                with self._ctl_lock:
                    self._stop_rings()
            finally:
                with self._cond:
                    self._pending_stops -= 1
                    self._cond.notify_all()

        self._submit(stop)

    def _stop_rings(self) -> None:
        self._stop_watcher()
        try:
            for q in self._active:
                # GET_VRING_BASE stops the ring; the back-end answers once it no longer touches it.
                self.conn.get(P.Request.GET_VRING_BASE, _STATE.pack(q.index, 0))
        except BackendError as e:
            log.warning("vhost-user reset: %s", e)
        self._active = []

    def close(self) -> None:
        """Stop the rings (waiting for the back-end within its timeouts), end the control thread, hang up."""
        self.reset()
        settled = self.settle(timeout=REQUEST_TIMEOUT * (2 + len(self.queue_max_sizes)))
        if not settled:
            log.warning("vhost-user close: the back-end did not confirm the stop in time; hanging up anyway")
        self._jobs.put(None)
        self.sock.close()  # also ends a request still blocked on a wedged back-end
        if self._ctl_thread is not None:
            self._ctl_thread.join(timeout=1)
