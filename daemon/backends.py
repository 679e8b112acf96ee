"""Daemon-managed vhost-user back-end processes (``kvmdm-backend``): which devices get one, how one is started,
found again after a daemon restart, and stopped.

Definitions (guest-definition schema, README "Guest definitions"):

* a disk with ``backend: "vhost-user"`` whose ``path`` is a **regular file** (or block device) is served by a
  *daemon-managed* back-end: ``kvmdm-backend blk --image <path>``, one process per disk;
* such a disk whose ``path`` is a **unix socket** uses an *external* back-end listening there (e.g.
  qemu-storage-daemon): the daemon only connects to it, and neither supervises nor restarts it;
* a nic with ``backend: "vhost-user"`` is always daemon-managed: ``kvmdm-backend net --tap <tap>`` on a
  persistent tap the daemon created for it.

The DM numbers its vhost-user devices in one list, disks first then nics, in definition order (external ones
included): that number is the ``device`` of the ``attach_backend`` control command.

Process contract (mirrors the DM's, daemon.supervisor): the back-end binds ``<runtime>/guests/<g>/bk<i>.sock``
and opens its image or tap while still root, then jails itself (``--jail-root <runtime>/guests/<g>/bk<i>`` ,
a uid of its own, seccomp policy ``backend``) keeping only those fds, and prints ``READY <socket>`` on stderr,
which goes to ``<state>/guests/<g>/backend<i>.log``. The daemon waits for that line (bounded), connects, and
hands the connected socket to the DM. ``bk<i>.pid`` (``"<pid> <restarts>"``) lets a restarted daemon find the
process again; the command line is checked before a pid is adopted or signalled (pids are recycled).

Everything here is synchronous (called from a worker thread or, for the quick kill paths, the event loop);
supervision (pidfds, restart policy, re-attach) lives in daemon.supervisor.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.config import GuestDefinition

BACKEND_COMMAND = [sys.executable, "-m", "daemon.backend_main"]
READY_TIMEOUT = 10.0
BACKEND_STATES = ("starting", "running", "restarting", "stopped", "failed")
_MARKER = "daemon.backend_main"


class BackendStartError(Exception):
    """A back-end process could not be started, did not print READY in time, or refused the connection."""


@dataclass(frozen=True)
class BackendSpec:
    """One vhost-user device of a guest. ``managed`` is False for a disk whose path is an external socket."""

    device: int  # index in the DM's vhost-user device list (disks, then nics)
    kind: str  # "blk" | "net"
    managed: bool
    path: str | None = None  # blk: image (managed) or socket (external)
    read_only: bool = False
    serial: str = ""
    nic_index: int | None = None  # net: index in definition.nics
    mac: str | None = None


def is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def specs_for(d: GuestDefinition) -> list[BackendSpec]:
    """Every vhost-user device of ``d`` in the DM's order (see the module docstring)."""
    out: list[BackendSpec] = []
    for disk in d.disks:
        if disk.backend == "vhost-user":
            out.append(BackendSpec(len(out), "blk", managed=not is_socket(disk.path), path=disk.path,
                                   read_only=disk.read_only, serial=disk.serial))
    for i, nic in enumerate(d.nics):
        if nic.backend == "vhost-user":
            out.append(BackendSpec(len(out), "net", managed=True, nic_index=i, mac=nic.mac))
    return out


@dataclass
class Backend:
    """Runtime state of one daemon-managed back-end (the daemon's view, reported in guest info)."""

    spec: BackendSpec
    rdir: Path  # the guest's runtime dir
    sdir: Path  # the guest's state dir (log)
    tap: str | None = None  # net: the persistent tap the daemon created
    state: str = "stopped"
    pid: int | None = None
    pidfd: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    restart_times: deque[float] = field(default_factory=deque)
    last_exit_reason: str | None = None
    stop_requested: bool = False
    generation: int = 0
    task: Any = None  # asyncio.Task of a pending restart

    @property
    def socket_path(self) -> Path:
        return self.rdir / f"bk{self.spec.device}.sock"

    @property
    def jail_root(self) -> Path:
        return self.rdir / f"bk{self.spec.device}"

    @property
    def pid_file(self) -> Path:
        return self.rdir / f"bk{self.spec.device}.pid"

    @property
    def log_file(self) -> Path:
        return self.sdir / f"backend{self.spec.device}.log"

    def info(self) -> dict[str, Any]:
        return {"device": self.spec.device, "kind": self.spec.kind, "pid": self.pid, "state": self.state,
                "restarts": self.restarts, "last_exit_reason": self.last_exit_reason}

    def argv(self, command: list[str], uid: int | None) -> list[str]:
        s = self.spec
        argv = [*command, s.kind, "--socket", str(self.socket_path)]
        if s.kind == "blk":
            assert s.path is not None
            argv += ["--image", s.path]
            if s.read_only:
                argv.append("--readonly")
            if s.serial:
                argv += ["--serial", s.serial]
        else:
            assert self.tap is not None
            argv += ["--tap", self.tap]
            if s.mac:
                argv += ["--mac", s.mac]
        if uid is None:
            argv.append("--no-jail")
        else:
            argv += ["--jail-root", str(self.jail_root), "--uid", str(uid), "--gid", str(uid)]
        return argv


def spawn(b: Backend, command: list[str], uid: int | None, timeout: float = READY_TIMEOUT) -> socket.socket:
    """Start ``b``'s process, wait for its READY line, connect; returns the connected socket (caller owns it).

    On failure the process is killed and reaped and :class:`BackendStartError` says why (with the log's tail).
    """
    b.rdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    b.sdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    b.socket_path.unlink(missing_ok=True)
    if uid is not None:
        b.jail_root.mkdir(mode=0o755, exist_ok=True)
    log_fd = os.open(b.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    try:
        if os.fstat(log_fd).st_size > 8 << 20:
            os.ftruncate(log_fd, 0)
        start = os.fstat(log_fd).st_size
        popen = subprocess.Popen(b.argv(command, uid), stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                 close_fds=True, start_new_session=True, cwd="/")
    finally:
        os.close(log_fd)
    b.popen, b.pid = popen, popen.pid
    try:
        _wait_ready(b, popen, start, timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(b.socket_path))
        except OSError as e:
            sock.close()
            raise BackendStartError(f"cannot connect to {b.socket_path}: {e.strerror or e}") from None
    except BaseException:
        kill(b)
        raise
    write_pid_file(b)
    return sock


def _wait_ready(b: Backend, popen: subprocess.Popen[bytes], start: int, timeout: float) -> None:
    want = f"READY {b.socket_path}".encode()
    deadline = time.monotonic() + timeout
    while True:
        text = _read_from(b.log_file, start)
        if want in text:
            return
        rc = popen.poll()
        if rc is not None:
            raise BackendStartError(f"{b.spec.kind} back-end exited with status {rc} before READY: "
                                    f"{_tail(text)}")
        if time.monotonic() > deadline:
            raise BackendStartError(f"{b.spec.kind} back-end did not print READY within {timeout:g} s: "
                                    f"{_tail(text)}")
        time.sleep(0.01)


def _read_from(path: Path, start: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(1 << 20)
    except OSError:
        return b""


def _tail(text: bytes) -> str:
    lines = text.decode("utf-8", "replace").strip().splitlines()
    return " | ".join(lines[-3:]) or "(no output)"


def _kill_jailed_child(b: Backend) -> None:
    """SIGKILL the jailed process (the keeper's only child) first, so that its keeper reaps it and exits: killing
    the keeper first would orphan it to the nearest subreaper (init, or a test runner) as an unreaped zombie."""
    if b.pid is None:
        return
    try:
        kids = Path(f"/proc/{b.pid}/task/{b.pid}/children").read_text().split()
        if len(kids) != 1:
            return
        child = int(kids[0])
        cfd = os.pidfd_open(child)
    except (OSError, ValueError):
        return
    try:
        # Still the keeper's child now that the pidfd pins it (not a recycled pid)?
        if Path(f"/proc/{b.pid}/task/{b.pid}/children").read_text().split() == kids:
            signal.pidfd_send_signal(cfd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(cfd)


def kill(b: Backend) -> None:
    """SIGKILL the jailed process, then its keeper (which follows anyway: it re-raises its child's fatal signal),
    and reap the keeper if it is our child. Never signals a bare pid: only pidfds or our Popen child
    (pidfd_send_signal cannot hit a recycled pid)."""
    if b.pidfd is not None or b.popen is not None:
        _kill_jailed_child(b)
        if b.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                b.popen.wait(1)  # the keeper reaps its child and exits on its own
    if b.pidfd is not None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(b.pidfd, signal.SIGKILL)
    elif b.popen is not None:
        with contextlib.suppress(ProcessLookupError, OSError):
            b.popen.kill()
    if b.popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            b.popen.wait(5)


def remove_files(b: Backend) -> None:
    """The back-end's runtime files (socket, pid file, jail root); its log stays with the guest's state."""
    b.socket_path.unlink(missing_ok=True)
    b.pid_file.unlink(missing_ok=True)
    shutil.rmtree(b.jail_root, ignore_errors=True)


def write_pid_file(b: Backend) -> None:
    """``<pid> <restarts> <tap or ->``: what a restarted daemon needs to adopt, restart and clean up ``b``."""
    b.pid_file.write_text(f"{b.pid} {b.restarts} {b.tap or '-'}\n")


def read_pid_file(b: Backend) -> tuple[int, int, str | None] | None:
    try:
        parts = b.pid_file.read_text().split()
        pid, restarts, tap = int(parts[0]), int(parts[1]), parts[2]
    except (OSError, ValueError, IndexError):
        return None
    if pid <= 1 or restarts < 0 or not 0 < len(tap) <= 15:
        return None
    return pid, restarts, None if tap == "-" else tap


def is_our_backend(pid: int, b: Backend) -> bool:
    """``/proc/<pid>/cmdline`` is a back-end command line for exactly this socket (a recycled pid is never
    adopted)."""
    try:
        args = [a.decode("utf-8", "replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return False
    return any(_MARKER in a or a.endswith("kvmdm-backend") for a in args[:3]) and str(b.socket_path) in args
