"""The DM zygote without /dev/kvm: its wire protocol (daemon.zygote_wire), and the real zygote loop and fork path
(daemon.zygote) driven by the daemon's client (daemon.supervision.forkserver), with a probe entry
(zygote_probe.py) that reports what a forked child was given instead of running a DM."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import zygote_wire as zw
from daemon.supervision.forkserver import ForkedDm, ForkServer, ZygoteError

PROBE = Path(__file__).resolve().parent / "zygote_probe.py"


# ------------------------------------------------------------------------------------------ wire protocol


@pytest.mark.parametrize("m, nfds", [
    (zw.Ready(123), 0),
    (zw.Spawn(7, ["--control-fd", "5", "--no-jail"], [5, 9, 12], 2), 3),
    (zw.Spawn(8, ["--control-fd", "5", "--jail-root", "/r"], [5], 0, pid_ns=True), 1),
    (zw.Spawned(7, 4242), 1),
    (zw.SpawnError(7, "fork: out of memory"), 0),
    (zw.Exited(4242, 0), 0),
    (zw.Exited(4242, -9), 0),
])
def test_every_message_decodes_to_what_was_encoded(m: zw.Message, nfds: int) -> None:
    assert zw.decode(zw.encode(m), nfds) == m


@pytest.mark.parametrize("raw, nfds, why", [
    (b"\xff\xfe", 0, "not JSON"),
    (b"[1, 2]", 0, "not an object"),
    (b'{"op": "fork"}', 0, "unknown zygote op"),
    (b'{"op": "ready"}', 0, "fields"),
    (b'{"op": "ready", "pid": 5, "extra": 1}', 0, "fields"),
    (b'{"op": "ready", "pid": true}', 0, "bad value"),
    (b'{"op": "ready", "pid": 1}', 0, "bad value"),  # pid 1 is never a zygote or a DM we forked
    (b'{"op": "exited", "pid": 9, "returncode": 300}', 0, "bad value"),
    (b'{"op": "spawn", "id": 1, "args": ["a\\u0000b"], "fds": [5], "log": 0, "pid_ns": false}', 1, "bad value"),
    (b'{"op": "spawn", "id": 1, "args": [], "fds": [2], "log": 0, "pid_ns": false}', 1, "bad value"),  # stdio is not a target
    (b'{"op": "spawn", "id": 1, "args": [], "fds": [5, 5], "log": 0, "pid_ns": false}', 2, "bad value"),
    (b'{"op": "spawn", "id": 1, "args": [], "fds": [], "log": 0, "pid_ns": false}', 0, "bad value"),
    (b'{"op": "spawn", "id": 1, "args": [], "fds": [5, 6], "log": 2, "pid_ns": false}', 2, "log index"),
    (b'{"op": "spawn", "id": 1, "args": [], "fds": [5, 6], "log": 0, "pid_ns": false}', 1, "came with 1 fds, expected 2"),
    (b'{"op": "spawn", "id": 1, "args": [], "fds": [5], "log": 0, "pid_ns": 1}', 1, "bad value"),  # a bool only
    (b'{"op": "spawn", "id": 1, "args": [], "fds": [5], "log": 0}', 1, "fields"),  # pid_ns is not optional
    (b'{"op": "spawned", "id": 1, "pid": 99}', 0, "came with 0 fds, expected 1"),
    (b'{"op": "exited", "pid": 99, "returncode": 0}', 1, "came with 1 fds, expected 0"),
    (b"{" + b" " * zw.MAX_MESSAGE + b"}", 0, "over"),
])
def test_malformed_messages_are_refused_with_the_reason(raw: bytes, nfds: int, why: str) -> None:
    with pytest.raises(zw.ZygoteProtocolError, match=why):
        zw.decode(raw, nfds)


# -------------------------------------------------------------------------------- the real zygote loop


@pytest.fixture
def server() -> Iterator[ForkServer]:
    fs = ForkServer(command=[sys.executable, str(PROBE)], ready_timeout=60)
    yield fs
    fs.close()


def _spawn(fs: ForkServer, tmp_path: Path, args: list[str], extra_fds: list[int] | None = None,
           name: str = "log", pid_ns: bool = False) -> tuple[ForkedDm, Path]:
    log = tmp_path / f"{name}.txt"
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        dm = fs.spawn(args, extra_fds or [], log_fd, pid_ns=pid_ns)
    finally:
        os.close(log_fd)
    return dm, log


def _report(log: Path) -> dict[str, object]:
    return json.loads(log.read_text().splitlines()[0])


def test_the_child_gets_exactly_its_fds_at_the_numbers_asked_and_the_log_as_stdout_and_stderr(
        server: ForkServer, tmp_path: Path) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    r2, w2 = os.pipe2(os.O_CLOEXEC)  # not passed: must not reach the child
    hi = os.dup2(w, 50, inheritable=False)
    try:
        dm, log = _spawn(server, tmp_path, ["--x", str(hi), "exit", "0"], [hi])
        assert server.wait_exit(dm, 30) == 0
        rep = _report(log)
        fds = rep["fds"]
        assert isinstance(fds, dict)
        assert sorted(int(k) for k in fds) == [0, 1, 2, hi], fds
        assert fds["0"] == "/dev/null"
        assert fds["1"] == fds["2"] == str(log)
        assert fds[str(hi)] == os.readlink(f"/proc/self/fd/{w}")  # the same pipe, not a copy of anything else
    finally:
        for fd in (r, w, r2, w2, hi):
            os.close(fd)
        os.close(dm.pidfd)


def test_the_child_is_reset_to_a_fresh_interpreters_state_in_its_own_session(server: ForkServer,
                                                                              tmp_path: Path) -> None:
    fresh = json.loads(subprocess.run([sys.executable, str(PROBE), "--dump-fresh-handlers"], check=True,
                                      capture_output=True, text=True).stdout)
    dm, log = _spawn(server, tmp_path, ["exit", "0"])
    assert server.wait_exit(dm, 30) == 0
    os.close(dm.pidfd)
    rep = _report(log)
    zpid = server.current.pid if server.current else None
    assert rep["handlers"] == fresh  # no SIGCHLD handler of the zygote's, SIGINT as Python sets it, ...
    assert rep["blocked"] == []
    assert rep["logging_handlers"] == 0  # the DM's main installs its own, on the new stderr
    assert rep["sid"] == rep["pid"] and rep["ppid"] == zpid
    assert rep["cwd"] == "/"
    assert rep["threads"] == 1
    # ps, the daemon's is_our_dm and the tests see a DM command line, not the zygote's
    assert rep["cmdline"] == [sys.executable, "-m", "daemon.dm", "exit", "0"]
    assert rep["argv"] == ["exit", "0"]


def test_two_children_do_not_share_their_random_state(server: ForkServer, tmp_path: Path) -> None:
    a, la = _spawn(server, tmp_path, ["exit", "0"], name="a")
    b, lb = _spawn(server, tmp_path, ["exit", "0"], name="b")
    assert server.wait_exit(a, 30) == 0 and server.wait_exit(b, 30) == 0
    for dm in (a, b):
        os.close(dm.pidfd)
    assert _report(la)["random"] != _report(lb)["random"]


@pytest.mark.parametrize("args, returncode", [(["exit", "0"], 0), (["exit", "3"], 3), (["exit", "4"], 4),
                                              (["signal", "SIGSEGV"], -signal.SIGSEGV),
                                              (["signal", "SIGKILL"], -signal.SIGKILL)])
def test_the_exit_status_is_reported_as_popen_would_and_the_pidfd_turns_readable(
        server: ForkServer, tmp_path: Path, args: list[str], returncode: int) -> None:
    dm, _log = _spawn(server, tmp_path, args)
    try:
        assert select.select([dm.pidfd], [], [], 30)[0] == [dm.pidfd]
        assert server.wait_exit(dm, 30) == returncode
        assert dm.returncode == returncode
    finally:
        os.close(dm.pidfd)


def _wait_report(log: Path) -> None:
    """Until the child runs its entry: it does once the zygote has told it "go" (after the daemon had its pidfd)."""
    for _ in range(3000):
        if log.read_text():
            return
        select.select([], [], [], 0.01)
    raise AssertionError("the child never reported")


def test_a_pidfd_signal_reaches_the_child(server: ForkServer, tmp_path: Path) -> None:
    dm, log = _spawn(server, tmp_path, ["sleep"])
    try:
        _wait_report(log)
        signal.pidfd_send_signal(dm.pidfd, signal.SIGTERM)
        assert server.wait_exit(dm, 30) == -signal.SIGTERM
    finally:
        os.close(dm.pidfd)


def test_a_killed_zygote_is_replaced_and_its_running_children_survive_with_status_unknown(
        server: ForkServer, tmp_path: Path) -> None:
    dm, log = _spawn(server, tmp_path, ["sleep"])
    old = server.current
    assert old is not None
    try:
        _wait_report(log)
        os.kill(old.pid, signal.SIGKILL)
        assert server.wait_exit(dm, 30) is None  # nobody can say how it will exit now
        assert not old.alive
        assert select.select([dm.pidfd], [], [], 0.2)[0] == []  # ... and it still runs
        nxt, log2 = _spawn(server, tmp_path, ["exit", "5"], name="next")
        assert server.current is not old and server.restarts == 1
        assert server.wait_exit(nxt, 30) == 5
        assert _report(log2)["ppid"] == server.current.pid
        os.close(nxt.pidfd)
    finally:
        signal.pidfd_send_signal(dm.pidfd, signal.SIGKILL)
        os.close(dm.pidfd)


def test_a_malformed_request_gets_an_error_reply_and_the_zygote_keeps_serving(server: ForkServer,
                                                                                tmp_path: Path) -> None:
    zy = server.ensure()
    zy.req.send(b'{"op": "spawn", "id": 1}')
    m = zw.decode(zy.req.recv(zw.MAX_MESSAGE))
    assert isinstance(m, zw.SpawnError) and "fields" in m.error
    dm, _log = _spawn(server, tmp_path, ["exit", "0"])
    assert server.wait_exit(dm, 30) == 0 and server.current is zy
    os.close(dm.pidfd)


def test_a_zygote_that_cannot_start_is_a_start_failure() -> None:
    fs = ForkServer(command=[sys.executable, "-c", "raise SystemExit(3)"], ready_timeout=30)
    with pytest.raises(ZygoteError, match="exited during startup"):
        fs.ensure()
    fs.close()


def test_the_zygote_closes_its_copies_of_a_childs_fds(server: ForkServer, tmp_path: Path) -> None:
    a, b = socket.socketpair()
    try:
        dm, _log = _spawn(server, tmp_path, ["exit", "0"], [a.fileno()])
        assert server.wait_exit(dm, 30) == 0
        os.close(dm.pidfd)
        a.close()
        b.settimeout(5)
        assert b.recv(1) == b""  # every copy of the other end is gone: the zygote kept none
        zy = server.current
        assert zy is not None
        links = [os.readlink(f"/proc/{zy.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{zy.pid}/fd")]
        assert len([x for x in links if x.startswith("socket:")]) == 2  # its two channels, nothing of a guest
    finally:
        b.close()


# ------------------------------------------------------------- children forked into their own pid namespace
#
# What kvmdmd asks for every jailed DM (daemon.zygote, ``pid_ns``; daemon/jail.py step 10): the child is pid 1 of
# a new pid namespace, so its jail forks no keeper and the pid the daemon holds is the DM's.


def _nspid(pid: int) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return line.split()[1:]
    raise AssertionError("no NSpid")


@pytest.mark.root
def test_pid_ns_children_are_pid_1_of_a_namespace_each_and_the_zygotes_next_children_are_in_its_own(
        server: ForkServer, tmp_path: Path) -> None:
    a, la = _spawn(server, tmp_path, ["sleep"], name="a", pid_ns=True)
    b, lb = _spawn(server, tmp_path, ["sleep"], name="b", pid_ns=True)
    c, lc = _spawn(server, tmp_path, ["sleep"], name="c")  # after two pid_ns forks: a plain child
    zy = server.current
    assert zy is not None
    try:
        for log in (la, lb, lc):
            _wait_report(log)
        ra, rb, rc = (_report(log) for log in (la, lb, lc))
        own = os.readlink("/proc/self/ns/pid")
        assert ra["pid"] == rb["pid"] == 1 and _nspid(a.pid) == [str(a.pid), "1"] and _nspid(b.pid) == [str(b.pid), "1"]
        assert ra["ppid"] == rb["ppid"] == 0  # the parent (the zygote) is in the parent namespace
        assert ra["sid"] == rb["sid"] == 1  # their own session
        assert len({ra["pid_ns"], rb["pid_ns"], own}) == 3  # two new namespaces, one each
        # The zygote's pid_for_children is its own namespace again: the plain child is in ours, not in a DM's.
        assert rc["pid_ns"] == own and rc["pid"] == c.pid and _nspid(c.pid) == [str(c.pid)]
        assert os.readlink(f"/proc/{zy.pid}/ns/pid_for_children") == os.readlink(f"/proc/{zy.pid}/ns/pid") == own
        assert Path(f"/proc/{a.pid}/task/{a.pid}/children").read_text() == ""
    finally:
        for dm in (a, b, c):
            signal.pidfd_send_signal(dm.pidfd, signal.SIGKILL)
    try:
        # SIGKILL from the daemon's namespace is forced on a namespace init: reported as Popen would.
        assert [server.wait_exit(dm, 30) for dm in (a, b, c)] == [-signal.SIGKILL] * 3
    finally:
        for dm in (a, b, c):
            os.close(dm.pidfd)


@pytest.mark.root
@pytest.mark.parametrize("args, returncode", [(["exit", "3"], 3), (["segv"], -signal.SIGSEGV),
                                              (["seccomp"], -signal.SIGSYS)])
def test_a_pid_1_childs_exit_status_and_fatal_signal_reach_the_daemon_as_popen_would(
        server: ForkServer, tmp_path: Path, args: list[str], returncode: int) -> None:
    dm, log = _spawn(server, tmp_path, args, pid_ns=True)
    try:
        assert server.wait_exit(dm, 30) == returncode
        assert _report(log)["pid"] == 1
    finally:
        os.close(dm.pidfd)


@pytest.mark.root
def test_an_unhandled_sigterm_to_a_pid_1_child_is_dropped_by_the_kernel(server: ForkServer,
                                                                        tmp_path: Path) -> None:
    # pid_namespaces(7): from an ancestor namespace only signals the init has a handler for, and SIGKILL/SIGSTOP,
    # are delivered. (A plain child dies of it: test_a_pidfd_signal_reaches_the_child.)
    dm, log = _spawn(server, tmp_path, ["sleep"], pid_ns=True)
    try:
        _wait_report(log)
        signal.pidfd_send_signal(dm.pidfd, signal.SIGTERM)
        assert select.select([dm.pidfd], [], [], 0.5)[0] == []  # still running
        signal.pidfd_send_signal(dm.pidfd, signal.SIGKILL)
        assert server.wait_exit(dm, 30) == -signal.SIGKILL
    finally:
        os.close(dm.pidfd)


@pytest.mark.root
def test_a_killed_zygotes_pid_1_children_live_on(server: ForkServer, tmp_path: Path) -> None:
    dm, log = _spawn(server, tmp_path, ["sleep"], pid_ns=True)
    old = server.current
    assert old is not None
    try:
        _wait_report(log)
        os.kill(old.pid, signal.SIGKILL)
        assert server.wait_exit(dm, 30) is None  # status unknown, as for a plain child
        assert select.select([dm.pidfd], [], [], 0.2)[0] == []  # no PDEATHSIG tied it to the zygote
        nxt, log2 = _spawn(server, tmp_path, ["exit", "0"], name="next", pid_ns=True)
        assert server.wait_exit(nxt, 30) == 0 and _report(log2)["pid"] == 1
        os.close(nxt.pidfd)
    finally:
        signal.pidfd_send_signal(dm.pidfd, signal.SIGKILL)
        os.close(dm.pidfd)


@pytest.mark.root
def test_a_zygote_that_cannot_restore_its_pid_for_children_refuses_the_spawn_and_exits(tmp_path: Path) -> None:
    # Its next plain child would land in the DM's namespace: it must not fork again (the daemon starts another).
    from daemon import _jailsys, zygote
    from kvmcore.util.fdpass import recv_with_fds, send_with_fds

    req, req_z = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ev, ev_z = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    zpid = os.fork()
    if zpid == 0:
        code = 70
        try:
            def broken_setns(fd: int, nstype: int) -> None:
                raise OSError(22, "setns: Invalid argument (test)")

            _jailsys.setns = broken_setns  # type: ignore[assignment]
            code = zygote.Zygote(req_z, ev_z, lambda _args: 0).serve()
        finally:
            os._exit(code)
    req_z.close()
    ev_z.close()
    log_fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        req.settimeout(30)
        assert isinstance(zw.decode(req.recv(zw.MAX_MESSAGE)), zw.Ready)
        send_with_fds(req, zw.encode(zw.Spawn(1, [], [5], 0, pid_ns=True)), [log_fd])
        data, fds, _ = recv_with_fds(req, zw.MAX_MESSAGE, 1)
        m = zw.decode(data, len(fds))
        assert isinstance(m, zw.SpawnError) and "pid_for_children" in m.error, m
        _, status = os.waitpid(zpid, 0)
        assert os.waitstatus_to_exitcode(status) == 1
    finally:
        os.close(log_fd)
        for s_ in (req, ev):
            s_.close()
