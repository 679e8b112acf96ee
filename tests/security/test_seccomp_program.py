"""The jail installs the BPF program libseccomp exports, with one seccomp(2) call (daemon.seccomp_policy.install),
instead of seccomp_load, which regenerates the program each time. These tests load programs into the kernel, but
only in forked children that set no_new_privs themselves: no root needed, and the test process stays unfiltered."""

from __future__ import annotations

import errno
import os
import resource
import signal
from collections.abc import Callable

import pytest

from daemon import _jailsys as sys_
from daemon import seccomp_policy as sp
from daemon.seccomp_policy import ALWAYS, Policy, PolicyError

PARAMS = {"self_tgid": 1, "child_pid": 4242, "keeper_exec_fd": 5}
SYS_socket = 41
SYS_ptrace = 101
SYS_getpid = 39
SYS_getppid = 110
SYS_clone3 = 435


def _in_child(body: Callable[[], bytes]) -> tuple[bytes, int]:
    """Run ``body`` in a forked child with no_new_privs set; return what it wrote and its wait status."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            sys_.prctl(sys_.PR_SET_NO_NEW_PRIVS, 1)
            out = body()
            os.write(w, out)
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent as text
            try:
                os.write(w, f"raised {type(e).__name__}: {e}".encode())
            except OSError:
                pass
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return b"".join(chunks), status


@pytest.mark.parametrize("kind", ["dm", "backend", "keeper"])
def test_program_is_whole_instructions_within_the_kernel_limit_and_kept(kind: str) -> None:
    prog = sp.bpf_program(sp.policy_for(kind), PARAMS)
    assert len(prog) % sp.SOCK_FILTER_SIZE == 0
    assert 16 < len(prog) // sp.SOCK_FILTER_SIZE <= sp.BPF_MAXINSNS
    assert sp.bpf_program(sp.policy_for(kind), dict(PARAMS)) is prog  # kept per parameter set


def test_program_depends_on_the_parameters() -> None:
    pol = sp.policy_for("dm")
    assert sp.bpf_program(pol, {"self_tgid": 1}) != sp.bpf_program(pol, {"self_tgid": 77})


def test_kept_program_equals_a_fresh_export_of_the_compiled_filter() -> None:
    # An unnamed copy of the DM policy is neither cached nor found in the cache: a fresh compile and export.
    pol = sp.policy_for("dm")
    twin = Policy("dm-twin", pol.allow, pol.errno_for, pol.kill, pol.default_errno)
    assert sp.bpf_program(twin, {"self_tgid": 1}) == sp.bpf_program(pol, {"self_tgid": 1})


@pytest.mark.parametrize("prog", [b"", b"\0" * 7, b"\0" * 12, b"\0" * 8 * (sp.BPF_MAXINSNS + 1)])
def test_malformed_programs_are_refused_before_the_kernel_sees_them(prog: bytes) -> None:
    with pytest.raises(PolicyError, match="classic BPF"):
        sp.load_program(prog)


def test_kernel_refuses_an_invalid_program_with_an_oserror() -> None:
    # One instruction with an undefined opcode: the kernel's checker says EINVAL, and nothing is installed.
    def body() -> bytes:
        try:
            sp.load_program(b"\xff" * 8)
        except OSError as e:
            return f"errno {e.errno}; getppid {sys_.raw_syscall(SYS_getppid)}".encode()
        return b"loaded"

    out, status = _in_child(body)
    assert os.WIFEXITED(status), status
    assert out.startswith(f"errno {errno.EINVAL}; getppid ".encode()), out
    assert int(out.rsplit(b" ", 1)[1]) == os.getpid()


def test_installed_dm_program_denies_and_allows_as_the_policy_says() -> None:
    pol = sp.policy_for("dm")
    assert pol.action_for("socket") == errno.EPERM
    assert pol.action_for("clone3") == errno.ENOSYS
    assert pol.action_for("getpid") == "allow"

    def body() -> bytes:
        sp.install(pol, {"self_tgid": os.getpid()})
        return (f"socket {sys_.raw_syscall(SYS_socket, 1, 1, 0)} clone3 {sys_.raw_syscall(SYS_clone3, 0, 0)} "
                f"getpid {sys_.raw_syscall(SYS_getpid)}").encode()

    out, status = _in_child(body)
    assert os.WIFEXITED(status), (status, out)
    socket, clone3, getpid = out.split()[1::2]
    assert (int(socket), int(clone3)) == (-errno.EPERM, -errno.ENOSYS), out
    assert int(getpid) > 0, out


def test_installed_dm_program_kills_on_a_killed_syscall() -> None:
    pol = sp.policy_for("dm")
    assert pol.action_for("ptrace") == "kill"

    def body() -> bytes:
        sp.install(pol, {"self_tgid": os.getpid()})
        sys_.raw_syscall(SYS_ptrace, 0, 0, 0, 0)
        return b"survived ptrace"

    out, status = _in_child(body)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS, (status, out)
    assert out == b""


def test_without_no_new_privs_an_unprivileged_install_fails_and_installs_nothing() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            try:
                if os.geteuid() == 0:  # CAP_SYS_ADMIN would make no_new_privs unnecessary: give up root
                    os.setresgid(65534, 65534, 65534)
                    os.setresuid(65534, 65534, 65534)
                sp.install(Policy("tiny", {"exit_group": ALWAYS}))
                os.write(w, b"loaded")
            except OSError as e:
                os.write(w, f"errno {e.errno}".encode())
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 100)
    os.close(r)
    os.waitpid(pid, 0)
    assert out == f"errno {errno.EACCES}".encode()


def test_program_is_generated_under_the_jails_zero_file_size_limit() -> None:
    # The keeper generates its program (its parameters name the child) after the jail set RLIMIT_FSIZE to 0.
    def body() -> bytes:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        prog = sp.bpf_program(sp.policy_for("keeper"), {"child_pid": 99, "self_tgid": 98, "keeper_exec_fd": 3})
        return str(len(prog)).encode()

    out, status = _in_child(body)
    assert os.WIFEXITED(status), (status, out)
    assert int(out) == len(sp.bpf_program(sp.policy_for("keeper"),
                                          {"child_pid": 99, "self_tgid": 98, "keeper_exec_fd": 3})), out
