"""Escape attempts from inside the real jail, each run in a forked, jailed child (daemon.jail.run_jailed).

Most attacks are run twice: against the full jail (seccomp "dm") and against the jail without its seccomp
filter, to show which layer stops what. Where both layers answer with the same errno the test cannot tell
them apart, so the layer-only variant instead checks an observable the filter would hide (ENOENT, ESRCH...).
Calls the DM policy kills are checked by the process dying of SIGSYS *after* a marker written just before
the call, so the kill is attributable to that call.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import select
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import _jailsys as sys_
from daemon.jail import JailConfig, JailedResult, run_jailed, spawn_jailed

from ._workloads import KVM_CREATE_VM, KVM_GET_API_VERSION, dm_workload

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("spawn_mode")]  # fork and zygote (conftest.py)

Make = Callable[..., JailConfig]
SECCOMP_MODES = [pytest.param("dm", id="full-jail"), pytest.param(None, id="without-seccomp")]


def _errno_of(call: Callable[[], Any]) -> int | str:
    try:
        call()
    except OSError as e:
        return e.errno if e.errno is not None else repr(e)
    return "succeeded"


def _mark() -> None:
    os.write(2, b"reached\n")


def _assert_killed_after_mark(r: JailedResult) -> None:
    assert r.term_signal == signal.SIGSYS, r
    assert r.stderr.endswith("reached\n"), r.stderr


# --- filesystem --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/etc/shadow", "/etc/passwd", "/proc/self/status", "/dev/kvm"])
def test_host_files_cannot_be_opened(make_config: Make, path: str) -> None:
    r = run_jailed(lambda: _errno_of(lambda: os.open(path, os.O_RDONLY)), make_config())
    assert r.value == errno.EPERM, r


@pytest.mark.parametrize("path", ["/etc/passwd", "/proc/self/status", "/dev/kvm"])
def test_without_seccomp_the_empty_root_has_no_host_files(make_config: Make, path: str) -> None:
    r = run_jailed(lambda: _errno_of(lambda: os.open(path, os.O_RDONLY)), make_config(seccomp=None))
    assert r.value == errno.ENOENT, r


def test_listing_root_is_denied(make_config: Make) -> None:
    assert run_jailed(lambda: _errno_of(lambda: os.listdir("/")), make_config()).value == errno.EPERM


def test_without_seccomp_root_is_an_empty_tmpfs(make_config: Make) -> None:
    def fn() -> Any:
        st = os.statvfs("/")
        return {"entries": os.listdir("/"), "cwd": os.getcwd(), "ro": bool(st.f_flag & os.ST_RDONLY),
                "nosuid": bool(st.f_flag & os.ST_NOSUID), "blocks": st.f_blocks * st.f_frsize}

    r = run_jailed(fn, make_config(seccomp=None))
    assert r.value["entries"] == [] and r.value["cwd"] == "/"
    assert r.value["ro"] and r.value["nosuid"]
    assert r.value["blocks"] <= 64 * 1024


@pytest.mark.parametrize("seccomp,expected", [
    ("dm", [errno.EPERM] * 3),
    (None, [errno.EROFS, errno.ENOENT, errno.EROFS]),  # read-only root; there is no /tmp; ".." of / is /
])
def test_writing_a_file_fails_and_nothing_reaches_the_host(
    make_config: Make, jail_root: Path, seccomp: str | None, expected: list[int]
) -> None:
    def fn() -> Any:
        def write(path: str) -> Callable[[], int]:
            return lambda: open(path, "w").write("x")

        return [_errno_of(write(p)) for p in ("/x", "/tmp/escape", "../x")]

    r = run_jailed(fn, make_config(seccomp=seccomp))
    assert r.value == expected, r
    assert list(jail_root.iterdir()) == []


def test_mounts_do_not_leak_into_the_host_mount_table(make_config: Make, jail_root: Path) -> None:
    r = run_jailed(lambda: 0, make_config())
    assert r.ok, r
    with open("/proc/self/mountinfo") as f:
        assert str(jail_root) not in f.read()


# --- processes, signals, privileges ------------------------------------------------------------------------


def test_exec_kills_the_process(make_config: Make) -> None:
    def fn() -> None:
        _mark()
        os.execv("/bin/sh", ["sh", "-c", "id"])

    _assert_killed_after_mark(run_jailed(fn, make_config()))


def test_without_seccomp_exec_finds_no_binary(make_config: Make) -> None:
    r = run_jailed(lambda: _errno_of(lambda: os.execv("/bin/sh", ["sh"])), make_config(seccomp=None))
    assert r.value == errno.ENOENT


def test_ptrace_attach_to_the_parent_kills_the_process(make_config: Make) -> None:
    parent = os.getpid()

    def fn() -> None:
        _mark()
        sys_.raw_syscall(sys_.SYS_ptrace, 16, parent, 0, 0)  # PTRACE_ATTACH

    _assert_killed_after_mark(run_jailed(fn, make_config()))


def test_without_seccomp_the_parent_is_not_even_visible_to_ptrace(make_config: Make) -> None:
    parent = os.getpid()
    r = run_jailed(lambda: sys_.raw_syscall(sys_.SYS_ptrace, 16, parent, 0, 0), make_config(seccomp=None))
    assert r.value == -errno.ESRCH


def test_killing_the_daemon_is_denied(make_config: Make) -> None:
    parent = os.getpid()
    r = run_jailed(lambda: _errno_of(lambda: os.kill(parent, signal.SIGKILL)), make_config())
    assert r.value == errno.EPERM


@pytest.fixture
def nobody_process() -> Iterator[int]:
    """A host process running as the jail's own uid: the one a uid drop alone does not protect."""
    p = subprocess.Popen(["sleep", "60"], user=65534, group=65534)
    yield p.pid
    p.kill()
    p.wait()


def test_pid_namespace_hides_same_uid_host_processes(make_config: Make, nobody_process: int) -> None:
    r = run_jailed(lambda: _errno_of(lambda: os.kill(nobody_process, 0)), make_config(seccomp=None))
    assert r.value == errno.ESRCH


def test_control_without_pid_namespace_a_same_uid_process_is_reachable(
    make_config: Make, nobody_process: int
) -> None:
    # Proves the previous test can fail: only the pid namespace stands between the two.
    r = run_jailed(lambda: _errno_of(lambda: os.kill(nobody_process, 0)), make_config(seccomp=None, pid_ns=False))
    assert r.value == "succeeded"


@pytest.mark.parametrize("seccomp", ["dm", None])
def test_setuid_root_is_denied(make_config: Make, seccomp: str | None) -> None:
    def fn() -> Any:
        return [_errno_of(lambda: os.setuid(0)), _errno_of(lambda: os.setresgid(0, 0, 0)),
                _errno_of(lambda: os.setgroups([0]))]

    assert run_jailed(fn, make_config(seccomp=seccomp)).value == [errno.EPERM] * 3


def test_mount_kills_the_process(make_config: Make) -> None:
    def fn() -> None:
        _mark()
        sys_.mount("none", "/", "tmpfs", 0, None)

    _assert_killed_after_mark(run_jailed(fn, make_config()))


def test_without_seccomp_mount_fails_for_lack_of_capabilities(make_config: Make) -> None:
    r = run_jailed(lambda: _errno_of(lambda: sys_.mount("none", "/", "tmpfs", 0, None)), make_config(seccomp=None))
    assert r.value == errno.EPERM


def test_user_namespace_creation_kills_the_process(make_config: Make) -> None:
    def fn() -> None:
        _mark()
        sys_.raw_syscall(272, sys_.CLONE_NEWUSER)  # unshare

    _assert_killed_after_mark(run_jailed(fn, make_config()))


def test_control_without_seccomp_a_user_namespace_can_be_created(make_config: Make) -> None:
    # Unprivileged user namespaces are enabled on this host: only the filter stops this (see ENVIRONMENT.md).
    r = run_jailed(lambda: sys_.raw_syscall(272, sys_.CLONE_NEWUSER), make_config(seccomp=None))
    if r.value != 0:
        pytest.skip(f"this kernel refuses unprivileged user namespaces anyway (errno {-r.value})")
    assert r.value == 0


def test_clone_with_namespace_flags_is_denied_while_threads_still_start(make_config: Make) -> None:
    thread_flags = (sys_.CLONE_VM | sys_.CLONE_FS | sys_.CLONE_FILES | sys_.CLONE_SIGHAND | sys_.CLONE_THREAD)

    def fn() -> Any:
        out: dict[str, Any] = {}
        ret = sys_.raw_syscall(sys_.SYS_clone, sys_.CLONE_NEWNS | signal.SIGCHLD, 0, 0, 0, 0)
        if ret == 0:  # a filter that let this through would have forked us: the copy must vanish
            os._exit(0)
        out["clone_newns"] = ret
        # The kernel itself says EINVAL to NEWUSER|THREAD: EPERM proves the filter decided.
        out["clone_thread_newuser"] = sys_.raw_syscall(sys_.SYS_clone, thread_flags | sys_.CLONE_NEWUSER, 0, 0, 0, 0)
        out["clone_fork"] = _errno_of(os.fork)
        out["clone3"] = sys_.raw_syscall(sys_.SYS_clone3, 0, 0)
        got: list[int] = []
        ts = [threading.Thread(target=got.append, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(5)
        out["threads"] = sorted(got)
        return out

    v = run_jailed(fn, make_config()).value
    assert v == {"clone_newns": -errno.EPERM, "clone_thread_newuser": -errno.EPERM, "clone_fork": errno.EPERM,
                 "clone3": -errno.ENOSYS, "threads": list(range(8))}


def test_creating_sockets_is_denied(make_config: Make) -> None:
    def fn() -> Any:
        return [_errno_of(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)),
                _errno_of(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)),
                _errno_of(lambda: socket.socketpair())]

    assert run_jailed(fn, make_config()).value == [errno.EPERM] * 3


def test_without_seccomp_the_network_namespace_is_empty(make_config: Make) -> None:
    def fn() -> Any:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        return [_errno_of(lambda: s.connect(("127.0.0.1", 22))), socket.if_nameindex()]

    assert run_jailed(fn, make_config(seccomp=None)).value == [errno.ENETUNREACH, [[1, "lo"]]]


def test_executable_memory_is_denied(make_config: Make) -> None:
    def fn() -> Any:
        return [_errno_of(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)),
                len(mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE))]

    assert run_jailed(fn, make_config()).value == [errno.EPERM, 4096]
    assert run_jailed(fn, make_config(seccomp=None)).value == ["succeeded", 4096]  # control


def _foreign_abi_call(code: bytes) -> Callable[[], int]:
    """A callable running ``code`` from an RWX page mapped *before* the jail (the filter forbids new ones)."""
    page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    fn = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    fn.page = page  # type: ignore[attr-defined]  # keep the mapping alive
    return fn  # type: ignore[no-any-return]


I386_GETPID = b"\xb8\x14\x00\x00\x00\xcd\x80\xc3"  # mov eax, 20 ; int 0x80 ; ret
X32_GETPID = b"\xb8" + (0x40000000 + 39).to_bytes(4, "little") + b"\x0f\x05\xc3"  # mov eax, X32|39 ; syscall


@pytest.mark.parametrize("code", [pytest.param(I386_GETPID, id="i386-int80"), pytest.param(X32_GETPID, id="x32")])
def test_syscalls_through_another_abi_kill_the_process(make_config: Make, code: bytes) -> None:
    call = _foreign_abi_call(code)

    def fn() -> int:
        _mark()
        return call()

    _assert_killed_after_mark(run_jailed(fn, make_config()))


def test_control_without_seccomp_the_i386_syscall_table_is_reachable(make_config: Make) -> None:
    call = _foreign_abi_call(I386_GETPID)
    assert run_jailed(call, make_config(seccomp=None)).value == 1  # getpid() in the new pid namespace


def test_prctl_cannot_undo_the_jail(make_config: Make) -> None:
    def fn() -> Any:
        return [_errno_of(lambda: sys_.prctl(sys_.PR_SET_DUMPABLE, 1)),
                _errno_of(lambda: sys_.prctl(sys_.PR_SET_SECUREBITS, 0)),
                sys_.prctl(sys_.PR_GET_DUMPABLE)]

    assert run_jailed(fn, make_config()).value == [errno.EPERM, errno.EPERM, 0]


# --- what the jailed process is ----------------------------------------------------------------------------


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def test_proc_status_of_dm_and_keeper_shows_no_privileges(make_config: Make, spawn_mode: str) -> None:
    gate_r, gate_w = os.pipe()
    ready_r, ready_w = os.pipe()

    def fn() -> Any:
        os.write(ready_w, b"r")  # fully jailed by now: fn runs after the last step
        os.read(gate_r, 1)
        e, p, i = sys_.capget()
        return {"pid": os.getpid(), "caps": [e, p, i], "nnp": sys_.prctl(sys_.PR_GET_NO_NEW_PRIVS),
                "seccomp": sys_.prctl(sys_.PR_GET_SECCOMP), "dumpable": sys_.prctl(sys_.PR_GET_DUMPABLE),
                "ids": [os.getresuid(), os.getresgid(), os.getgroups()], "host": socket.gethostname()}

    proc = spawn_jailed(fn, make_config(keep_fds=[gate_r, ready_w]))
    try:
        assert select.select([ready_r], [], [], 10)[0], "jailed child never got ready"
        assert os.read(ready_r, 1) == b"r"
        dm = proc.dm_pid()
        statuses = {"dm": _status(dm), "keeper": _status(proc.pid)}  # the same process when the zygote made the ns
        nses = {name: {p: os.readlink(f"/proc/{p}/ns/{name}") for p in (dm, proc.pid, os.getpid())}
                for name in ("mnt", "net", "ipc", "uts", "pid", "cgroup")}
    finally:
        os.write(gate_w, b"x")
        r = proc.wait()
    for who, st in statuses.items():
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert st[cap] == "0000000000000000", (who, cap)
        assert (st["NoNewPrivs"], st["Seccomp"]) == ("1", "2"), who
        assert st["Uid"].split() == ["65534"] * 4 and st["Gid"].split() == ["65534"] * 4, who
        assert st["Groups"] == "", who
    assert statuses["dm"]["NSpid"].split() == [str(dm), "1"]
    if spawn_mode == "zygote":  # no keeper: the pid it spawned is the DM (daemon/jail.py step 10, pid_ns_ready)
        assert dm == proc.pid
    else:
        assert statuses["keeper"]["NSpid"].split() == [str(proc.pid)]
    for name, by_pid in nses.items():
        assert by_pid[dm] != by_pid[os.getpid()], name
        if name != "pid":  # the keeper shares the host pid namespace, nothing else
            assert by_pid[proc.pid] == by_pid[dm], name
    assert r.value == {"pid": 1, "caps": [0, 0, 0], "nnp": 1, "seccomp": 2, "dumpable": 0,
                       "ids": [[65534] * 3, [65534] * 3, []], "host": "kvmdm-jail"}


def test_only_kept_fds_survive_and_stdio_is_dev_null(make_config: Make) -> None:
    kept_r, kept_w = os.pipe()
    leaked_r, leaked_w = os.pipe()

    def fn() -> Any:
        def rdev(fd: int) -> int:
            return os.fstat(fd).st_rdev

        return {"stdin": rdev(0), "stdout": rdev(1), "kept": os.write(kept_w, b"k"),
                "leaked": [_errno_of(lambda: os.fstat(leaked_r)), _errno_of(lambda: os.fstat(leaked_w))]}

    r = run_jailed(fn, make_config(keep_fds=[kept_w]))
    devnull = os.makedev(1, 3)
    assert r.value == {"stdin": devnull, "stdout": devnull, "kept": 1, "leaked": [errno.EBADF, errno.EBADF]}
    assert os.read(kept_r, 1) == b"k"


def test_rlimits_are_applied(make_config: Make) -> None:
    import resource

    def fn() -> Any:
        return [list(resource.getrlimit(r)) for r in (resource.RLIMIT_CORE, resource.RLIMIT_FSIZE,
                                                      resource.RLIMIT_NOFILE, resource.RLIMIT_NPROC)]

    assert run_jailed(fn, make_config()).value == [[0, 0], [0, 0], [1024, 1024], [128, 128]]


# --- KVM through inherited fds -----------------------------------------------------------------------------


@pytest.mark.kvm
def test_inherited_kvm_fd_works_but_dev_kvm_cannot_be_reopened(make_config: Make, kvm_fd: int) -> None:
    def fn() -> Any:
        vm = fcntl.ioctl(kvm_fd, KVM_CREATE_VM, 0)
        return {"api": fcntl.ioctl(kvm_fd, KVM_GET_API_VERSION), "vm": vm > 2,
                "reopen": _errno_of(lambda: os.open("/dev/kvm", os.O_RDWR))}

    assert run_jailed(fn, make_config(keep_fds=[kvm_fd])).value == {"api": 12, "vm": True, "reopen": errno.EPERM}


@pytest.mark.kvm
def test_realistic_dm_workload_completes_in_the_jail(make_config: Make, kvm_fd: int) -> None:
    mem_size = 2 << 20
    memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(memfd, mem_size)
    daemon_end, dm_end = socket.socketpair()
    try:
        proc = spawn_jailed(lambda: dm_workload(kvm_fd, memfd, mem_size, dm_end.fileno()),
                            make_config(keep_fds=[kvm_fd, memfd, dm_end.fileno()]))
        dm_end.close()
        socket.send_fds(daemon_end, [b"ping"], [memfd])
        daemon_end.settimeout(20)
        msg, fds, _, _ = socket.recv_fds(daemon_end, 16, 1)
        r = proc.wait(30)
    finally:
        daemon_end.close()
    assert r.ok, r
    assert r.value == {"api_version": 12, "vm_fd_ok": True, "vcpu_run_mapped": True, "io_thread_saw": [7],
                       "done": 1, "workers": [0, 1, 2, 3], "ram": [1, 2, 3, 4], "ctl_msg": "ping"}
    assert msg == b"pong" and len(fds) == 1  # an eventfd travelled out of the jail over SCM_RIGHTS
    os.close(fds[0])
    with mmap.mmap(memfd, mem_size) as ram:  # the DM's writes landed in the shared guest RAM
        assert ram[0:4] == b"\xf4" * 4 and ram[64:68] == bytes([1, 2, 3, 4])
    os.close(memfd)
