"""The pid-namespace keeper's program (daemon/keeper.c): built once, opened before the jail, exec'd by the keeper.

The jail's keeper (daemon/jail.py, step 10) is the process a jailed DM leaves behind in the host's pid namespace
when it forks into its own. As a fork of the DM it kept a whole interpreter for a life of waiting, so it now
execs ``keeper.c``, a few KiB with no libc, through an fd opened before ``pivot_root`` (the jail has no files).
The build is keyed by the source's hash and the signal set it is compiled with, into the per-user cache
(kvmcore.cext.cache_dir), with the system compiler; when it cannot be built (no compiler, read-only cache) the
Python keeper (jail._keeper) does the same work and kvmdm says so once.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

from kvmcore.cext import build_program

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("keeper.c")
CFLAGS = ("-Os", "-nostdlib", "-static", "-ffreestanding", "-fno-stack-protector", "-fno-pie", "-no-pie",
          "-fno-asynchronous-unwind-tables", "-Wl,--build-id=none", "-Wall", "-Werror")
ENV_KEY = "KVMDM_KEEPER"
_state: dict[str, Path | None] = {}


def _mask(signals: Iterable[int]) -> int:
    return sum(1 << (int(s) - 1) for s in set(signals))


def program(waits: Iterable[int]) -> Path | None:
    """The built keeper for the signal set ``waits`` (built on first call), or None if it cannot be built."""
    mask = _mask(waits)
    key = f"{mask:#x}"
    if key in _state:
        return _state[key]
    path: Path | None = None
    try:
        # Mode 0755 (build_program): the unprivileged keeper execs it through an fd, so the directories on the
        # way, e.g. /root's 0700, are never looked up again.
        path = build_program("keeper", SOURCE, (*CFLAGS, f"-DKEEPER_WAITS={mask:#x}UL"))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.warning("the C keeper cannot be built (%s%s): jailed processes keep a Python keeper", e,
                    (": " + detail.decode(errors="replace")[-300:]) if detail else "")
        path = None
    _state[key] = path
    return path


def open_program(waits: Iterable[int]) -> int | None:
    """An O_PATH, close-on-exec fd of the keeper program for execveat(fd, "", AT_EMPTY_PATH), or None."""
    if os.environ.get("KVMDM_PYTHON_KEEPER") == "1":
        return None
    path = program(waits)
    if path is None:
        return None
    try:
        return os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        log.warning("the C keeper %s cannot be opened (%s): a Python keeper is used", path, e)
        return None
