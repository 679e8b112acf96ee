"""The device-model jail: namespaces, an empty read-only root, no identity, no capabilities, a seccomp allowlist.

Models: crosvm ``jail/src/helpers.rs`` and minijail (namespaces, pivot_root into an empty root, no_new_privs, no
capabilities, fds passed in instead of opened), Firecracker's jailer and seccompiler (filter loaded last).

Usage (early in the DM's main, after importing every module it will ever need, before reading guest input)::

    enter_jail(JailConfig(root_dir=Path("/run/kvmdm/jail/vm0"), uid=..., gid=..., keep_fds=[kvm, vm, sock, 2]))

The order of :func:`enter_jail`, and why each step sits where it does:

0. **Validate and gather** (``JailConfig.validate_host``): root_dir, keep_fds, pid 1 if ``pid_ns_ready``,
   single-threadedness. Read ``/proc/sys/kernel/cap_last_cap`` now: /proc is gone after step 5. Compile the
   seccomp filter and generate its BPF program now, while nothing is restricted yet (libseccomp only allocates
   and writes a pipe, but a surprise belongs here, not half-way in). Single-threaded is a hard requirement:
   unshare(CLONE_NEWNS) implies CLONE_FS and fails with EINVAL in a multi-threaded process, and threads would
   not follow the fork of step 10 anyway.
1. **cgroup placement** (optional): writes memory.max/cpu.max and moves the process into the given cgroup v2
   directory. First, because it needs the host's /sys/fs/cgroup (gone after step 5) and write permission on
   it (gone after step 8), and so that everything the DM allocates from here on is charged to the guest's
   cgroup. A cgroup that is not writable or lacks a controller file is skipped with a logged reason.
2. **Close every fd not in keep_fds**, so that nothing the daemon held (a directory fd would let
   ``openat(dirfd, "..")`` walk out of any root) survives into the jail. fds 0-2 that are not kept are pointed
   at /dev/null instead of closed: otherwise the next eventfd would become fd 2 and a stray ``print`` to
   stderr would write into it. Kept fds that are directories are refused in step 0 for the same reason.
3. **unshare(NEWNS|NEWIPC|NEWUTS|NEWNET|NEWCGROUP|NEWPID)** while still root (CAP_SYS_ADMIN). The empty
   network namespace has only a downed loopback; ``allow_net_ns=True`` keeps the caller's instead.
   CLONE_NEWCGROUP comes after step 1 so the DM's cgroup becomes its cgroup root.
4. **mount --make-rprivate /** so none of the mounts below propagate back to the host (systemd makes / shared).
5. **tmpfs on root_dir** (nosuid, nodev, noexec, size- and inode-limited, root-owned 0755),
   ``pivot_root(".", ".")`` + ``umount2(".", MNT_DETACH)`` (pivot_root(2) NOTES: stacks the old root on the new
   one and detaches it without needing a put_old directory), ``chdir("/")``, then remount / read-only. The
   process now sees one empty, read-only directory; there is no /proc, /dev or /sys.
6. **sethostname** in the new UTS namespace (cosmetic, but it makes a jailed process recognisable).
7. **rlimits**, before the capability drop because raising a hard limit needs CAP_SYS_RESOURCE.
   RLIMIT_NPROC counts *tasks* (threads too) of the uid across the whole host, so give every DM its own uid.
   RLIMIT_FSIZE=0 makes writes to regular files fail with EFBIG (CPython ignores SIGXFSZ): a DM that writes
   disk images through passed fds needs ``Rlimits(fsize=<largest image size>)``; stderr must be a pipe.
8. **Privileges**, in the only order that works: securebits (NOROOT, NO_CAP_AMBIENT_RAISE, KEEP_CAPS off, all
   locked; needs CAP_SETPCAP) -> drop the bounding set 0..cap_last_cap (PR_CAPBSET_DROP, needs CAP_SETPCAP) ->
   clear ambient -> setgroups([]) -> setresgid (needs CAP_SETGID) -> setresuid (needs CAP_SETUID; the kernel
   then clears permitted/effective) -> capset(0) for the inheritable set and in case a caller had KEEP_CAPS.
   Then verify: capget is all zero, ids are as asked, and setuid(0) fails.
9. **PR_SET_NO_NEW_PRIVS** (required for loading a filter without CAP_SYS_ADMIN, and it makes execve unable to
   gain privileges) and **PR_SET_DUMPABLE 0** (no ptrace or /proc/pid/mem access by same-uid processes).
10. **The pid namespace.** unshare(CLONE_NEWPID) does not move the caller, only its future children
    (pid_namespaces(7)), so the DM has to be a process born into the new namespace. There are two ways to get
    one, and each ends with the DM as pid 1 of a namespace of its own, leading its own session:

    *Made before the fork* (``pid_ns_ready``; what daemon.zygote gives every DM it forks for a jailed guest):
    the zygote calls unshare(CLONE_NEWPID) right before its fork, so that the forked child is pid 1 of a fresh
    namespace, and right after it setns(2)es its pid_for_children back to its own namespace (an fd it opened at
    start), so the next child gets a fresh namespace again and no other child of the zygote ever lands in a
    DM's. The pid the supervisor holds (its pidfd, its signals, the exit status the zygote reaps) is then the
    DM itself. The jail checks that it is pid 1 (step 0), leaves CLONE_NEWPID out of step 3 and here only makes
    sure it leads its own session (the zygote's child called setsid() already): no fork, no keeper, and no
    PR_SET_PDEATHSIG, whose only job was tying the DM to its keeper (the DM's parent is now the zygote, whose
    death must not take running guests down). That saves the second fork of every zygote-forked DM: ~560
    copy-on-write faults, 2.6-4.3 ms of wall time on a loaded nested host. What the keeper gave is unchanged:
    the signals it forwarded reach the DM directly under the same kernel rule (a kill() from an ancestor
    namespace reaches a namespace init only if it has a handler; SIGKILL and SIGSTOP always); exit statuses are
    the kernel's own, not a re-raise (a seccomp SIGSYS or a real SIGSEGV is forced and kills even a pid 1). The
    differences: the DM is pid 1 from its fork on, so an unhandled SIGTERM to a DM that is still starting is
    dropped too (before, it killed it; the supervisor stops DMs by the control socket and SIGKILL only); a
    signal the keeper did not forward (SIGALRM, SIGPIPE, ...) killed the keeper and, through PDEATHSIG, the DM,
    and is now dropped like any other unhandled one; SIGSTOP stops the DM, not just its keeper.

    *The keeper* (exec'd DMs, back-ends, ``run_jailed`` without a zygote): ``enter_jail`` unshares
    CLONE_NEWPID in step 3 and forks once here, *after* the process is unprivileged: the child is pid 1 of the
    new namespace and is the one that returns from ``enter_jail`` and runs the DM; the original process becomes
    the *keeper*: it closes every fd, loads a tiny seccomp filter (wait4 on its child, kill of its child or
    itself, signal calls, exit, and one execveat of its own program), execs daemon/keeper.c's build
    (daemon.keeper: a few KiB with no libc, opened in step 0, so that no copy of the interpreter stays behind
    for the guest's lifetime; without it the Python code in ``_keeper`` does the same) and then only forwards
    SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to the DM and exits with the DM's status, re-raising the DM's
    fatal signal on itself so the daemon's ``waitpid`` on the pid it spawned sees exactly how the DM died (e.g.
    SIGSYS for a seccomp kill). The DM sets PR_SET_PDEATHSIG=SIGKILL so that SIGKILL of the keeper takes the DM
    down too (the kernel delivers it even to a pid 1 because it comes from an ancestor namespace), and calls
    setsid() so it shares no process group or controlling tty (TIOCSTI) with the daemon.

    Consequences the DM must know, either way: it is pid 1 of its namespace, so signals without a handler
    (SIGTERM's default) are ignored by the kernel, install handlers for what you want to receive (this includes
    self-sent ones: ``abort()`` ends in SIGSEGV, not SIGABRT; kernel-forced signals such as seccomp's SIGSYS or a
    real SIGSEGV are unaffected); ``os.getpid()`` is 1, ``os.getppid()`` 0 when the namespace was made before
    the fork; anything it could fork (it cannot: seccomp) would die with it.
    With ``pid_ns=False`` there is no pid namespace, no fork and no keeper.
11. **seccomp**, last (Firecracker's rule): every earlier step makes syscalls the DM policy forbids. The filter
    applies to the calling thread and is inherited by threads created later, hence single-threaded in step 0.
    It is one seccomp(2) call with the BPF program of step 0 (daemon.seccomp_policy.install), which a DM forked
    by the zygote finds generated already, rather than seccomp_load(3), which generates it again each time.

Python in the jail: the filesystem is empty and ``open``/``openat``/``stat`` are denied, so **every module the
DM needs must be imported before enter_jail** (including lazily imported ones: codecs other than utf-8/ascii/
latin-1, ``json``, ``traceback`` ...). linecache degrades gracefully (tracebacks lose source lines).

On :class:`JailSetupError` the process is half-jailed: the caller must exit, never continue.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import resource
import select
import signal
import stat
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from daemon import _jailsys as sys_
from daemon import keeper, seccomp_policy

log = logging.getLogger("kvmdm.jail")

_UID_MAX = 0xFFFFFFFE  # (uid_t)-1 means "unchanged" to setresuid and can never be an identity
FORWARDED_SIGNALS: frozenset[int] = frozenset({
    signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
})
KEEPER_WAITS = FORWARDED_SIGNALS | {signal.SIGCHLD}
_SECUREBITS = (
    sys_.SECBIT_NOROOT | sys_.SECBIT_NOROOT_LOCKED | sys_.SECBIT_NO_SETUID_FIXUP_LOCKED
    | sys_.SECBIT_KEEP_CAPS_LOCKED | sys_.SECBIT_NO_CAP_AMBIENT_RAISE | sys_.SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED
)


class JailConfigError(ValueError):
    """The jail configuration is invalid; nothing has been changed yet."""


class JailSetupError(OSError):
    """A jail step failed; the process is partially jailed and must exit."""

    def __init__(self, step: str, err: int, detail: str = "") -> None:
        super().__init__(err, f"jail step {step!r} failed: {os.strerror(err) if err else ''} {detail}".strip())
        self.step = step


@dataclass(frozen=True)
class Rlimits:
    """Resource limits applied as soft == hard. ``None`` leaves a limit as inherited."""

    nofile: int = 1024
    nproc: int = 128
    core: int = 0
    fsize: int = 0
    memlock: int = 0
    msgqueue: int = 0
    as_bytes: int | None = None

    def items(self) -> list[tuple[str, int, int]]:
        out = [
            ("RLIMIT_NOFILE", resource.RLIMIT_NOFILE, self.nofile),
            ("RLIMIT_NPROC", resource.RLIMIT_NPROC, self.nproc),
            ("RLIMIT_CORE", resource.RLIMIT_CORE, self.core),
            ("RLIMIT_FSIZE", resource.RLIMIT_FSIZE, self.fsize),
            ("RLIMIT_MEMLOCK", resource.RLIMIT_MEMLOCK, self.memlock),
            ("RLIMIT_MSGQUEUE", resource.RLIMIT_MSGQUEUE, self.msgqueue),
        ]
        if self.as_bytes is not None:
            out.append(("RLIMIT_AS", resource.RLIMIT_AS, self.as_bytes))
        return out


@dataclass(frozen=True)
class JailConfig:
    """Everything :func:`enter_jail` needs. Static checks run at construction; host checks in enter_jail."""

    root_dir: Path
    uid: int
    gid: int
    keep_fds: Sequence[int] = ()
    rlimits: Rlimits = field(default_factory=Rlimits)
    seccomp: str | None = "dm"  # a seccomp_policy name; None only for tests of the other layers
    cgroup: Path | None = None
    cgroup_memory_max: int | None = None  # bytes, written to memory.max
    cgroup_cpu_max: str | None = None  # "$MAX $PERIOD", written to cpu.max
    allow_net_ns: bool = False  # True: keep the caller's network namespace instead of an empty one
    pid_ns: bool = True
    # The caller is already pid 1 of a pid namespace made for it alone before it was forked (daemon.zygote does
    # that for jailed DMs): no unshare(CLONE_NEWPID), no keeper fork (module docstring, step 10).
    pid_ns_ready: bool = False
    tmpfs_size: int = 64 * 1024
    tmpfs_inodes: int = 16
    hostname: str = "kvmdm-jail"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root_dir", Path(self.root_dir))
        object.__setattr__(self, "keep_fds", tuple(self.keep_fds))
        if self.cgroup is not None:
            object.__setattr__(self, "cgroup", Path(self.cgroup))
        for name in ("uid", "gid"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise JailConfigError(f"{name} must be an int, got {v!r}")
            if v == 0:
                raise JailConfigError(f"{name} 0 is root: the jail exists to give that up")
            if not 0 < v <= _UID_MAX:
                raise JailConfigError(f"{name} {v} is outside 1..{_UID_MAX}")
        if not self.root_dir.is_absolute():
            raise JailConfigError(f"root_dir {self.root_dir} must be absolute")
        fds = self.keep_fds
        if any(not isinstance(fd, int) or isinstance(fd, bool) or fd < 0 for fd in fds):
            raise JailConfigError(f"keep_fds must be non-negative ints: {fds!r}")
        if len(set(fds)) != len(fds):
            raise JailConfigError(f"keep_fds has duplicates: {fds!r}")
        for lname, _, value in self.rlimits.items():
            if value < 0:
                raise JailConfigError(f"{lname} {value} is negative")
        if fds and self.rlimits.nofile <= max(fds):
            raise JailConfigError(f"RLIMIT_NOFILE {self.rlimits.nofile} must exceed the largest kept fd {max(fds)}")
        if self.pid_ns_ready and not self.pid_ns:
            raise JailConfigError("pid_ns_ready without pid_ns: a ready pid namespace is still a pid namespace")
        min_tasks = 2 if self.forks_keeper else 1  # the keeper and the DM share the uid's task count
        if self.rlimits.nproc < min_tasks:
            raise JailConfigError(f"RLIMIT_NPROC {self.rlimits.nproc} leaves no room for the jail's {min_tasks} tasks")
        if self.seccomp is not None and self.seccomp not in seccomp_policy.POLICY_NAMES - {"keeper"}:
            raise JailConfigError(f"unknown seccomp policy {self.seccomp!r}")
        if self.tmpfs_size < 4096 or self.tmpfs_inodes < 2:
            raise JailConfigError("tmpfs needs at least 4096 bytes and 2 inodes")
        if not 0 < len(self.hostname.encode()) <= 64:
            raise JailConfigError("hostname must be 1..64 bytes")
        if self.cgroup is not None and not self.cgroup.is_absolute():
            raise JailConfigError(f"cgroup {self.cgroup} must be absolute")
        if self.cgroup_memory_max is not None and self.cgroup_memory_max <= 0:
            raise JailConfigError("cgroup_memory_max must be positive")
        if self.cgroup_cpu_max is not None:
            parts = self.cgroup_cpu_max.split()
            if not (1 <= len(parts) <= 2 and (parts[0] == "max" or parts[0].isdigit())
                    and all(p.isdigit() for p in parts[1:])):
                raise JailConfigError(f"cgroup_cpu_max {self.cgroup_cpu_max!r} is not '$MAX [$PERIOD]'")
        if (self.cgroup_memory_max is not None or self.cgroup_cpu_max is not None) and self.cgroup is None:
            raise JailConfigError("cgroup limits given without a cgroup")

    @property
    def forks_keeper(self) -> bool:
        """Whether enter_jail makes the pid namespace itself and forks a keeper (step 10)."""
        return self.pid_ns and not self.pid_ns_ready

    def validate_host(self) -> None:
        """Checks against the running system: root_dir, kept fds, pid 1 if pid_ns_ready. Raises JailConfigError."""
        if self.pid_ns_ready and os.getpid() != 1:
            raise JailConfigError(f"pid_ns_ready, but this process is pid {os.getpid()}, not pid 1 of a pid "
                                  "namespace made for it")
        try:
            st = os.lstat(self.root_dir)
        except OSError as e:
            raise JailConfigError(f"root_dir {self.root_dir}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise JailConfigError(f"root_dir {self.root_dir} is not a directory (symlinks are refused)")
        if st.st_uid != 0:
            raise JailConfigError(f"root_dir {self.root_dir} is owned by uid {st.st_uid}, not root")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise JailConfigError(f"root_dir {self.root_dir} is group/world-writable")
        if any(os.scandir(self.root_dir)):
            raise JailConfigError(f"root_dir {self.root_dir} is not empty")
        for fd in self.keep_fds:
            try:
                fst = os.fstat(fd)
            except OSError:
                raise JailConfigError(f"kept fd {fd} is not open") from None
            if stat.S_ISDIR(fst.st_mode):
                raise JailConfigError(f"kept fd {fd} is a directory: openat(fd, '..') would escape the jail")


def _fail(step: str, e: OSError, detail: str = "") -> JailSetupError:
    return JailSetupError(step, e.errno or 0, detail or str(e))


def _read_small(path: str) -> bytes:
    """A small /proc file in one read: no text layer (each one costs a DM ~0.05 ms of its startup)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def _thread_count() -> int:
    for line in _read_small("/proc/self/status").splitlines():
        if line.startswith(b"Threads:"):
            return int(line.split()[1])
    raise JailSetupError("validate", errno.ENOENT, "no Threads: line in /proc/self/status")


def _read_cap_last_cap() -> int:
    """Highest capability number: from /proc, cross-checked with PR_CAPBSET_READ (EINVAL past the last one)."""
    last = int(_read_small("/proc/sys/kernel/cap_last_cap"))
    try:
        sys_.prctl(sys_.PR_CAPBSET_READ, last)
    except OSError as e:
        raise JailSetupError("validate", e.errno or 0, f"cap_last_cap {last} unknown to PR_CAPBSET_READ") from e
    return last


def _place_in_cgroup(cfg: JailConfig) -> None:
    assert cfg.cgroup is not None
    procs = cfg.cgroup / "cgroup.procs"
    if not procs.exists():
        log.warning("cgroup %s skipped: no cgroup.procs (not a cgroup v2 directory)", cfg.cgroup)
        return
    if not os.access(procs, os.W_OK):
        log.warning("cgroup %s skipped: cgroup.procs not writable", cfg.cgroup)
        return
    for fname, value in (("memory.max", cfg.cgroup_memory_max), ("cpu.max", cfg.cgroup_cpu_max)):
        if value is None:
            continue
        path = cfg.cgroup / fname
        if not path.exists():
            log.warning("cgroup %s: %s skipped: controller not enabled here", cfg.cgroup, fname)
            continue
        try:
            path.write_text(f"{value}\n")
        except OSError as e:
            raise _fail("cgroup", e, f"writing {path}") from e
    try:
        procs.write_text("0\n")  # "0" = the writing process (cgroup-v2.rst, "Processes")
    except OSError as e:
        raise _fail("cgroup", e, f"writing {procs}") from e


def _close_fds(keep: Sequence[int]) -> None:
    keep_set = set(keep)
    devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    for fd in (0, 1, 2):
        if fd not in keep_set and fd != devnull:
            os.dup2(devnull, fd, inheritable=False)
    if devnull > 2:
        os.close(devnull)
    lo = 3
    for fd in sorted(keep_set):
        if fd >= lo:
            os.closerange(lo, fd)
            lo = fd + 1
    os.closerange(lo, 1 << 20)  # close_range(2) under the hood: cost independent of the bound


def _enter_root(cfg: JailConfig) -> None:
    sys_.mount(None, "/", None, sys_.MS_REC | sys_.MS_PRIVATE, None)
    fsflags = sys_.MS_NOSUID | sys_.MS_NODEV | sys_.MS_NOEXEC
    sys_.mount("kvmdm-jail", str(cfg.root_dir), "tmpfs", fsflags,
               f"size={cfg.tmpfs_size},nr_inodes={cfg.tmpfs_inodes},mode=0755,uid=0,gid=0")
    os.chdir(cfg.root_dir)
    sys_.pivot_root(".", ".")
    sys_.umount2(".", sys_.MNT_DETACH)
    os.chdir("/")
    sys_.mount(None, "/", None, sys_.MS_REMOUNT | sys_.MS_BIND | sys_.MS_RDONLY | fsflags, None)


def _drop_privileges(cfg: JailConfig, cap_last_cap: int) -> None:
    sys_.prctl(sys_.PR_SET_SECUREBITS, _SECUREBITS)
    for cap in range(cap_last_cap + 1):
        sys_.prctl(sys_.PR_CAPBSET_DROP, cap)
    sys_.prctl(sys_.PR_CAP_AMBIENT, sys_.PR_CAP_AMBIENT_CLEAR_ALL)
    os.setgroups([])
    os.setresgid(cfg.gid, cfg.gid, cfg.gid)
    os.setresuid(cfg.uid, cfg.uid, cfg.uid)
    sys_.capset_zero()
    # Trust, but verify: a jail that silently kept a capability is worse than none.
    if sys_.capget() != (0, 0, 0):
        raise JailSetupError("privileges", errno.EPERM, f"capabilities left: {sys_.capget()}")
    if any(sys_.prctl(sys_.PR_CAPBSET_READ, c) for c in range(cap_last_cap + 1)):
        raise JailSetupError("privileges", errno.EPERM, "bounding set not empty")
    if os.getresuid() != (cfg.uid,) * 3 or os.getresgid() != (cfg.gid,) * 3 or os.getgroups():
        raise JailSetupError("privileges", errno.EPERM, "ids not dropped")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise JailSetupError("privileges", errno.EPERM, "setuid(0) succeeded after the drop")


def _keeper(child: int, death_w: int, locked_w: int, program: int | None, argv: list[bytes]) -> None:
    """The pid-namespace keeper's whole life (see module docstring, step 10). Never returns.

    With ``program`` (an fd of daemon/keeper.c's build, daemon.keeper) it execs that once its filter is loaded,
    so that no copy of the interpreter stays behind for the guest's lifetime; otherwise, or if the exec fails,
    this function is the keeper."""
    status = 1
    try:
        keep = sorted({death_w, locked_w} | ({program} if program is not None else set()))
        prev = -1
        for fd in keep:
            os.closerange(prev + 1, fd)
            prev = fd
        os.closerange(prev + 1, 1 << 20)
        if program is not None:
            # Both pipe ends live on in the program: the DM reads EOF on "locked" when the program closes it,
            # and on "death" only when the keeper is gone.
            os.set_inheritable(death_w, True)
            os.set_inheritable(locked_w, True)
        me = os.getpid()
        seccomp_policy.install(
            seccomp_policy.policy_for("keeper"),
            {"child_pid": child, "self_tgid": me,
             "keeper_exec_fd": seccomp_policy.NO_FD if program is None else program},
        )
        if program is not None:
            try:
                os.execve(program, argv, {keeper.ENV_KEY: f"{child}:{locked_w}"})
            except OSError:
                pass  # the filter is loaded and the pipes are open: go on as the Python keeper
        os.close(locked_w)  # tells the child the keeper is locked down (its read of the pipe sees EOF)
        while True:
            info = signal.sigwaitinfo(KEEPER_WAITS)
            if info.si_signo != signal.SIGCHLD:
                try:
                    os.kill(child, info.si_signo)
                except OSError:
                    pass
                continue
            pid, wstatus = os.waitpid(child, os.WNOHANG)
            if pid != child:
                continue
            if os.WIFSIGNALED(wstatus):
                sig = os.WTERMSIG(wstatus)
                if sig not in (signal.SIGKILL, signal.SIGSTOP):
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
                os.kill(me, sig)
                status = 128 + sig
            else:
                status = os.waitstatus_to_exitcode(wstatus)
            break
    finally:
        os._exit(status)


def _split_pid_namespace(program: int | None, argv: list[bytes]) -> None:
    """Fork into the new pid namespace; only the child (pid 1) returns."""
    death_r, death_w = os.pipe2(os.O_CLOEXEC)
    locked_r, locked_w = os.pipe2(os.O_CLOEXEC)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, KEEPER_WAITS)  # no signal lost before sigwaitinfo
    child = os.fork()
    if child:
        os.close(death_r)
        os.close(locked_r)
        _keeper(child, death_w, locked_w, program, argv)
    os.close(death_w)
    os.close(locked_w)
    if program is not None:
        os.close(program)
    # Go on only once the keeper has loaded its seccomp filter (it closes its end then, or dies): the DM never
    # runs, let alone reads guest input, next to a keeper that is not locked down yet.
    os.read(locked_r, 1)
    os.close(locked_r)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    os.setsid()
    sys_.prctl(sys_.PR_SET_PDEATHSIG, signal.SIGKILL)
    # The keeper may have died before PDEATHSIG was armed; its end of the pipe closing tells us.
    if select.select([death_r], [], [], 0)[0]:
        os._exit(1)
    os.close(death_r)


def _own_session() -> None:
    """A DM born pid 1 of its pid namespace leads its own session (no process group or controlling tty, hence
    TIOCSTI, shared with the daemon), as the keeper's child does; daemon.zygote's child already called setsid()."""
    if os.getsid(0) != os.getpid():
        os.setsid()


def enter_jail(cfg: JailConfig) -> None:
    """Jail the calling process (see the module docstring for the order). Returns only inside the jail.

    With ``cfg.pid_ns`` the process that returns is a fork of the caller (pid 1 of a new pid namespace); the
    original pid stays behind as the keeper and never returns. With ``cfg.pid_ns_ready`` as well, the caller is
    already that pid 1 and is the one that returns.
    """
    # 0. validate and gather
    cfg.validate_host()
    if _thread_count() != 1:
        raise JailConfigError("enter_jail must be called while the process is single-threaded")
    cap_last_cap = _read_cap_last_cap()
    program: int | None = None
    argv: list[bytes] = []
    if cfg.forks_keeper:
        # The keeper's program and the command line it will show, while there are still files and a /proc.
        program = keeper.open_program(KEEPER_WAITS)
        argv = Path("/proc/self/cmdline").read_bytes().split(b"\0")[:-1] or [b"kvmdm-keeper"]
    if cfg.seccomp is not None:
        seccomp_policy.bpf_program(seccomp_policy.policy_for(cfg.seccomp), {"self_tgid": 1})  # compile check

    # 1. cgroup
    if cfg.cgroup is not None:
        _place_in_cgroup(cfg)
    # 2. fds
    try:
        _close_fds([*cfg.keep_fds, *([program] if program is not None else [])])
    except OSError as e:
        raise _fail("close_fds", e) from e
    # 3. namespaces
    flags = sys_.CLONE_NEWNS | sys_.CLONE_NEWIPC | sys_.CLONE_NEWUTS | sys_.CLONE_NEWCGROUP
    if not cfg.allow_net_ns:
        flags |= sys_.CLONE_NEWNET
    if cfg.forks_keeper:
        flags |= sys_.CLONE_NEWPID
    try:
        sys_.unshare(flags)
    except OSError as e:
        raise _fail("unshare", e) from e
    # 4.-5. mounts
    try:
        _enter_root(cfg)
    except OSError as e:
        raise _fail("root", e) from e
    # 6. hostname
    try:
        sys_.sethostname(cfg.hostname)
    except OSError as e:
        raise _fail("hostname", e) from e
    # 7. rlimits
    for lname, res, value in cfg.rlimits.items():
        try:
            resource.setrlimit(res, (value, value))
        except (OSError, ValueError) as e:
            raise JailSetupError("rlimits", getattr(e, "errno", 0) or errno.EINVAL, f"{lname}={value}: {e}") from e
    # 8. identity and capabilities
    try:
        _drop_privileges(cfg, cap_last_cap)
    except JailSetupError:
        raise
    except OSError as e:
        raise _fail("privileges", e) from e
    # 9. no_new_privs, not dumpable
    try:
        sys_.prctl(sys_.PR_SET_NO_NEW_PRIVS, 1)
        sys_.prctl(sys_.PR_SET_DUMPABLE, 0)
    except OSError as e:
        raise _fail("prctl", e) from e
    # 10. pid namespace: fork, and the keeper never comes back; or, made before our fork, only our own session
    try:
        if cfg.forks_keeper:
            _split_pid_namespace(program, argv)
        elif cfg.pid_ns_ready:
            _own_session()
    except OSError as e:
        raise _fail("pid_namespace", e) from e
    # 11. seccomp, last
    if cfg.seccomp is None:
        log.warning("jail entered WITHOUT a seccomp filter (test configuration)")
        return
    try:
        seccomp_policy.install(seccomp_policy.policy_for(cfg.seccomp), {"self_tgid": os.getpid()})
    except OSError as e:
        raise _fail("seccomp", e) from e


# --- running code in a jail and collecting its result (tests, self-checks) ---------------------------------


@dataclass(frozen=True)
class JailedResult:
    """What came back from :func:`run_jailed`: ``fn``'s JSON value or its exception, and how the process ended.

    ``exit_code``/``term_signal`` are those of the process ``run_jailed`` forked, i.e. the keeper when
    ``pid_ns``: the keeper re-raises the DM's fatal signal, so a seccomp kill shows as ``term_signal == SIGSYS``
    (with ``pid_ns_ready`` that process is the DM itself, and the status is the kernel's own).
    """

    value: Any = None
    error_type: str | None = None
    error_errno: int | None = None
    error_message: str | None = None
    exit_code: int | None = None
    term_signal: int | None = None
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.error_type is None and self.exit_code == 0


class JailedProcess:
    """A forked child running ``fn`` inside a jail; collect it with :meth:`wait`."""

    def __init__(self, pid: int, result_fd: int, stderr_fd: int) -> None:
        self.pid = pid
        self._result_fd = result_fd
        self._stderr_fd = stderr_fd

    def dm_pid(self, timeout: float = 10.0) -> int:
        """Host pid of the jailed process itself (the keeper's child) when the jail forked a keeper."""
        deadline = time.monotonic() + timeout
        path = f"/proc/{self.pid}/task/{self.pid}/children"
        while time.monotonic() < deadline:
            try:
                with open(path) as f:
                    kids = f.read().split()
            except OSError:
                kids = []
            if kids:
                return int(kids[0])
            time.sleep(0.01)
        raise TimeoutError(f"process {self.pid} has no child")

    def _exit_status(self) -> tuple[int | None, int | None]:
        """(exit code, fatal signal) of the process, once it has exited: we are its parent."""
        _, wstatus = os.waitpid(self.pid, 0)
        return (os.WEXITSTATUS(wstatus) if os.WIFEXITED(wstatus) else None,
                os.WTERMSIG(wstatus) if os.WIFSIGNALED(wstatus) else None)

    def wait(self, timeout: float = 30.0) -> JailedResult:
        bufs: dict[int, bytearray] = {self._result_fd: bytearray(), self._stderr_fd: bytearray()}
        open_fds = set(bufs)
        deadline = time.monotonic() + timeout
        timed_out = False
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                os.kill(self.pid, signal.SIGKILL)  # the DM itself, or its keeper: it follows (PR_SET_PDEATHSIG)
                break
            ready, _, _ = select.select(list(open_fds), [], [], left)
            for fd in ready:
                chunk = os.read(fd, 65536)
                if chunk:
                    bufs[fd] += chunk
                else:
                    open_fds.discard(fd)
        for fd in bufs:
            os.close(fd)
        code, sig = self._exit_status()
        stderr = bufs[self._stderr_fd].decode(errors="replace")
        if timed_out:
            return JailedResult(error_type="Timeout", exit_code=code, term_signal=sig, stderr=stderr)
        raw = bytes(bufs[self._result_fd])
        if not raw:
            return JailedResult(exit_code=code, term_signal=sig, stderr=stderr, error_type="NoResult")
        # JSON, never pickle: the bytes come from a process we must assume compromised.
        msg = json.loads(raw)
        return JailedResult(
            value=msg.get("value"),
            error_type=msg.get("error_type"),
            error_errno=msg.get("errno"),
            error_message=msg.get("message"),
            exit_code=code,
            term_signal=sig,
            stderr=stderr,
        )


def spawn_jailed(fn: Callable[[], Any], cfg: JailConfig) -> JailedProcess:
    """Fork, jail the child with ``cfg`` (plus the result pipe), run ``fn`` there; ``fn`` returns JSON data.

    The child's fd 2 is a pipe whose content comes back as ``JailedResult.stderr``; it is added to keep_fds.
    """
    result_r, result_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid:
        os.close(result_w)
        os.close(err_w)
        return JailedProcess(pid, result_r, err_r)
    code = 70
    try:
        os.close(result_r)
        os.close(err_r)
        os.dup2(err_w, 2)
        os.close(err_w)
        code = run_in_jail(fn, cfg, result_w)
    except BaseException:  # noqa: B036
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


def run_in_jail(fn: Callable[[], Any], cfg: JailConfig, result_w: int) -> int:
    """The child's side of :func:`spawn_jailed` once fd 2 is the stderr pipe: jail (``cfg`` plus ``result_w`` and
    fd 2), run ``fn``, write its JSON result to ``result_w``; returns the exit code. (Also the entry of the
    zygote-forked variant the security tests run, tests/security/conftest.py.)"""
    # The test runner may have replaced sys.stderr with an object over another fd: point it at fd 2.
    # Same for logging: a test runner's handlers write to fds the jail closes.
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    logging.root.handlers[:] = [logging.StreamHandler(sys.stderr)]
    enter_jail(replace(cfg, keep_fds=tuple(dict.fromkeys((*cfg.keep_fds, result_w, 2)))))
    try:
        msg: dict[str, Any] = {"value": fn()}
    except BaseException as e:  # noqa: B036 - everything must be reported, even SystemExit
        msg = {"error_type": type(e).__name__, "message": str(e), "errno": getattr(e, "errno", None)}
    try:
        data = json.dumps(msg).encode()
    except (TypeError, ValueError) as e:
        data = json.dumps({"error_type": "NotJSON", "message": str(e)}).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(result_w, view):]
    return 0


def run_jailed(fn: Callable[[], Any], cfg: JailConfig, timeout: float = 30.0) -> JailedResult:
    """:func:`spawn_jailed` then wait."""
    return spawn_jailed(fn, cfg).wait(timeout)
