"""File descriptors over unix sockets (SCM_RIGHTS, unix(7)), packed and unpacked in one place.

Used by the daemon <-> DM control socket (daemon.control: ``attach_backend``) and by both ends of vhost-user
(pv.vhost_user). fds are C ``int``s in native byte order; a truncated trailing int in the control data is ignored
(the kernel never installs a partial fd). Receivers bound how many fds one message may bring (``max_fds``) and
learn from ``truncated`` that more were sent than they made room for (those the kernel dropped).
"""

from __future__ import annotations

import array
import socket
from collections.abc import Iterable, Sequence

_INT = array.array("i").itemsize


def scm_rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data of a ``sendmsg`` carrying ``fds`` (empty: no control message at all)."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def fds_from(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """Every fd of the SCM_RIGHTS messages in a ``recvmsg``'s ancillary data."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % _INT])
            fds.extend(a)
    return fds


def sendmsg_fds(sock: socket.socket, data: bytes, fds: Sequence[int]) -> int:
    """One ``sendmsg`` of ``data`` with ``fds`` on its first byte; returns the bytes sent (a non-blocking socket
    may take only part, or raise BlockingIOError: the caller finishes the rest without fds)."""
    return sock.sendmsg([data], scm_rights(fds))


def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Blocking: all of ``data``, the fds riding on the first byte."""
    sent = sendmsg_fds(sock, data, fds)
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_with_fds(sock: socket.socket, n: int, max_fds: int, flags: int = 0) -> tuple[bytes, list[int], bool]:
    """One ``recvmsg`` of up to ``n`` bytes with room for ``max_fds`` fds: (data, fds, control data truncated)."""
    data, anc, msg_flags, _addr = sock.recvmsg(n, socket.CMSG_SPACE(max_fds * _INT), flags)
    return data, fds_from(anc), bool(msg_flags & socket.MSG_CTRUNC)
