"""The DM's vhost-user front-end when a restarted back-end dies half-way through the re-attach.

Seen in CI: the daemon restarted a crashed blk back-end, which died again during SET_MEM_TABLE. The front-end had
already switched to the new socket and started its hang-up watcher on it; the DM's attach handler then closed
that socket, the watcher died on EBADF, and the device never reached NEEDS_RESET. Now the front-end keeps the
socket it adopted (the DM leaves it alone, daemon/dm.py), and the watcher treats a vanished socket as a hang-up.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
import time

import pytest

from pv.blk import Block
from pv.device import VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK
from pv.testing import FakeHealth, MockSplitQueue, make_guest_memory
from pv.vhost_user import protocol as P
from pv.vhost_user.backend import VhostUserSession, serve_connection
from pv.vhost_user.frontend import BackendError, VhostUserDevice

_U64 = struct.Struct("=Q")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def _dies_at_set_mem_table(sock: socket.socket, features: int, protocol_features: int) -> None:
    """A back-end that passes the handshake with the given features, then dies on SET_MEM_TABLE."""
    try:
        while True:
            req, flags, size = P.HEADER.unpack(_recv_exact(sock, P.HEADER.size))
            if size:
                _recv_exact(sock, size)
            if req == P.Request.SET_MEM_TABLE:
                return
            reply = None
            if req == P.Request.GET_FEATURES:
                reply = _U64.pack(features)
            elif req == P.Request.GET_PROTOCOL_FEATURES:
                reply = _U64.pack(protocol_features)
            elif flags & P.FLAG_NEED_REPLY:
                reply = _U64.pack(0)
            if reply is not None:
                sock.sendall(P.HEADER.pack(req, P.VHOST_USER_VERSION | P.FLAG_REPLY, len(reply)) + reply)
    except (EOFError, OSError):
        pass
    finally:
        sock.close()


@pytest.mark.parametrize("dm_closes_the_socket", [False, True], ids=["socket-kept", "socket-closed-anyway"])
def test_a_back_end_dying_during_the_re_attach_still_ends_in_needs_reset(dm_closes_the_socket: bool) -> None:
    mem = make_guest_memory(4 << 20)
    img = tempfile.NamedTemporaryFile(suffix=".raw")
    img.truncate(1 << 20)
    fd = os.open(img.name, os.O_RDWR | os.O_CLOEXEC)
    fe, be = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    first = threading.Thread(target=serve_connection, args=(be, VhostUserSession(Block(fd))), daemon=True)
    first.start()
    dev = VhostUserDevice(fe, VIRTIO_ID_BLOCK, num_queues=1, config_size=60, reattach_grace=0.3)
    health = FakeHealth()
    kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    try:
        dev.ack_features(dev.device_features() & (1 << VIRTIO_F_VERSION_1))
        q = MockSplitQueue(mem, 16, kick_fd=kick, call_fd=call)
        dev.activate(mem, [q.config()], health)
        assert dev.settle()  # the rings start on the device's control thread
        assert health.resets == []

        be.shutdown(socket.SHUT_RDWR)  # the back-end crashes: its end of the socket goes away
        first.join(5)
        new_fe, new_be = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        t = threading.Thread(target=_dies_at_set_mem_table,
                             args=(new_be, dev.backend_features, dev.protocol_features), daemon=True)
        t.start()
        with pytest.raises(BackendError):
            dev.reattach(new_fe)
        assert dev.sock is new_fe  # adopted: the DM's attach handler must leave it open (daemon/dm.py)
        if dm_closes_the_socket:
            new_fe.close()  # what the DM used to do: the watcher must not die of it
        deadline = time.monotonic() + 5
        while not health.resets and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(health.resets) == 1 and "not re-attached within 0.3 s" in health.resets[0], health.resets
    finally:
        dev.close()
        for f in (kick, call, fd):
            os.close(f)
        img.close()
        mem.close()
