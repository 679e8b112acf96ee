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
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading

from kvmcore.memory import GuestMemory
from pv.device import DeviceHealth, QueueConfig, VirtioDevice
from pv.vhost_user import protocol as P

log = logging.getLogger(__name__)

_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")
_CONFIG_HDR = struct.Struct("=III")
OUR_PROTOCOL_FEATURES = (
    (1 << P.ProtocolFeature.MQ) | (1 << P.ProtocolFeature.REPLY_ACK) | (1 << P.ProtocolFeature.CONFIG)
)
REQUEST_TIMEOUT = 5.0


class BackendError(Exception):
    """The vhost-user back-end broke the protocol, refused a request, timed out or hung up."""


class VhostUserConnection:
    """Blocking request/reply on a connected vhost-user socket (front-end side)."""

    def __init__(self, sock: socket.socket, timeout: float = REQUEST_TIMEOUT) -> None:
        self.sock = sock
        self.timeout = timeout
        self.reply_ack = False
        self.lock = threading.Lock()

    def _send(self, request: int, payload: bytes, fds: list[int], flags: int) -> None:
        data = P.HEADER.pack(request, flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        try:
            sent = self.sock.sendmsg([data], anc)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except OSError as e:
            raise BackendError(f"sending {P.Request(request).name}: {e.strerror or e}") from None

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
            self._send(request, payload, [], P.VHOST_USER_VERSION)
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
            self._send(request, payload, fds or [], flags)
            if self.reply_ack:
                data = self._reply(request, 8)
                if len(data) != 8 or _U64.unpack(data)[0] != 0:
                    raise BackendError(f"back-end refused {P.Request(request).name}")


class VhostUserDevice(VirtioDevice):
    """A virtio device (blk, net, ...) whose data path is a vhost-user back-end reached through ``sock``."""

    def __init__(self, sock: socket.socket, device_type: int, *, num_queues: int, queue_size: int = 256,
                 config_size: int = 0) -> None:
        self.device_type = device_type
        self.conn = VhostUserConnection(sock)
        self.sock = sock
        self.backend_features = self.conn.get_u64(P.Request.GET_FEATURES)
        self.protocol_features = 0
        if self.backend_features & (1 << P.VHOST_USER_F_PROTOCOL_FEATURES):
            offered = self.conn.get_u64(P.Request.GET_PROTOCOL_FEATURES)
            self.protocol_features = offered & OUR_PROTOCOL_FEATURES
            self.conn.set(P.Request.SET_PROTOCOL_FEATURES, _U64.pack(self.protocol_features))
            self.conn.reply_ack = bool(self.protocol_features & (1 << P.ProtocolFeature.REPLY_ACK))
        self.conn.set(P.Request.SET_OWNER)
        if self.protocol_features & (1 << P.ProtocolFeature.MQ):
            num_queues = max(1, min(num_queues, self.conn.get_u64(P.Request.GET_QUEUE_NUM)))
        self.queue_max_sizes = (queue_size,) * num_queues
        self.config = bytearray(config_size)
        if config_size and self.protocol_features & (1 << P.ProtocolFeature.CONFIG):
            reply = self.conn.get(P.Request.GET_CONFIG, _CONFIG_HDR.pack(0, config_size, 0) + bytes(config_size),
                                  max_size=_CONFIG_HDR.size + config_size)
            if len(reply) != _CONFIG_HDR.size + config_size:
                raise BackendError(f"GET_CONFIG reply is {len(reply)} bytes")
            self.config[:] = reply[_CONFIG_HDR.size :]
        self.acked_features = 0
        self._active: list[QueueConfig] = []
        self._watch_stop = -1
        self._watcher: threading.Thread | None = None

    # ---------------------------------------------------------------- VirtioDevice
    def device_features(self) -> int:
        return self.backend_features & ~(1 << P.VHOST_USER_F_PROTOCOL_FEATURES)

    def read_config(self, offset: int, data: memoryview) -> None:
        end = min(offset + len(data), len(self.config))
        if 0 <= offset < end:
            data[: end - offset] = self.config[offset:end]

    def activate(self, mem: GuestMemory, queues: list[QueueConfig], health: DeviceHealth) -> None:
        try:
            self._start(mem, queues)
        except BackendError as e:
            log.warning("vhost-user activation failed: %s", e)
            health.needs_reset(f"vhost-user back-end: {e}")
            return
        self._watch(health)

    def _start(self, mem: GuestMemory, queues: list[QueueConfig]) -> None:
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
            c.set(P.Request.SET_VRING_BASE, _STATE.pack(q.index, 0))
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

        def run() -> None:
            r, _, _ = select.select([self.sock.fileno(), stop_fd], [], [])
            if stop_fd in r:
                return
            log.warning("vhost-user back-end hung up while its rings were running")
            health.needs_reset("vhost-user back-end disconnected")

        self._watcher = threading.Thread(target=run, name="vhost-user-watch", daemon=True)
        self._watcher.start()

    def reset(self) -> None:
        if self._watcher is not None:
            os.eventfd_write(self._watch_stop, 1)
            self._watcher.join(timeout=1)
            os.close(self._watch_stop)
            self._watcher = None
            self._watch_stop = -1
        try:
            for q in self._active:
                # GET_VRING_BASE stops the ring; the back-end answers once it no longer touches it.
                self.conn.get(P.Request.GET_VRING_BASE, _STATE.pack(q.index, 0))
        except BackendError as e:
            log.warning("vhost-user reset: %s", e)
        self._active = []

    def close(self) -> None:
        self.reset()
        self.sock.close()
