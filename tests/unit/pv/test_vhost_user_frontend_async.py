"""The vhost-user front-end starts and stops rings on its own control thread (issue 11): the vCPU that writes
DRIVER_OK or status 0 returns at once even when the back-end is slow, a stop is reported pending until the
back-end confirms it, and a start the guest abandoned by resetting first is never sent.

The back-end here is scripted: it negotiates REPLY_ACK (so every request waits for its answer, as with QEMU's
back-ends) and holds its answer to one chosen request until the test releases it.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from pv.device import VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK
from pv.testing import FakeHealth, MockSplitQueue, make_guest_memory
from pv.vhost_user import protocol as P
from pv.vhost_user.frontend import VhostUserDevice

_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")
FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << P.VHOST_USER_F_PROTOCOL_FEATURES)


class GatedBackend:
    """Answers like a back-end; the answer to ``hold`` waits for ``release``. ``seen`` lists the requests."""

    def __init__(self, sock: socket.socket, hold: int | None) -> None:
        self.sock, self.hold = sock, hold
        self.release = threading.Event()
        self.holding = threading.Event()
        self.seen: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return out

    def _serve(self) -> None:
        try:
            while True:
                req, flags, size = P.HEADER.unpack(self._recv(P.HEADER.size))
                payload = self._recv(size) if size else b""
                self.seen.append(req)
                if req == self.hold:
                    self.holding.set()
                    self.release.wait(10)
                reply: bytes | None = None
                if req == P.Request.GET_FEATURES:
                    reply = _U64.pack(FEATURES)
                elif req == P.Request.GET_PROTOCOL_FEATURES:
                    reply = _U64.pack(1 << P.ProtocolFeature.REPLY_ACK)
                elif req == P.Request.GET_VRING_BASE:
                    reply = _STATE.pack(_STATE.unpack(payload[:8])[0], 0)
                elif flags & P.FLAG_NEED_REPLY:
                    reply = _U64.pack(0)
                if reply is not None:
                    self.sock.sendall(P.HEADER.pack(req, P.VHOST_USER_VERSION | P.FLAG_REPLY, len(reply)) + reply)
        except (EOFError, OSError):
            pass


@pytest.fixture
def rig(request: pytest.FixtureRequest) -> Iterator[tuple[VhostUserDevice, GatedBackend, list[object]]]:
    hold = request.param
    fe, be = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = GatedBackend(be, hold)
    dev = VhostUserDevice(fe, VIRTIO_ID_BLOCK, num_queues=1)
    dev.ack_features(1 << VIRTIO_F_VERSION_1)
    mem = make_guest_memory(4 << 20)
    kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    q = MockSplitQueue(mem, 16, kick_fd=kick, call_fd=call)
    try:
        yield dev, backend, [mem, q.config(), FakeHealth()]
    finally:
        backend.release.set()
        dev.close()
        be.close()
        for fd in (kick, call):
            os.close(fd)
        mem.close()


@pytest.mark.parametrize("rig", [P.Request.SET_MEM_TABLE], indirect=True)
def test_driver_ok_returns_at_once_while_a_slow_back_end_takes_its_time(rig) -> None:  # type: ignore[no-untyped-def]
    dev, backend, (mem, qcfg, health) = rig
    t0 = time.monotonic()
    dev.activate(mem, [qcfg], health)
    assert time.monotonic() - t0 < 0.5  # the vCPU is not held by the back-end
    assert backend.holding.wait(5)
    assert not dev.settle(timeout=0.2)  # still starting: the back-end has not answered SET_MEM_TABLE
    assert P.Request.SET_VRING_KICK not in backend.seen
    backend.release.set()
    assert dev.settle()
    assert {P.Request.SET_VRING_ADDR, P.Request.SET_VRING_KICK, P.Request.SET_VRING_CALL,
            P.Request.SET_VRING_ENABLE} <= set(backend.seen)
    assert health.resets == []


@pytest.mark.parametrize("rig", [P.Request.GET_VRING_BASE], indirect=True)
def test_a_reset_is_pending_until_the_back_end_confirms_the_rings_stopped(rig) -> None:  # type: ignore[no-untyped-def]
    dev, backend, (mem, qcfg, health) = rig
    dev.activate(mem, [qcfg], health)
    assert dev.settle()
    assert not dev.reset_pending()
    t0 = time.monotonic()
    dev.reset()
    assert time.monotonic() - t0 < 0.5
    assert backend.holding.wait(5)
    assert dev.reset_pending()  # the transport keeps status non-zero meanwhile
    backend.release.set()
    assert dev.settle()
    assert not dev.reset_pending()
    assert backend.seen.count(P.Request.GET_VRING_BASE) == 1


@pytest.mark.parametrize("rig", [None], indirect=True)
def test_a_start_the_guest_abandoned_by_resetting_first_is_never_sent(rig) -> None:  # type: ignore[no-untyped-def]
    dev, backend, (mem, qcfg, health) = rig
    # Block the control thread on a stop of an earlier ring set, so the next start and reset queue behind it.
    dev._active = [qcfg]  # noqa: SLF001 - rings as left by an earlier activation
    dev._may_run = True  # noqa: SLF001
    backend.hold = P.Request.GET_VRING_BASE
    dev.reset()
    assert backend.holding.wait(5)
    dev.activate(mem, [qcfg], health)  # DRIVER_OK ...
    dev.reset()  # ... and a reset before the start ran
    backend.release.set()
    assert dev.settle()
    assert P.Request.SET_MEM_TABLE not in backend.seen and P.Request.SET_VRING_KICK not in backend.seen
    assert not dev.reset_pending()


@pytest.mark.parametrize("rig", [P.Request.GET_VRING_BASE], indirect=True)
def test_a_reset_with_no_ring_started_since_the_last_is_complete_at_once(rig) -> None:  # type: ignore[no-untyped-def]
    dev, backend, _ = rig
    dev.reset()  # the driver's reset at probe time
    assert not dev.reset_pending() and dev.settle(timeout=0.1)
    assert P.Request.GET_VRING_BASE not in backend.seen
