"""A minimal vhost-user *front-end* for tests and fuzzing (the role QEMU plays in production).

It owns a memfd-backed :class:`~kvmcore.memory.GuestMemory`, announces it with SET_MEM_TABLE at made-up user
addresses (so ring-address translation is really exercised: user address != guest address), and lays rings out
with :class:`pv.testing.MockSplitQueue`. A back-end session runs on the other end of a socketpair in a thread.
"""

from __future__ import annotations

import os
import socket
import struct
import threading

from kvmcore.memory import GuestMemory
from pv.device import VirtioDevice
from pv.testing import MockSplitQueue
from pv.vhost_user import protocol as P
from pv.vhost_user.backend import VhostUserSession, send_with_fds, serve_connection

UVA_BASE = 0x7F00_0000_0000  # front-end "user address" of guest address 0
_U64 = struct.Struct("=Q")


class ConnectionClosed(Exception):
    """The back-end closed the connection."""


class MiniFrontend:
    """Front-end side of one vhost-user connection."""

    def __init__(self, sock: socket.socket, mem: GuestMemory, *, uva_base: int = UVA_BASE) -> None:
        self.sock = sock
        self.mem = mem
        self.uva_base = uva_base
        self.eventfds: list[int] = []

    # ------------------------------------------------------------------------------------------ raw I/O
    def send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] | list[int] = (), *,
             flags: int = P.VHOST_USER_VERSION, need_reply: bool = False) -> None:
        if need_reply:
            flags |= P.FLAG_NEED_REPLY
        send_with_fds(self.sock, P.HEADER.pack(request, flags, len(payload)) + payload, list(fds))

    def _recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionClosed(f"back-end closed the connection ({len(out)}/{n} bytes)")
            out += chunk
        return out

    def recv_reply(self) -> P.Message:
        request, flags, size = P.HEADER.unpack(self._recv_exact(P.HEADER.size))
        payload = self._recv_exact(size) if size else b""
        return P.Message(request, flags, payload)

    def call(self, request: int, payload: bytes = b"", fds: tuple[int, ...] | list[int] = (), *,
             need_reply: bool = False) -> P.Message:
        """Send and wait for the reply (for GET_* requests, or with need_reply)."""
        self.send(request, payload, fds, need_reply=need_reply)
        msg = self.recv_reply()
        if msg.request != request or not msg.flags & P.FLAG_REPLY:
            raise AssertionError(f"unexpected reply {msg}")
        return msg

    def ack(self, request: int, payload: bytes = b"", fds: tuple[int, ...] | list[int] = ()) -> int:
        """Send with need_reply and return the REPLY_ACK u64 (0 = success)."""
        return int(_U64.unpack(self.call(request, payload, fds, need_reply=True).payload)[0])

    def is_closed(self, timeout: float = 2.0) -> bool:
        """True once the back-end has closed its end (EOF)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (TimeoutError, BlockingIOError):
            return False
        except OSError:
            return True
        finally:
            self.sock.settimeout(None)

    # ------------------------------------------------------------------------------------------ requests
    def get_u64(self, request: int) -> int:
        return int(_U64.unpack(self.call(request).payload)[0])

    def u64(self, value: int) -> bytes:
        return _U64.pack(value)

    def mem_table(self) -> tuple[bytes, list[int]]:
        regions = []
        fds = []
        for s in self.mem.slots():
            regions.append(P.MemoryRegion(s.gpa, s.size, self.uva_base + s.gpa, s.fd_offset))
            fds.append(s.fd)
        return P.pack_mem_table(regions), fds

    def uva(self, gpa: int) -> int:
        return self.uva_base + gpa

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.eventfds.append(fd)
        return fd

    def handshake(self, *, protocol_features: bool = True, features: int | None = None) -> int:
        """GET/SET_FEATURES (+ protocol features with REPLY_ACK), SET_OWNER, SET_MEM_TABLE. Returns features."""
        offered = self.get_u64(P.Request.GET_FEATURES)
        if protocol_features:
            pf = self.get_u64(P.Request.GET_PROTOCOL_FEATURES)
            self.send(P.Request.SET_PROTOCOL_FEATURES, self.u64(pf))
        self.send(P.Request.SET_OWNER)
        if features is None:
            features = offered if protocol_features else offered & ~(1 << P.VHOST_USER_F_PROTOCOL_FEATURES)
        self.send(P.Request.SET_FEATURES, self.u64(features))
        payload, fds = self.mem_table()
        if protocol_features:
            rc = self.ack(P.Request.SET_MEM_TABLE, payload, fds)
            if rc:
                raise AssertionError(f"SET_MEM_TABLE failed: {rc}")
        else:
            self.send(P.Request.SET_MEM_TABLE, payload, fds)
        return features

    def setup_ring(self, q: MockSplitQueue, *, base: int = 0, enable: bool = True) -> None:
        """NUM, BASE, ADDR, KICK, CALL (QEMU's vhost_virtqueue_start order), then ENABLE (acked)."""
        i = q.index
        self.send(P.Request.SET_VRING_NUM, P.VringState(i, q.size).pack())
        self.send(P.Request.SET_VRING_BASE, P.VringState(i, base).pack())
        addr = P.VringAddr(i, 0, self.uva(q.desc_table), self.uva(q.used_ring), self.uva(q.avail_ring), 0)
        self.send(P.Request.SET_VRING_ADDR, addr.pack())
        self.send(P.Request.SET_VRING_KICK, self.u64(i), (q.kick_fd,))
        self.send(P.Request.SET_VRING_CALL, self.u64(i), (q.call_fd,))
        if enable:
            rc = self.ack(P.Request.SET_VRING_ENABLE, P.VringState(i, 1).pack())
            if rc:
                raise AssertionError(f"SET_VRING_ENABLE failed: {rc}")

    def get_vring_base(self, index: int) -> int:
        st = self.call(P.Request.GET_VRING_BASE, P.VringState(index, 0).pack()).payload
        idx, num = struct.unpack("=II", st)
        assert idx == index
        return num

    def close(self) -> None:
        self.sock.close()
        P.close_fds(self.eventfds)


class BackendThread:
    """A VhostUserSession served on one end of a socketpair by a thread; ``frontend`` drives the other end."""

    def __init__(self, device: VirtioDevice, mem: GuestMemory, **session_kw: object) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._backend_sock = b
        self.session = VhostUserSession(device, **session_kw)  # type: ignore[arg-type]
        self.frontend = MiniFrontend(a, mem)
        self.result: str | None = None
        self._thread = threading.Thread(target=self._run, name="vhost-user-backend", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = serve_connection(self._backend_sock, self.session)
        finally:
            self._backend_sock.close()

    def join(self, timeout: float = 5.0) -> str | None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("back-end thread did not finish")
        return self.result

    def close(self) -> None:
        self.frontend.close()
        self.join()
