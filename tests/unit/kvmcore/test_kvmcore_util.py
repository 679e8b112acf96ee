"""kvmcore.util: SCM_RIGHTS packing (one implementation for control socket and vhost-user), and the import
direction it exists for (pv and daemon reach shared helpers downwards, never sideways or up)."""

from __future__ import annotations

import ast
import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from kvmcore.util.fdpass import fds_from, recv_with_fds, scm_rights, send_with_fds  # noqa: E402


def test_fds_sent_with_data_arrive_as_new_fds_on_the_same_files() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        send_with_fds(a, b"hello", [r, w])
        data, fds, truncated = recv_with_fds(b, 64, 4)
        assert data == b"hello" and len(fds) == 2 and not truncated
        assert [os.fstat(fd).st_ino for fd in fds] == [os.fstat(r).st_ino, os.fstat(w).st_ino]
        for fd in fds:
            os.close(fd)
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_more_fds_than_the_receiver_made_room_for_is_reported_truncated() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        send_with_fds(a, b"x", [r, w, r])
        _, fds, truncated = recv_with_fds(b, 64, 1)
        assert truncated and len(fds) < 3  # CMSG_SPACE rounds up: at most the room, never all three
        for fd in fds:
            os.close(fd)
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_no_fds_means_no_control_message_and_partial_ints_are_ignored() -> None:
    assert scm_rights([]) == []
    (level, kind, data), = scm_rights([7, 9])
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    assert fds_from([(level, kind, data + b"\x01\x02")]) == [7, 9]
    assert fds_from([(socket.SOL_SOCKET, 99, data)]) == []


def _imports(package: str) -> set[str]:
    out: set[str] = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.add(node.module)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("package, forbidden", [
    ("kvmcore/util", ("kvmcore.kvm", "kvmcore._abi", "devices", "pv", "daemon", "guests")),
    ("pv", ("devices", "daemon", "guests")),
    ("daemon", ("guests",)),
])
def test_imports_point_down(package: str, forbidden: tuple[str, ...]) -> None:
    bad = sorted(m for m in _imports(package) if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert bad == []
