"""Seccomp allowlists for kvmdm's jailed processes: one policy per process type over a shared base.

Shape borrowed from crosvm (``jail/seccomp/x86_64/common_device.policy`` + one ``*_device.policy`` per device)
and Firecracker's seccompiler (filters per thread/process type, installed as the very last jail step). Policies
are plain data (:class:`Policy`); :func:`build_filter` turns one into a libseccomp filter. Unit tests read the
data without loading anything; tests/security load the filters in forked children and attack them.

Actions, and why:

* **Allowed**: what a Python 3.11 process needs to run threads, eventfds, epoll/poll, KVM ioctls on inherited
  fds, mmap of an inherited memfd, and socket I/O on an inherited unix socket. Verified by running the DM
  workload in the jail under ``strace -f`` (see tests/security/test_jail_escape.py::test_realistic_dm_workload*).
* **Default: ERRNO(EPERM)**. An unforeseen but benign call (a lazy ``stat`` from importlib, ``getdents`` from a
  traceback formatter, ``open`` of a source file by linecache) becomes an ``OSError`` that the DM logs; a guest
  able to steer the DM into such a path cannot turn it into a crash of the whole VM.
* **KILL_PROCESS** for calls that no correct DM ever makes and that exploits need (ptrace, mount family,
  namespaces, exec, module/kexec loading, bpf, perf, keyrings, userfaultfd, handle-based opens, iopl). A probing
  exploit gets one try; the daemon sees the DM die of SIGSYS and can report a seccomp violation instead of
  the exploit silently learning which calls fail with EPERM.
* **clone3: ERRNO(ENOSYS)**. clone3 passes its flags in memory, which seccomp cannot read, so it can never be
  checked. glibc 2.34+ ``__clone_internal`` tries clone3 first and falls back to clone(2) only when clone3
  fails with ENOSYS (EPERM would make pthread_create fail), so ENOSYS keeps threads working and moves every
  thread creation to clone(2), whose flags register *is* checked: it must carry CLONE_THREAD|CLONE_VM|
  CLONE_SIGHAND|CLONE_FS|CLONE_FILES and no CLONE_NEW*, CLONE_PTRACE or CLONE_VFORK bit. (Chromium's sandbox
  does the same: "Linux sandbox: return ENOSYS for clone3".)
* **Non-native architectures: KILL_PROCESS** (SCMP_FLTATR_ACT_BADARCH). ``int $0x80`` (i386 table) and x32
  syscall numbers would otherwise index a different syscall table than the one this allowlist names.

``mmap``/``mprotect`` refuse PROT_EXEC (as crosvm's common policy does): the DM never maps new code after
entering the jail, so writable-then-executable memory is exactly what an exploit would ask for.
``ioctl`` is limited to the KVM ioctl type (0xAE, ``Documentation/virt/kvm/api.rst`` §4: "ioctl type 0xAE"),
the few tty/fd ioctls CPython issues (TCGETS from isatty, FIONBIO from socket.setblocking, FIOCLEX/FIONCLEX
from os.set_inheritable, FIONREAD) and the TUN ioctls a virtio-net backend needs on a passed-in tap fd.
TIOCSTI (the tty-injection ioctl) is deliberately absent.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import pyseccomp

from daemon import _jailsys as sys_

Op = Literal["eq", "ne", "masked_eq", "lt", "le", "gt", "ge"]

_OPS: Mapping[str, int] = {
    "eq": pyseccomp.EQ,
    "ne": pyseccomp.NE,
    "masked_eq": pyseccomp.MASKED_EQ,
    "lt": pyseccomp.LT,
    "le": pyseccomp.LE,
    "gt": pyseccomp.GT,
    "ge": pyseccomp.GE,
}


class PolicyError(ValueError):
    """A policy is malformed (unknown syscall, one syscall in two action classes, unresolved parameter)."""


@dataclass(frozen=True)
class Param:
    """An argument value only known when the filter is built (e.g. the jailed process's own tgid)."""

    name: str


SELF_TGID = Param("self_tgid")
CHILD_PID = Param("child_pid")
KEEPER_EXEC_FD = Param("keeper_exec_fd")
NO_FD = 0x7FFFFFFF  # a keeper_exec_fd that matches no fd (RLIMIT_NOFILE is far below it): no exec at all


@dataclass(frozen=True)
class Arg:
    """One comparison on syscall argument ``index`` (0-based). For ``masked_eq``: ``(arg & mask) == value``."""

    index: int
    op: Op
    value: int | Param
    mask: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.index <= 5:
            raise PolicyError(f"argument index {self.index} out of range 0..5")
        if self.op not in _OPS:
            raise PolicyError(f"unknown comparison {self.op!r}")
        if (self.op == "masked_eq") != (self.mask != 0):
            raise PolicyError("mask is required for masked_eq and meaningless otherwise")


@dataclass(frozen=True)
class Rule:
    """A conjunction of argument comparisons; a syscall is allowed if any of its rules matches.

    ``Rule()`` (no comparisons) allows the syscall unconditionally. libseccomp accepts one comparison per
    argument per rule, which :func:`build_filter` relies on; a second comparison on the same argument is refused.
    """

    args: tuple[Arg, ...] = ()

    def __post_init__(self) -> None:
        idx = [a.index for a in self.args]
        if len(idx) != len(set(idx)):
            raise PolicyError("a rule may compare each argument at most once (libseccomp limitation)")


ALWAYS = (Rule(),)


def arg_in(index: int, values: Iterable[int]) -> tuple[Rule, ...]:
    """Rules allowing the syscall when argument ``index`` equals one of ``values``."""
    return tuple(Rule((Arg(index, "eq", v),)) for v in values)


@dataclass(frozen=True)
class Policy:
    """An allowlist: ``allow`` maps syscall name to rules (OR of ANDs); everything else gets ``default_errno``."""

    name: str
    allow: Mapping[str, tuple[Rule, ...]]
    errno_for: Mapping[str, int] = field(default_factory=dict)
    kill: frozenset[str] = frozenset()
    default_errno: int = errno.EPERM

    def __post_init__(self) -> None:
        for sc, rules in self.allow.items():
            if not rules:
                raise PolicyError(f"{self.name}: {sc} has an empty rule list (use ALWAYS)")
        classes = [set(self.allow), set(self.errno_for), set(self.kill)]
        for i, a in enumerate(classes):
            for b in classes[i + 1:]:
                both = a & b
                if both:
                    raise PolicyError(f"{self.name}: {sorted(both)} in two action classes")
        for sc, e in self.errno_for.items():
            if not 0 < e < 4096:
                raise PolicyError(f"{self.name}: errno {e} for {sc} out of range")
        if not 0 < self.default_errno < 4096:
            raise PolicyError(f"{self.name}: default errno {self.default_errno} out of range")
        object.__setattr__(self, "allow", MappingProxyType(dict(self.allow)))
        object.__setattr__(self, "errno_for", MappingProxyType(dict(self.errno_for)))

    def extend(
        self,
        name: str,
        allow: Mapping[str, tuple[Rule, ...]] | None = None,
        errno_for: Mapping[str, int] | None = None,
    ) -> Policy:
        """A new policy: this one plus more rules (rules for a syscall already present are OR-ed in)."""
        merged = {k: tuple(v) for k, v in self.allow.items()}
        for sc, rules in (allow or {}).items():
            merged[sc] = merged.get(sc, ()) + tuple(rules)
        return Policy(name, merged, {**self.errno_for, **(errno_for or {})}, self.kill, self.default_errno)

    def is_unconditional(self, syscall: str) -> bool:
        return any(not r.args for r in self.allow.get(syscall, ()))

    def action_for(
        self, syscall: str, args: Sequence[int] = (), params: Mapping[str, int] | None = None
    ) -> str | int:
        """What the compiled filter does for this call: ``"allow"``, ``"kill"`` or an errno number.

        A pure-Python reading of the same data :func:`build_filter` compiles, so unit tests can check rules
        without loading a filter; tests/security check that the kernel agrees on samples.
        """
        if syscall in self.kill:
            return "kill"
        if syscall in self.errno_for:
            return self.errno_for[syscall]
        full = [a & _U64 for a in args] + [0] * (6 - len(args))
        for rule in self.allow.get(syscall, ()):
            if all(_compare(full[a.index], a, params or {}) for a in rule.args):
                return "allow"
        return self.default_errno


_U64 = (1 << 64) - 1


def _compare(value: int, a: Arg, params: Mapping[str, int]) -> bool:
    ref = _resolve(a.value, params) & _U64
    if a.op == "masked_eq":
        return (value & a.mask) == ref
    return {
        "eq": value == ref, "ne": value != ref, "lt": value < ref,
        "le": value <= ref, "gt": value > ref, "ge": value >= ref,
    }[a.op]


# --- constants the rules compare against -------------------------------------------------------------------
PROT_EXEC = 0x4
AT_EMPTY_PATH = 0x1000
_F_DUPFD, _F_GETFD, _F_SETFD, _F_GETFL, _F_SETFL = 0, 1, 2, 3, 4
_F_DUPFD_CLOEXEC, _F_ADD_SEALS, _F_GET_SEALS = 1030, 1033, 1034
# <asm-generic/ioctls.h>
TCGETS = 0x5401
FIONREAD = 0x541B
FIONBIO = 0x5421
FIONCLEX = 0x5450
FIOCLEX = 0x5451
TIOCSTI = 0x5412  # never allowed; named so the tests can prove it
# <linux/if_tun.h>, the ioctls a virtio-net backend issues on an already-attached tap fd (no CAP_NET_ADMIN).
TUNGETFEATURES = 0x800454CF
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
TUNSETSNDBUF = 0x400454D4
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8
TUNSETVNETLE = 0x400454DC
TUNGETVNETLE = 0x800454DD
KVM_IOCTL_TYPE = 0xAE  # Documentation/virt/kvm/api.rst: all KVM ioctls use type 0xAE

_THREAD_CLONE_FLAGS = sys_.CLONE_THREAD | sys_.CLONE_VM | sys_.CLONE_SIGHAND | sys_.CLONE_FS | sys_.CLONE_FILES
_CLONE_CHECKED_BITS = _THREAD_CLONE_FLAGS | sys_.CLONE_NEW_ALL | sys_.CLONE_PTRACE | sys_.CLONE_VFORK
# x86_64 clone(2) argument order: (flags, stack, parent_tid, child_tid, tls) -> flags is arg0.
_CLONE_THREAD_ONLY = (Rule((Arg(0, "masked_eq", _THREAD_CLONE_FLAGS, _CLONE_CHECKED_BITS),)),)

# Syscalls killed on sight in every policy (see module docstring).
KILL_ALWAYS: frozenset[str] = frozenset({
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig",
    "fspick", "mount_setattr",
    "setns", "unshare",
    "execve", "execveat",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "userfaultfd",
    "open_by_handle_at", "name_to_handle_at", "iopl", "ioperm", "reboot", "swapon", "swapoff", "acct",
    "quotactl", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
})

# Shared by every jailed process type: memory, synchronisation, time, signals, exit, identity reads.
_CORE: dict[str, tuple[Rule, ...]] = {
    "brk": ALWAYS,
    "mmap": (Rule((Arg(2, "masked_eq", 0, PROT_EXEC),)),),
    "mprotect": (Rule((Arg(2, "masked_eq", 0, PROT_EXEC),)),),
    "munmap": ALWAYS,
    "mremap": ALWAYS,
    "madvise": ALWAYS,
    "futex": ALWAYS,
    "set_robust_list": ALWAYS,
    "rseq": ALWAYS,
    "restart_syscall": ALWAYS,
    "sched_yield": ALWAYS,
    "clock_gettime": ALWAYS,
    "clock_getres": ALWAYS,
    "gettimeofday": ALWAYS,
    "nanosleep": ALWAYS,
    "clock_nanosleep": ALWAYS,
    "rt_sigaction": ALWAYS,
    "rt_sigprocmask": ALWAYS,
    "rt_sigreturn": ALWAYS,
    "rt_sigtimedwait": ALWAYS,
    "rt_sigpending": ALWAYS,
    "sigaltstack": ALWAYS,
    # Signals only to threads of this process (vCPU kicks via pthread_kill, raise()); kill(2) stays denied so
    # neither a pid nor a process group (kill(0, ...)) outside the process can be reached.
    "tgkill": (Rule((Arg(0, "eq", SELF_TGID),)),),
    "exit": ALWAYS,
    "exit_group": ALWAYS,
    "getpid": ALWAYS,
    "gettid": ALWAYS,
    "getuid": ALWAYS,
    "geteuid": ALWAYS,
    "getgid": ALWAYS,
    "getegid": ALWAYS,
    "getresuid": ALWAYS,
    "getresgid": ALWAYS,
    "getgroups": ALWAYS,
    "getrusage": ALWAYS,  # the DM's own resource usage for its stats reply; reveals nothing outside the jail
    "close": ALWAYS,
}

# Everything a Python device process uses on fds it already holds.
_BASE: dict[str, tuple[Rule, ...]] = {
    **_CORE,
    "read": ALWAYS,
    "write": ALWAYS,
    "readv": ALWAYS,
    "writev": ALWAYS,
    "pread64": ALWAYS,
    "pwrite64": ALWAYS,
    "preadv": ALWAYS,
    "pwritev": ALWAYS,
    "preadv2": ALWAYS,
    "pwritev2": ALWAYS,
    "lseek": ALWAYS,
    "close_range": ALWAYS,
    "dup": ALWAYS,
    "dup2": ALWAYS,
    "dup3": ALWAYS,
    # F_SETOWN/F_SETSIG (direct SIGIO at another pid) and the lock commands are not needed.
    "fcntl": arg_in(1, (_F_DUPFD, _F_GETFD, _F_SETFD, _F_GETFL, _F_SETFL, _F_DUPFD_CLOEXEC, _F_ADD_SEALS,
                        _F_GET_SEALS)),
    "fstat": ALWAYS,
    # glibc 2.33+ implements fstat() as fstatat(fd, "", AT_EMPTY_PATH): allow that form, not path lookups.
    "newfstatat": (Rule((Arg(3, "masked_eq", AT_EMPTY_PATH, AT_EMPTY_PATH),)),),
    "ioctl": arg_in(1, (TCGETS, FIONREAD, FIONBIO, FIONCLEX, FIOCLEX)),
    "poll": ALWAYS,
    "ppoll": ALWAYS,
    "select": ALWAYS,
    "pselect6": ALWAYS,
    "epoll_create1": ALWAYS,
    "epoll_ctl": ALWAYS,
    "epoll_wait": ALWAYS,
    "epoll_pwait": ALWAYS,
    "epoll_pwait2": ALWAYS,
    "eventfd2": ALWAYS,
    "pipe2": ALWAYS,
    "timerfd_create": ALWAYS,
    "timerfd_settime": ALWAYS,
    "timerfd_gettime": ALWAYS,
    "getrandom": ALWAYS,
    "getcwd": ALWAYS,
    "uname": ALWAYS,
    "sched_getaffinity": ALWAYS,
    # Read-only prctls only (and PR_SET_NAME for thread names); PR_SET_DUMPABLE, PR_SET_SECUREBITS & co. stay
    # denied so the jail's own settings cannot be undone.
    "prctl": arg_in(0, (sys_.PR_GET_DUMPABLE, sys_.PR_SET_NAME, sys_.PR_GET_NAME, sys_.PR_GET_SECCOMP,
                        sys_.PR_CAPBSET_READ, sys_.PR_GET_SECUREBITS, sys_.PR_GET_NO_NEW_PRIVS)),
    "capget": ALWAYS,
    # getrlimit-style reads only: pid 0 (self) and new_limit == NULL.
    "prlimit64": (Rule((Arg(0, "eq", 0), Arg(2, "eq", 0))),),
    "clone": _CLONE_THREAD_ONLY,
}

# I/O on an inherited, already-connected unix socket (daemon control channel, vhost-user); no socket(),
# socketpair(), connect(), bind() or listen(): every socket is passed in.
_SOCKET_IO: dict[str, tuple[Rule, ...]] = {
    "recvmsg": ALWAYS,
    "sendmsg": ALWAYS,
    "recvfrom": ALWAYS,
    "sendto": ALWAYS,
    "accept4": ALWAYS,
    "shutdown": ALWAYS,
    "getsockopt": ALWAYS,
    "getsockname": ALWAYS,
    "getpeername": ALWAYS,
}

# Writable disk images passed in as fds.
_BLOCK_IO: dict[str, tuple[Rule, ...]] = {
    "fsync": ALWAYS,
    "fdatasync": ALWAYS,
    "fallocate": ALWAYS,
}

_CLONE3_ENOSYS = {"clone3": errno.ENOSYS}

BASE_POLICY = Policy("base", _BASE, _CLONE3_ENOSYS, KILL_ALWAYS)

DM_POLICY = BASE_POLICY.extend(
    "dm",
    allow={
        **_SOCKET_IO,
        **_BLOCK_IO,
        # Any KVM ioctl on any fd: (cmd & 0xff00) == 0xae00. The kernel truncates cmd to 32 bits and the type
        # lives in bits 8..15, so this matches the kernel's own view of the number.
        "ioctl": (Rule((Arg(1, "masked_eq", KVM_IOCTL_TYPE << 8, 0xFF00),)),)
        + arg_in(1, (TUNGETFEATURES, TUNGETIFF, TUNSETOFFLOAD, TUNSETSNDBUF, TUNGETVNETHDRSZ,
                     TUNSETVNETHDRSZ, TUNSETVNETLE, TUNGETVNETLE)),
    },
)

# Out-of-DM virtio backends (kvmdm-backend, vhost-user): no KVM; socket + block I/O on passed fds, mmap of the
# front-end's memory fds (already in _CORE, never PROT_EXEC), and the TUN ioctls pv.net issues on an attached tap
# fd at activate/reset (TUNSETOFFLOAD follows the driver's offload features; the rest are reads / header size).
BACKEND_POLICY = BASE_POLICY.extend(
    "backend",
    allow={
        **_SOCKET_IO,
        **_BLOCK_IO,
        "ioctl": arg_in(1, (TUNGETFEATURES, TUNGETIFF, TUNSETOFFLOAD, TUNGETVNETHDRSZ, TUNSETVNETHDRSZ,
                            TUNSETVNETLE, TUNGETVNETLE)),
    },
)

# The pid-namespace keeper (see daemon.jail): waits for its one child, forwards signals to it, re-raises the
# child's fatal signal on itself. Nothing else, not even read/write. Its one exec is of its own program
# (daemon/keeper.c) through the close-on-exec fd the jail opened for it (execveat(fd, "", AT_EMPTY_PATH); a
# non-empty path under a file's fd fails with ENOTDIR): once that exec has closed the fd, and with no syscall
# that makes an fd, nothing can be exec'd again. The program makes itself non-dumpable (exec resets it).
KEEPER_POLICY = Policy(
    "keeper",
    {
        **_CORE,
        "wait4": (Rule((Arg(0, "eq", CHILD_PID),)),),
        "kill": (Rule((Arg(0, "eq", CHILD_PID),)), Rule((Arg(0, "eq", SELF_TGID),))),
        "execveat": (Rule((Arg(0, "eq", KEEPER_EXEC_FD), Arg(4, "eq", AT_EMPTY_PATH))),),
        "prctl": (Rule((Arg(0, "eq", sys_.PR_SET_DUMPABLE), Arg(1, "eq", 0))),),
    },
    _CLONE3_ENOSYS,
    KILL_ALWAYS - {"execveat"},
)

_POLICIES: Mapping[str, Policy] = MappingProxyType(
    {p.name: p for p in (DM_POLICY, BACKEND_POLICY, KEEPER_POLICY)}
)

POLICY_NAMES: frozenset[str] = frozenset(_POLICIES)


def policy_for(kind: str) -> Policy:
    """The policy for a jailed process type: ``"dm"``, ``"backend"`` (placeholder) or ``"keeper"``."""
    try:
        return _POLICIES[kind]
    except KeyError:
        raise PolicyError(f"no seccomp policy named {kind!r} (known: {sorted(_POLICIES)})") from None


def syscall_number(name: str) -> int:
    """The native (x86_64) number of ``name``; PolicyError if libseccomp does not know it."""
    nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    if nr < 0:
        raise PolicyError(f"unknown syscall {name!r}")
    return nr


def _resolve(value: int | Param, params: Mapping[str, int]) -> int:
    if isinstance(value, Param):
        if value.name not in params:
            raise PolicyError(f"policy needs parameter {value.name!r}")
        return params[value.name]
    return value


# Compiled filters of the named policies, per parameter set. Compiling the DM policy costs ~1.5 ms of CPU and
# dirties ~1 MiB of heap; the jail compiles it twice (the check of step 0 and the filter of step 11, both with
# self_tgid 1 in a pid namespace), and a DM forked by the zygote (daemon.zygote) finds it compiled by the zygote,
# in memory it shares. A compiled filter is only data: libseccomp generates the BPF from it again on every
# ``seccomp_load`` (another ~1 ms and ~200 copy-on-write faults in a forked DM), so the jail installs the
# program :func:`bpf_program` generated once instead (:func:`install`).
_Key = tuple[str, tuple[tuple[str, int], ...]]
_COMPILED: dict[_Key, pyseccomp.SyscallFilter] = {}
_PROGRAMS: dict[_Key, bytes] = {}
_COMPILED_MAX = 8
SOCK_FILTER_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
BPF_MAXINSNS = 4096  # the kernel's limit on a classic BPF program


def build_filter(policy: Policy, params: Mapping[str, int] | None = None) -> pyseccomp.SyscallFilter:
    """Compile ``policy`` into a libseccomp filter (not loaded). ``params`` fills :class:`Param` values.
    Filters of the named policies (:func:`policy_for`) are compiled once per process and parameter set; load
    the result, never change it."""
    if sys.platform != "linux" or pyseccomp.system_arch() != pyseccomp.Arch.X86_64:
        raise PolicyError("policies are written for x86_64 Linux")
    params = params or {}
    key = (policy.name, tuple(sorted(params.items())))
    named = _POLICIES.get(policy.name) is policy
    if named and key in _COMPILED:
        return _COMPILED[key]
    filt = _compile(policy, params)
    if named and len(_COMPILED) < _COMPILED_MAX:
        _COMPILED[key] = filt
    return filt


def bpf_program(policy: Policy, params: Mapping[str, int] | None = None) -> bytes:
    """The classic BPF program of ``build_filter(policy, params)`` as seccomp_export_bpf(3) writes it: the program
    seccomp_load(3) would generate and install (libseccomp 2.5 builds both with the same generator, and asks the
    kernel for no filter flags unless TSYNC, LOG, SSB or a notify action is set, which no policy here does). The
    programs of named policies are kept per process and parameter set, like their filters."""
    params = params or {}
    key = (policy.name, tuple(sorted(params.items())))
    named = _POLICIES.get(policy.name) is policy
    if named and key in _PROGRAMS:
        return _PROGRAMS[key]
    filt = build_filter(policy, params)
    # A pipe, not a file: the jail has set RLIMIT_FSIZE to 0 when the keeper generates its program. Its 64 KiB
    # hold any program the kernel takes (4096 instructions, 32 KiB); the write end does not block, so a longer
    # one is cut short at 64 KiB, which _check_program refuses, or fails the export.
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        os.set_blocking(w, False)
        try:
            filt.export_bpf(_Fd(w))
        except OSError as e:
            raise PolicyError(f"{policy.name}: libseccomp could not export the BPF program: {e}") from e
        os.close(w)
        w = -1
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    prog = b"".join(chunks)
    _check_program(prog)
    if named and len(_PROGRAMS) < _COMPILED_MAX:
        _PROGRAMS[key] = prog
    return prog


class _Fd:
    """What pyseccomp's export functions take: anything with ``fileno()``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def _check_program(prog: bytes) -> None:
    if not prog or len(prog) % SOCK_FILTER_SIZE or len(prog) // SOCK_FILTER_SIZE > BPF_MAXINSNS:
        raise PolicyError(f"not a classic BPF program the kernel takes: {len(prog)} bytes (a whole number of "
                          f"{SOCK_FILTER_SIZE}-byte instructions, 1 to {BPF_MAXINSNS} of them)")


def load_program(prog: bytes) -> None:
    """Install ``prog`` as a seccomp filter of the calling thread (seccomp(2) SECCOMP_SET_MODE_FILTER, no flags:
    what seccomp_load does). The caller must have set no_new_privs (or hold CAP_SYS_ADMIN); OSError otherwise."""
    _check_program(prog)
    sys_.seccomp_set_mode_filter(prog, len(prog) // SOCK_FILTER_SIZE)


def install(policy: Policy, params: Mapping[str, int] | None = None) -> None:
    """Compile (or find compiled) and load ``policy``: the jail's step 11 and the keeper's filter."""
    load_program(bpf_program(policy, params))


def _compile(policy: Policy, params: Mapping[str, int]) -> pyseccomp.SyscallFilter:
    filt = pyseccomp.SyscallFilter(pyseccomp.ERRNO(policy.default_errno))
    # Syscalls through another ABI (i386 int 0x80, x32) would be looked up in another table: kill.
    filt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    for sc in sorted(policy.kill):
        filt.add_rule(pyseccomp.KILL_PROCESS, syscall_number(sc))
    for sc, e in sorted(policy.errno_for.items()):
        filt.add_rule(pyseccomp.ERRNO(e), syscall_number(sc))
    for sc, rules in sorted(policy.allow.items()):
        nr = syscall_number(sc)
        if policy.is_unconditional(sc):
            filt.add_rule(pyseccomp.ALLOW, nr)
            continue
        seen: set[tuple[tuple[int, int, int, int], ...]] = set()
        for rule in rules:
            cmp = tuple((a.index, _OPS[a.op], _resolve(a.value, params), a.mask) for a in rule.args)
            if cmp in seen:
                continue
            seen.add(cmp)
            # pyseccomp.Arg(arg, op, datum_a, datum_b): for MASKED_EQ datum_a is the mask, datum_b the value.
            cargs = [
                pyseccomp.Arg(i, op, mask, val) if op == pyseccomp.MASKED_EQ else pyseccomp.Arg(i, op, val)
                for (i, op, val, mask) in cmp
            ]
            filt.add_rule(pyseccomp.ALLOW, nr, *cargs)
    return filt


def export_pfc(policy: Policy, params: Mapping[str, int] | None = None) -> str:
    """Human-readable pseudo-filter code (libseccomp PFC) of a compiled policy, for review and debugging."""
    import tempfile

    filt = build_filter(policy, params)
    with tempfile.TemporaryFile("w+") as f:
        filt.export_pfc(f)
        f.seek(0)
        return f.read()
