"""Unit tests of the seccomp policy data and builder (no root, nothing loaded into the kernel)."""

from __future__ import annotations

import errno

import pytest

from daemon import _jailsys as sys_
from daemon import seccomp_policy as sp
from daemon.seccomp_policy import ALWAYS, Arg, Policy, PolicyError, Rule

PARAMS = {"self_tgid": 1, "child_pid": 4242, "keeper_exec_fd": 5}
THREAD_FLAGS = (
    sys_.CLONE_VM | sys_.CLONE_FS | sys_.CLONE_FILES | sys_.CLONE_SIGHAND | sys_.CLONE_THREAD
    | sys_.CLONE_SYSVSEM | sys_.CLONE_SETTLS | sys_.CLONE_PARENT_SETTID | sys_.CLONE_CHILD_CLEARTID
)  # what glibc 2.36 pthread_create passes (strace of a jailed threading.Thread)
FORK_FLAGS = sys_.CLONE_CHILD_SETTID | sys_.CLONE_CHILD_CLEARTID | 17  # glibc fork(): ... | SIGCHLD


@pytest.mark.parametrize("kind", ["dm", "backend", "keeper"])
def test_every_policy_compiles_and_every_syscall_name_resolves(kind: str) -> None:
    pol = sp.policy_for(kind)
    sp.build_filter(pol, PARAMS)
    for name in [*pol.allow, *pol.errno_for, *pol.kill]:
        assert sp.syscall_number(name) >= 0


def test_unknown_policy_name_is_refused() -> None:
    with pytest.raises(PolicyError, match="no seccomp policy"):
        sp.policy_for("nope")


@pytest.mark.parametrize("name", [
    "ptrace", "mount", "umount2", "pivot_root", "setns", "unshare", "kexec_load", "init_module",
    "finit_module", "bpf", "execve", "execveat", "perf_event_open", "userfaultfd", "keyctl",
    "process_vm_readv", "open_by_handle_at", "iopl",
])
@pytest.mark.parametrize("kind", ["dm", "backend", "keeper"])
def test_dangerous_syscalls_kill_the_process_in_every_policy(kind: str, name: str) -> None:
    if (kind, name) == ("keeper", "execveat"):
        # Its one exec, of its own program's fd, is allowed; every other is EPERM (test below).
        assert sp.policy_for(kind).action_for(name, [9, 0, 0, 0, 0x1000], PARAMS) == errno.EPERM
        return
    assert sp.policy_for(kind).action_for(name) == "kill"


@pytest.mark.parametrize("name", ["open", "openat", "openat2", "socket", "socketpair", "connect", "bind",
                                  "kill", "tkill", "setuid", "setresuid", "fork", "vfork", "memfd_create",
                                  "getdents64", "io_uring_setup", "chdir", "fchdir", "symlink", "link"])
def test_unlisted_syscalls_get_eperm_in_the_dm_policy(name: str) -> None:
    assert sp.policy_for("dm").action_for(name) == errno.EPERM


def test_clone3_fails_with_enosys_so_glibc_falls_back_to_clone() -> None:
    for kind in ("dm", "backend", "keeper"):
        assert sp.policy_for(kind).action_for("clone3") == errno.ENOSYS


def test_clone_is_allowed_for_glibc_thread_creation() -> None:
    assert sp.policy_for("dm").action_for("clone", [THREAD_FLAGS]) == "allow"


@pytest.mark.parametrize("ns", [sys_.CLONE_NEWNS, sys_.CLONE_NEWUSER, sys_.CLONE_NEWPID, sys_.CLONE_NEWNET,
                                sys_.CLONE_NEWUTS, sys_.CLONE_NEWIPC, sys_.CLONE_NEWCGROUP])
def test_clone_with_any_namespace_flag_is_denied_even_with_thread_flags(ns: int) -> None:
    assert sp.policy_for("dm").action_for("clone", [THREAD_FLAGS | ns]) == errno.EPERM


@pytest.mark.parametrize("flags", [FORK_FLAGS, THREAD_FLAGS | sys_.CLONE_PTRACE, THREAD_FLAGS | sys_.CLONE_VFORK,
                                   THREAD_FLAGS & ~sys_.CLONE_VM, THREAD_FLAGS & ~sys_.CLONE_THREAD])
def test_clone_that_is_not_a_plain_thread_is_denied(flags: int) -> None:
    assert sp.policy_for("dm").action_for("clone", [flags]) == errno.EPERM


def test_keeper_cannot_create_threads_or_processes() -> None:
    assert sp.policy_for("keeper").action_for("clone", [THREAD_FLAGS]) == errno.EPERM


@pytest.mark.parametrize("cmd", [0xAE00, 0xAE01, 0xAE41, 0xAE80, 0x4020AE46, 0x4020AE76, 0xC008AE67])
def test_dm_may_issue_kvm_ioctls(cmd: int) -> None:
    assert sp.policy_for("dm").action_for("ioctl", [3, cmd]) == "allow"


@pytest.mark.parametrize("cmd", [sp.TIOCSTI, 0x5403, 0x541C, 0x4004AF01, 0x89F0, 0xAF00])
def test_dm_ioctls_outside_kvm_and_the_python_set_are_denied(cmd: int) -> None:
    # TIOCSTI injects keystrokes into a tty; 0x4004AF01 is VHOST_SET_OWNER; 0x89F0 SIOCDEVPRIVATE.
    assert sp.policy_for("dm").action_for("ioctl", [0, cmd]) == errno.EPERM


def test_backend_policy_has_no_kvm_ioctls_but_keeps_the_python_ones() -> None:
    pol = sp.policy_for("backend")
    assert pol.action_for("ioctl", [3, 0xAE01]) == errno.EPERM
    assert pol.action_for("ioctl", [3, sp.FIONBIO]) == "allow"


@pytest.mark.parametrize("sc", ["mmap", "mprotect"])
def test_executable_memory_is_denied(sc: str) -> None:
    pol = sp.policy_for("dm")
    assert pol.action_for(sc, [0, 4096, 0x1 | 0x2]) == "allow"
    assert pol.action_for(sc, [0, 4096, 0x1 | 0x4]) == errno.EPERM
    assert pol.action_for(sc, [0, 4096, 0x7]) == errno.EPERM


def test_tgkill_only_reaches_threads_of_the_own_process() -> None:
    pol = sp.policy_for("dm")
    assert pol.action_for("tgkill", [1, 5, 10], PARAMS) == "allow"
    assert pol.action_for("tgkill", [2, 5, 10], PARAMS) == errno.EPERM


def test_keeper_may_signal_and_wait_only_for_its_child_and_itself() -> None:
    pol = sp.policy_for("keeper")
    assert pol.action_for("kill", [4242, 15], PARAMS) == "allow"
    assert pol.action_for("kill", [1, 31], PARAMS) == "allow"
    assert pol.action_for("kill", [4243, 15], PARAMS) == errno.EPERM
    assert pol.action_for("kill", [0, 9], PARAMS) == errno.EPERM
    assert pol.action_for("kill", [(1 << 64) - 1, 9], PARAMS) == errno.EPERM  # kill(-1): everyone
    assert pol.action_for("wait4", [4242], PARAMS) == "allow"
    assert pol.action_for("wait4", [(1 << 64) - 1], PARAMS) == errno.EPERM
    for sc in ("read", "write", "openat", "ioctl", "socket"):
        assert pol.action_for(sc) == errno.EPERM


def test_keeper_may_exec_only_its_own_program_fd_and_only_make_itself_undumpable() -> None:
    pol = sp.policy_for("keeper")
    at_empty_path = 0x1000
    assert pol.action_for("execveat", [5, 0, 0, 0, at_empty_path], PARAMS) == "allow"
    assert pol.action_for("execveat", [6, 0, 0, 0, at_empty_path], PARAMS) == errno.EPERM  # another fd
    assert pol.action_for("execveat", [5, 0, 0, 0, 0], PARAMS) == errno.EPERM  # a path lookup under the fd
    assert pol.action_for("execveat", [(1 << 64) - 100, 0, 0, 0, at_empty_path], PARAMS) == errno.EPERM  # CWD
    assert pol.action_for("execve", [0, 0, 0]) == "kill"
    for sc in ("dup", "dup2", "dup3", "pipe2", "openat", "open", "memfd_create", "socket", "accept4"):
        assert pol.action_for(sc) != "allow", sc  # nothing makes an fd, so the exec fd cannot come back
    assert pol.action_for("prctl", [4, 0], PARAMS) == "allow"  # PR_SET_DUMPABLE 0
    assert pol.action_for("prctl", [4, 1], PARAMS) == errno.EPERM
    assert pol.action_for("prctl", [38, 0], PARAMS) == errno.EPERM  # PR_SET_NO_NEW_PRIVS and the rest
    with_none = {**PARAMS, "keeper_exec_fd": sp.NO_FD}
    assert pol.action_for("execveat", [5, 0, 0, 0, at_empty_path], with_none) == errno.EPERM


def test_fcntl_f_setown_is_denied_but_flag_handling_allowed() -> None:
    pol = sp.policy_for("dm")
    assert pol.action_for("fcntl", [3, 4, 0o4000]) == "allow"  # F_SETFL O_NONBLOCK
    assert pol.action_for("fcntl", [3, 8, 1]) == errno.EPERM  # F_SETOWN


def test_stat_is_allowed_on_fds_only() -> None:
    pol = sp.policy_for("dm")
    assert pol.action_for("newfstatat", [3, 0, 0, sp.AT_EMPTY_PATH]) == "allow"
    assert pol.action_for("newfstatat", [-100 & ((1 << 64) - 1), 0, 0, 0]) == errno.EPERM


def test_prctl_cannot_undo_jail_settings() -> None:
    pol = sp.policy_for("dm")
    assert pol.action_for("prctl", [sys_.PR_GET_NO_NEW_PRIVS]) == "allow"
    for opt in (sys_.PR_SET_DUMPABLE, sys_.PR_SET_SECUREBITS, sys_.PR_CAP_AMBIENT, sys_.PR_SET_PDEATHSIG, 22):
        assert pol.action_for("prctl", [opt, 1]) == errno.EPERM  # 22 = PR_SET_SECCOMP


def test_prlimit64_is_read_only() -> None:
    pol = sp.policy_for("dm")
    assert pol.action_for("prlimit64", [0, 7, 0, 0x1000]) == "allow"
    assert pol.action_for("prlimit64", [0, 7, 0x1000, 0]) == errno.EPERM
    assert pol.action_for("prlimit64", [99, 7, 0, 0x1000]) == errno.EPERM


def test_compiled_filter_kills_foreign_architectures() -> None:
    pfc = sp.export_pfc(sp.policy_for("dm"), PARAMS)
    assert "# invalid architecture action\naction KILL_PROCESS;" in pfc
    assert "# default action\n  action ERRNO(1);" in pfc


def test_building_without_a_needed_parameter_fails() -> None:
    with pytest.raises(PolicyError, match="self_tgid"):
        sp.build_filter(sp.policy_for("dm"))


def test_unknown_syscall_name_fails_at_build_time() -> None:
    with pytest.raises(PolicyError, match="no_such_call"):
        sp.build_filter(Policy("t", {"no_such_call": ALWAYS}))


def test_policy_refuses_a_syscall_in_two_action_classes() -> None:
    with pytest.raises(PolicyError, match="two action classes"):
        Policy("t", {"ptrace": ALWAYS}, kill=frozenset({"ptrace"}))
    with pytest.raises(PolicyError, match="two action classes"):
        Policy("t", {"clone3": ALWAYS}, errno_for={"clone3": errno.ENOSYS})


def test_policy_refuses_empty_rule_lists_and_bad_errnos() -> None:
    with pytest.raises(PolicyError, match="empty rule list"):
        Policy("t", {"read": ()})
    with pytest.raises(PolicyError, match="out of range"):
        Policy("t", {}, errno_for={"clone3": 0})
    with pytest.raises(PolicyError, match="out of range"):
        Policy("t", {}, default_errno=5000)


def test_arg_and_rule_validation() -> None:
    with pytest.raises(PolicyError, match="index"):
        Arg(6, "eq", 0)
    with pytest.raises(PolicyError, match="comparison"):
        Arg(0, "like", 0)  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="mask"):
        Arg(0, "masked_eq", 0)
    with pytest.raises(PolicyError, match="mask"):
        Arg(0, "eq", 0, mask=0xFF)
    with pytest.raises(PolicyError, match="at most once"):
        Rule((Arg(0, "ge", 1), Arg(0, "le", 5)))


def test_extend_ors_rules_for_the_same_syscall() -> None:
    base = Policy("b", {"ioctl": sp.arg_in(1, [1])})
    ext = base.extend("e", allow={"ioctl": sp.arg_in(1, [2])})
    assert ext.action_for("ioctl", [0, 1]) == "allow"
    assert ext.action_for("ioctl", [0, 2]) == "allow"
    assert base.action_for("ioctl", [0, 2]) == errno.EPERM
    assert ext.name == "e" and ext.kill == base.kill
