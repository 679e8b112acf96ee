"""pidfds for supervised processes (DMs and back-ends).

``os.pidfd_open(pid)`` is readable once the process exits (pidfd_open(2)), so an exit is noticed by the event
loop at once, not by polling; ``pidfd_send_signal`` cannot hit a recycled pid. A pid read from a file is only
trusted once a pidfd pins it *and* its command line says it is ours (:func:`open_verified`). The exit status is
only available for our own children (``Popen``) and, for DMs forked by the zygote, from the zygote's report
(daemon.supervision.forkserver); after a daemon restart the processes were re-parented and the caller must say
what is known instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any


def open_verified(pid: int, is_ours: Callable[[int], bool]) -> int | None:
    """A pidfd for ``pid`` if it is alive and ``is_ours(pid)`` holds once pinned; else None."""
    try:
        pidfd = os.pidfd_open(pid)  # opened first: from here on the pid cannot be recycled under us
    except (ProcessLookupError, OSError):
        return None
    if not is_ours(pid):
        os.close(pidfd)
        return None
    return pidfd


def watch(pidfd: int, callback: Callable[..., None], *args: Any) -> None:
    """Call ``callback(*args)`` on the running loop when the process behind ``pidfd`` exits."""
    asyncio.get_running_loop().add_reader(pidfd, callback, *args)


def unwatch(pidfd: int) -> None:
    """Stop watching and close ``pidfd`` (safe off the loop thread, where nothing was registered)."""
    with contextlib.suppress(RuntimeError):  # no running loop (a spawn thread): nothing registered
        asyncio.get_running_loop().remove_reader(pidfd)
    os.close(pidfd)


def send_signal(pidfd: int | None, sig: int) -> None:
    if pidfd is not None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, sig)


def reap(popen: subprocess.Popen[bytes], what: str) -> tuple[int | None, str | None]:
    """Our child has exited (its pidfd is readable, so this does not block): ``(code, None)`` for an exit,
    ``(None, "<what> killed by signal NAME")`` for a fatal signal."""
    return split_returncode(popen.wait(), what)


def split_returncode(rc: int, what: str) -> tuple[int | None, str | None]:
    """A ``Popen.returncode`` (``-SIG`` for a fatal signal; the DM zygote reports the same convention) as
    :func:`reap` returns it."""
    if rc >= 0:
        return rc, None
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = str(-rc)
    return None, f"{what} killed by signal {name}"


def jailed_child(pid: int) -> int | None:
    """A jailed process with a keeper is the only child of the spawned pid (the jail's keeper, daemon/jail.py
    step 10): the process whose memory and CPU are the guest's. None when the spawned pid has no child: an
    unjailed process, or a zygote-forked DM, which was born pid 1 of its pid namespace and has no keeper."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if len(kids) == 1 else None


def cmdline(pid: int) -> list[str]:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in argv if a]
