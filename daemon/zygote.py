"""The DM zygote: ``python -m daemon.zygote --request-fd R --event-fd E`` (started by the daemon,
daemon.supervision.forkserver), a process that has imported everything a device model will ever import and
forks one DM per guest on request, so that a DM starts in milliseconds instead of paying for an interpreter
start and ~200 modules every time (Android's zygote, Chromium's zygote; the wire protocol is daemon.zygote_wire).

What the zygote holds, and what it must not:

* every module of ``daemon.dm``, ``daemon.jail`` and every device module ``daemon.builder.preload_for`` could
  import, then ``gc.freeze()`` so that the children's collector leaves the shared objects (and their pages)
  alone;
* nothing of any guest: no guest fds (they arrive with a ``spawn`` request and the zygote closes its copies as
  soon as the child is forked), no guest memory (created by the DM after the fork), no threads (checked before
  every fork: a thread holding a lock at fork time would leave the child with that lock held forever), and no
  fd that a child could inherit (the child closes every fd it was not given);
* it is a child subreaper (PR_SET_CHILD_SUBREAPER), so whatever a child leaves behind (a keeper's orphaned DM,
  for a child that jails itself with a keeper) is re-parented to it and reaped, and it reaps with
  ``waitpid(-1)``: the daemon is not the DMs' parent, so the zygote reports every exit status on the event
  channel and sends, with each ``spawned`` reply, a pidfd it opened while the child could not yet have been
  reaped (no pid-reuse window; the daemon watches that pidfd exactly as it watches an exec'd DM's);
* a ``spawn`` with ``pid_ns`` (every jailed DM) forks the child as **pid 1 of a new pid namespace**: unshare(
  CLONE_NEWPID) right before the fork (it moves nobody, only the next child, pid_namespaces(7)), setns(2) of its
  own pid namespace (an fd opened at start) as the pid_for_children right after it, so that every such child
  gets a namespace of its own and no later child lands in a DM's. The DM's jail then needs no keeper fork of
  its own (daemon/jail.py step 10, ``pid_ns_ready``): the pid the daemon holds is the DM itself, and its exit
  status, fatal signal included, is the one the zygote reaps. If the zygote cannot restore its own
  pid_for_children it refuses the spawn and exits (the daemon starts a new one).

Why not make the DM a child of the daemon instead (``clone(CLONE_PARENT)``)? Python cannot fork that way:
``os.fork`` takes no flags, and a raw ``clone`` syscall through ctypes bypasses glibc's fork bookkeeping (the
cached thread id used by ``pthread_kill``/``raise``, the at-fork handlers, CPython's own after-fork
re-initialisation), which would leave the DM sending its vCPU kicks to the zygote's thread. And making the
daemon a child subreaper would hand it every orphaned grandchild (a jailed back-end whose keeper died), which it
would have to reap without stealing ``Popen``'s statuses. So: the zygote is the parent and reports.

The child of a ``spawn`` (:func:`_child`), before it runs ``daemon.dm.main(args)`` -- the DM code path of an
exec'd DM from ``parse_args`` on, jail included:

1. waits for the zygote's "go" (sent once the daemon has its pidfd: a DM the daemon never learnt of must not
   run);
2. resets what the zygote changed: the wakeup fd, signal handlers back to a fresh interpreter's, an empty signal
   mask, logging handlers (``daemon.dm.main`` installs its own over the new stderr);
3. installs its fds at the numbers the daemon chose (``args`` names them), the guest's dm.log as stdout and
   stderr, /dev/null as stdin, and closes every other fd; ``setsid()``, ``chdir("/")``;
4. reseeds what is seeded per process: nothing to do, as ``random`` reseeds itself in its at-fork hook and
   ``os.urandom`` and ``secrets`` need nothing. **Not reseedable: the str/bytes hash key** (PYTHONHASHSEED) and
   the address-space layout are those of the zygote, shared by every DM it forks (the zygote model's known cost, Android's too);
   ``--dm-spawn exec`` gives each DM its own;
5. writes the DM's command line (``python -m daemon.dm ARGS``) over its argv area (the zygote was started with
   room for it), so ``ps``, the daemon's ``is_our_dm`` check and operators see a DM, not a zygote.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import gc
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from daemon import _jailsys as sys_
from daemon import zygote_wire as zw
from kvmcore.util.fdpass import recv_with_fds, send_with_fds

log = logging.getLogger("kvmdm.zygote")

PR_SET_CHILD_SUBREAPER = 36
CMDLINE_ROOM = 4096  # bytes of argv area the daemon gives the zygote (one argument of spaces)
_libc = ctypes.CDLL("libc.so.6", use_errno=True)

Entry = Callable[[list[str]], int]


def preload() -> None:
    """Import what any DM may import: ``daemon.dm`` and, through ``preload_for`` of a definition with every
    device class, each device module; the jail lazily imported by ``DeviceModel._enter_jail``."""
    import daemon.dm  # noqa: F401
    import daemon.jail  # noqa: F401
    from daemon.builder import preload_for
    from daemon.config import parse_definition

    preload_for(parse_definition({
        "name": "zygote-preload", "kernel": "demo", "rng": True, "console2": True,
        "disks": [{"path": "/nonexistent", "backend": "vhost-user"}],
        "nics": [{"backend": "vhost-user"}],
    }, check_paths=False))
    warm()


WARM_RUNS = 16
WARM_BUILD_RUNS = 4


def warm() -> None:
    """Run, once, the pure parts of a DM's startup that fill per-process caches -- argparse's compiled regular
    expressions, the seccomp filter of the DM policy and its BPF program (daemon.seccomp_policy keeps both), the
    definition parser's, the ACPI tables (kvmcore.acpi.build_tables is memoized), the host's KVM_GET_SUPPORTED_CPUID
    (kvmcore.kvm keeps it per /dev/kvm node), the specialised bytecode of the VM build (daemon.zygote_warm builds
    and closes throwaway VMs) -- so that every forked DM finds them in memory it shares with the zygote instead of
    building (and copying) its own. Nothing here starts a thread or touches a guest, and no fd outlives it (the
    pipe libseccomp exports the program through, /dev/kvm, the throwaway VMs)."""
    import json

    import daemon.dm
    from daemon import jail, seccomp_policy
    from daemon.config import parse_definition

    # Each pure step runs WARM_RUNS times: CPython 3.11 rewrites a function's bytecode in place for its first
    # few calls (quickening, then specialization), so a DM that runs code the zygote ran only once still writes
    # to, and copies, the pages of its code objects. Measured: a fifth less CPU and fewer faults in those steps.
    for _ in range(WARM_RUNS):
        daemon.dm.parse_args(["--control-fd", "3", "--definition-fd", "4", "--console-fd", "5", "--kvm-fd", "6",
                              "--kernel-fd", "7", "--initrd-fd", "8", "--disk-fd", "9", "--tap-fd", "10",
                              "--jail-root", "/nonexistent", "--uid", "1", "--gid", "1"])
        daemon.dm.parse_args(["--control-fd", "3", "--definition-fd", "4", "--console-fd", "5", "--kvm-fd", "6",
                              "--kernel-fd", "7", "--no-jail"])
        parse_definition(json.loads(json.dumps({"name": "zygote-warm", "kernel": "demo"})), check_paths=False)
        # The jail's step 0 up to the host checks (daemon.dm.DeviceModel._enter_jail builds this config).
        jail.JailConfig(root_dir=Path("/nonexistent"), uid=1, gid=1, keep_fds=[3, 4], pid_ns_ready=True,
                        rlimits=jail.Rlimits(fsize=64 << 20, nofile=4096, nproc=256))
        jail._thread_count()
        jail._read_cap_last_cap()
        # self_tgid 1: the DM is pid 1 of its pid namespace when it compiles (jail steps 0 and 11).
        seccomp_policy.bpf_program(seccomp_policy.policy_for("dm"), {"self_tgid": 1})
    # ACPI tables of a directly booted guest (daemon.vmm.Vmm.acpi_platform) with up to 4 vCPUs; a platform that
    # differs from these is simply built by the DM.
    from devices.rtc import REG_CENTURY
    from kvmcore.acpi import AcpiPlatform, build_tables

    for vcpus in range(1, 5):
        build_tables(AcpiPlatform(vcpus=vcpus, rtc_century=REG_CENTURY, pci_mmio64=None))
    # The keeper's program (daemon.keeper): built here once rather than by the first DM that forks a keeper (one
    # the zygote forked without a pid namespace of its own; kvmdmd's jailed DMs get one and fork none).
    from daemon import keeper

    keeper.program(jail.KEEPER_WAITS)
    from kvmcore.kvm import Kvm, KvmError

    try:
        kvm = Kvm()
    except KvmError as e:  # no KVM on this host (unit tests): each DM asks, and fails, itself
        log.info("no host CPUID cached: %s", e)
        return
    try:
        kvm.supported_cpuid()
    except KvmError as e:
        log.warning("host CPUID not cached: %s", e)
    finally:
        kvm.close()
    from daemon.zygote_warm import warm_build

    warm_build(WARM_BUILD_RUNS)  # ~25 ms each; more than 4 saved no more faults


def dm_entry(args: list[str]) -> int:
    """The production entry: exactly what ``python -m daemon.dm ARGS`` runs."""
    import daemon.dm

    return daemon.dm.main(args)


# ------------------------------------------------------------------------------------------------- cmdline


def _argv_area() -> tuple[int, int]:
    """[arg_start, arg_end) of this process (proc(5): /proc/self/stat fields 48 and 49)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[48 - 3]), int(fields[49 - 3])


def set_cmdline(argv: Sequence[str], area: tuple[int, int]) -> bool:
    """Write ``argv`` over the process's original argv strings (what setproctitle(3) does; PR_SET_MM would need
    CAP_SYS_RESOURCE). The rest of the area is zeroed, so /proc/PID/cmdline is ``argv`` plus NUL padding.
    False if it does not fit (the command line then stays the zygote's)."""
    start, end = area
    data = b"\0".join(os.fsencode(a) for a in argv) + b"\0"
    if len(data) > end - start:
        return False
    ctypes.memmove(start, data.ljust(end - start, b"\0"), end - start)
    return True


# --------------------------------------------------------------------------------------------------- child


def _install_fds(sources: Sequence[int], targets: Sequence[int], log_index: int) -> None:
    """fd ``sources[i]`` becomes fd ``targets[i]``, except ``sources[log_index]``, which becomes fds 1 and 2 only
    (as ``Popen(stdout=log, stderr=log)`` does); /dev/null is fd 0; every other fd is closed."""
    high = max([*sources, *targets, 2]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, high) for fd in sources]  # out of every target's way
    keep = {0, 1, 2}
    for i, (src, dst) in enumerate(zip(moved, targets, strict=True)):
        if i != log_index:
            os.dup2(src, dst)  # inheritable, as Popen(pass_fds=...) leaves them
            keep.add(dst)
    os.dup2(moved[log_index], 1)
    os.dup2(moved[log_index], 2)
    devnull = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(devnull, 0)
    lo = 3
    for fd in sorted(keep):
        if fd >= lo:
            os.closerange(lo, fd)
            lo = fd + 1
    os.closerange(lo, 1 << 20)  # also devnull and the moved copies


def _reset_process_state(initial_handlers: dict[int, Any]) -> None:
    # Only what differs: every write here is a copy-on-write fault (memory this DM stops sharing) and CPU time.
    signal.set_wakeup_fd(-1)
    for sig, handler in initial_handlers.items():
        if signal.getsignal(sig) != handler:
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(sig, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    root = logging.getLogger()
    for h in root.handlers[:]:
        root.removeHandler(h)  # not closed: their streams are the zygote's, gone with our fds
    # The root level stays the zygote's (INFO): the entry sets its own (daemon.dm.main: basicConfig, INFO too),
    # and each setLevel walks every logger. ``random`` needs nothing: its own at-fork hook reseeds it.


def _child(m: zw.Spawn, fds: list[int], go_r: int, entry: Entry, initial_handlers: dict[int, Any],
           area: tuple[int, int] | None, detach: Sequence[socket.socket]) -> None:
    """The forked child's whole life. Never returns."""
    code = 70  # EX_SOFTWARE: setup failed before the DM ran
    try:
        signal.set_wakeup_fd(-1)
        for s in detach:  # their fd numbers are about to be reused: the objects must never close them
            s.detach()
        go = os.read(go_r, 1)
        if go != b"g":  # the zygote died or could not tell the daemon: this DM must not run unsupervised
            os._exit(code)
        _reset_process_state(initial_handlers)
        _install_fds(fds, m.fds, m.log)
        os.setsid()
        os.chdir("/")
        import daemon.dm

        argv = [sys.executable, "-m", "daemon.dm", *m.args]
        if area is not None:
            set_cmdline(argv, area)
        sys.argv = [daemon.dm.__file__ or "daemon/dm.py", *m.args]
        daemon.dm.startup_begins()  # its timeline and CPU account start when it has its fds
        try:
            code = entry(list(m.args))
        except SystemExit as e:  # argparse's usage errors, sys.exit in a signal handler
            code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: B036 - a child must never unwind into the zygote's loop
        with contextlib.suppress(BaseException):
            import traceback

            traceback.print_exc()
        code = 1 if code == 70 else code
    finally:
        with contextlib.suppress(BaseException):
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


# -------------------------------------------------------------------------------------------------- zygote


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


class Zygote:
    """The fork server loop on its two channels (see the module docstring)."""

    def __init__(self, req: socket.socket, ev: socket.socket, entry: Entry = dm_entry,
                 cmdline_area: tuple[int, int] | None = None) -> None:
        self.req = req
        self.ev = ev
        self.entry = entry
        self.area = cmdline_area
        self.children: set[int] = set()
        self.initial_handlers: dict[int, Any] = {s: signal.getsignal(s) for s in signal.valid_signals()
                                 if s not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(s) is not None}
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        # Our own pid namespace, to set back as the one of our children after each pid_ns fork (setns(2) accepts
        # the caller's own active namespace; the children close this fd with every other one).
        self._own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.broken: str | None = None  # why the zygote must not fork again

    def serve(self) -> int:
        """Until the daemon closes the request channel. Returns the zygote's exit status."""
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd does the work
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        gc.collect()
        gc.freeze()  # children's collections skip the zygote's objects: fewer copy-on-write faults
        try:
            self.req.send(zw.encode(zw.Ready(os.getpid())))
            while True:
                ready = select.select([self.req.fileno(), self._wake_r], [], [])[0]
                if self._wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self._wake_r, 512):
                            pass
                    self._reap()
                if self.req.fileno() in ready and not self._request():
                    return 0
                if self.broken is not None:
                    log.critical("exiting: %s", self.broken)
                    return 1
        except (BrokenPipeError, ConnectionError):
            return 0  # the daemon went away
        finally:
            signal.set_wakeup_fd(-1)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.children:
                self.children.discard(pid)
                self.ev.send(zw.encode(zw.Exited(pid, os.waitstatus_to_exitcode(status))))
            else:
                log.debug("reaped orphan %d (re-parented to the zygote)", pid)

    def _request(self) -> bool:
        data, fds, truncated = recv_with_fds(self.req, zw.MAX_MESSAGE, zw.MAX_FDS)
        m_id = 0
        try:
            if not data and not fds:
                return False
            if truncated:
                raise zw.ZygoteProtocolError("more fds than a spawn may carry")
            m = zw.decode(data, len(fds))
            if not isinstance(m, zw.Spawn):
                raise zw.ZygoteProtocolError(f"the daemon sent {type(m).__name__}, not a spawn")
            m_id = m.id
            self._spawn(m, fds)
        except zw.ZygoteProtocolError as e:
            log.error("bad request from the daemon: %s", e)
            self.req.send(zw.encode(zw.SpawnError(m_id, str(e))))
        finally:
            for fd in fds:  # the child has its copies; the zygote keeps nothing of a guest
                with contextlib.suppress(OSError):
                    os.close(fd)
        return True

    def _spawn(self, m: zw.Spawn, fds: list[int]) -> None:
        n = _thread_count()
        if n != 1 or threading.active_count() != 1:
            self.req.send(zw.encode(zw.SpawnError(m.id, f"zygote has {n} threads: refusing to fork")))
            return
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = self._fork(m.pid_ns)
        except OSError as e:
            os.close(go_r)
            os.close(go_w)
            self.req.send(zw.encode(zw.SpawnError(m.id, f"fork: {e}")))
            return
        if pid == 0:
            os.close(go_w)
            _child(m, fds, go_r, self.entry, self.initial_handlers, self.area, (self.req, self.ev))
        os.close(go_r)
        self.children.add(pid)
        told = False
        if m.pid_ns and not self._restore_pid_ns():
            os.kill(pid, signal.SIGKILL)  # still waiting for "go": it never ran
            os.close(go_w)
            self.req.send(zw.encode(zw.SpawnError(m.id, f"pid namespace: {self.broken}")))
            return
        try:
            pidfd = os.pidfd_open(pid)  # not reaped yet: only this thread reaps, and it is here
            try:
                send_with_fds(self.req, zw.encode(zw.Spawned(m.id, pid)), [pidfd])
                told = True
            finally:
                os.close(pidfd)
        finally:
            if told:
                os.write(go_w, b"g")
            else:
                os.kill(pid, signal.SIGKILL)  # it is still waiting for "go": it never ran the DM
            os.close(go_w)

    def _fork(self, pid_ns: bool) -> int:
        """``os.fork()``; with ``pid_ns`` the child is pid 1 of a new pid namespace (daemon/jail.py step 10)."""
        if not pid_ns:
            return os.fork()
        sys_.unshare(sys_.CLONE_NEWPID)  # only our next child moves (pid_namespaces(7)); fails without root
        try:
            return os.fork()
        except OSError:
            self._restore_pid_ns()  # a namespace no process entered: gone with the reference we drop
            raise

    def _restore_pid_ns(self) -> bool:
        """Our own pid namespace for our next children again (the parent's side, right after a pid_ns fork)."""
        try:
            sys_.setns(self._own_pid_ns, sys_.CLONE_NEWPID)
        except OSError as e:
            # The next plain child would be forked into this DM's namespace, and unshare(CLONE_NEWPID) fails
            # (EINVAL) while pid_for_children is not our own: no more forks from this zygote.
            self.broken = f"cannot set our pid_for_children back to our own pid namespace: {e}"
            return False
        return True


def main(argv: list[str] | None = None, entry: Entry = dm_entry, load: Callable[[], None] = preload) -> int:
    """``python -m daemon.zygote``; ``entry`` and ``load`` are for tests (a probe entry instead of the DM)."""
    p = argparse.ArgumentParser(prog="kvmdm-zygote", description="kvmdm DM zygote (started by kvmdmd)")
    p.add_argument("--request-fd", type=int, required=True)
    p.add_argument("--event-fd", type=int, required=True)
    p.add_argument("--cmdline-room", default="", help="padding: argv space a forked DM writes its command line in")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="kvmdm-zygote[%(process)d] %(levelname)s %(message)s")
    req = socket.socket(fileno=a.request_fd)
    ev = socket.socket(fileno=a.event_fd)
    for s in (req, ev):
        s.set_inheritable(False)
    t0 = time.monotonic()
    load()
    n = _thread_count()
    if n != 1:
        log.error("imports started %d threads; a zygote must be single-threaded", n - 1)
        return 1
    area = _argv_area() if a.cmdline_room else None
    log.info("ready in %.0f ms, %d modules", (time.monotonic() - t0) * 1e3, len(sys.modules))
    return Zygote(req, ev, entry, area).serve()


if __name__ == "__main__":
    sys.exit(main())
