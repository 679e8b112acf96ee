"""A DM zygote (daemon.zygote's real serve loop and fork path) whose children report what they were given instead
of running a DM: tests/unit/daemon/test_daemon_zygote.py starts it with ``ForkServer(command=[python, THIS])``.

A child's ``args`` say what to do after reporting: ``exit N``, ``signal NAME`` (kill itself), ``sleep``,
``segv`` (a real SIGSEGV, which the kernel forces even on a pid 1), ``seccomp`` (load the DM's seccomp policy,
then make a call it kills the process for: SIGSYS).
The report is one JSON line on its stdout (the "log" fd of the spawn).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from daemon import zygote  # noqa: E402


def report() -> dict[str, object]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the directory fd listdir used, closed by now
    return {
        "pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0), "cwd": os.getcwd(),
        "fds": {str(k): v for k, v in sorted(fds.items())},
        "cmdline": [a.decode() for a in Path("/proc/self/cmdline").read_bytes().split(b"\0") if a],
        "handlers": {str(int(s)): repr(signal.getsignal(s)) for s in sorted(signal.valid_signals())
                     if s not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(s) is not None},
        "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "logging_handlers": len(logging.getLogger().handlers),
        "threads": len(os.listdir("/proc/self/task")),
        "random": random.random(),
        "argv": sys.argv[1:],
        "pid_ns": os.readlink("/proc/self/ns/pid"),
    }


def probe(args: list[str]) -> int:
    print(json.dumps(report()), flush=True)
    if args[:1] == ["exit"]:
        return int(args[1])
    if args[:1] == ["signal"]:
        sig = signal.Signals[args[1]]
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        time.sleep(5)
    if args[:1] == ["sleep"]:
        time.sleep(3600)
    if args[:1] == ["segv"]:
        import ctypes
        import faulthandler

        faulthandler.disable()
        ctypes.string_at(8, 1)
    if args[:1] == ["seccomp"]:
        from daemon import _jailsys, seccomp_policy

        seccomp_policy.build_filter(seccomp_policy.policy_for("dm"), {"self_tgid": os.getpid()}).load()
        _jailsys.raw_syscall(_jailsys.SYS_ptrace, 16, 1, 0, 0)  # PTRACE_ATTACH: KILL_PROCESS in the DM policy
        return 99  # not reached
    return 0


if __name__ == "__main__":
    if "--dump-fresh-handlers" in sys.argv:  # what a freshly started interpreter has, to compare with
        print(json.dumps(report()["handlers"]))
        sys.exit(0)
    sys.exit(zygote.main(sys.argv[1:], entry=probe))  # the real preload: what a production zygote imports
