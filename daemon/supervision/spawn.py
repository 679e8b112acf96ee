"""The DM process builder: every fd of the DM's argv contract prepared, the DM forked/exec'd with exactly those,
our copies closed; and the jail uids DMs and their back-ends run as.

Argv contract (daemon.dm.parse_args): ``--control-fd`` (a listening unix socket bound at the guest's control
path), ``--definition-fd`` (a pipe holding the definition's JSON), ``--console-fd`` (console.log: a start keeps
the previous run's as console.log.1, a guest's own reboot goes on in the same file), ``--kvm-fd``, ``--kernel-fd``, ``--initrd-fd``, one ``--disk-fd`` per disk (the
image, or a socket connected to its vhost-user back-end), one ``--tap-fd`` per nic (a tap, or a socket connected to
its net back-end), ``--nic-rom-fd`` (a firmware guest with nics: its nic_rom file), then ``--jail-root/--uid/--gid``
or ``--no-jail`` (the fds: daemon.messages.DM_FDS). stdout/stderr go to the guest's dm.log.

How the DM is started is the caller's choice (``launch``): :func:`exec_dm` (``Popen`` of the configured
dm_command with the argv and fds) or the zygote (daemon.supervision.forkserver: a fork of a pre-imported process
given the same fds at the same numbers and the same arguments, from ``daemon.dm.parse_args`` on the same DM).

Jail uids: the DM of a guest gets one from the lower half of the configured range, its back-ends share the uid at
the same position in the upper half.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daemon import backends as bk
from daemon.config import DEMO_KERNEL, GuestDefinition
from daemon.supervision.errors import StartFailed
from daemon.supervision.settings import SupervisorConfig
from daemon.supervision.state import Guest


class UidPool:
    """Jail uids of the configured range: lower half for DMs, the upper half mirrors it for back-ends."""

    def __init__(self, base: int, count: int) -> None:
        self.base = base
        self.count = count
        self._used: set[int] = set()

    def contains(self, uid: int) -> bool:
        return self.base <= uid < self.base + self.count

    def claim(self, uid: int) -> None:
        """A uid found in use (a DM re-attached after a daemon restart)."""
        self._used.add(uid)

    def alloc(self) -> int:
        for i in range(max(1, self.count // 2)):
            uid = self.base + i
            if uid not in self._used:
                self._used.add(uid)
                return uid
        raise StartFailed("no free jail uid left in the configured range")

    def release(self, uid: int | None) -> None:
        if uid is not None:
            self._used.discard(uid)

    def backend_uid(self, dm_uid: int) -> int:
        """Distinct from every DM's, inside the configured range."""
        return dm_uid + self.count // 2 if self.count >= 2 else dm_uid


def open_kernel(d: GuestDefinition) -> int:
    if d.firmware is not None:
        # A firmware guest's DM gets the BIOS image on its kernel fd (daemon.builder.machine_config).
        from daemon.config import firmware_file

        return os.open(firmware_file(d.firmware), os.O_RDONLY | os.O_CLOEXEC)
    if d.kernel != DEMO_KERNEL:
        return os.open(d.kernel, os.O_RDONLY | os.O_CLOEXEC)
    from kvmcore.util.guest_build import build_demo  # lazy: building may be slow

    built: Any = build_demo()
    if isinstance(built, bytes | bytearray):
        fd = os.memfd_create("kvmdm-demo-kernel", os.MFD_CLOEXEC)
        os.write(fd, built)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd
    return os.open(os.fspath(built), os.O_RDONLY | os.O_CLOEXEC)


@dataclass(frozen=True)
class DmLaunch:
    """One DM to start: ``args`` for ``daemon.dm.parse_args`` (the fds they name are ``pass_fds``, at those
    numbers) and ``log_fd``, the guest's dm.log, for stdout and stderr; ``jailed``: it will jail itself (the
    zygote then forks it as pid 1 of its own pid namespace, daemon/jail.py step 10)."""

    args: list[str]
    pass_fds: list[int]
    log_fd: int
    jailed: bool = False


def exec_dm(cfg: SupervisorConfig, launch: DmLaunch) -> subprocess.Popen[bytes]:
    """``--dm-spawn exec``: fork/exec the configured dm_command with exactly the launch's fds."""
    return subprocess.Popen(list(cfg.dm_command) + launch.args, pass_fds=launch.pass_fds, start_new_session=True,
                            close_fds=True, stdin=subprocess.DEVNULL, stdout=launch.log_fd, stderr=launch.log_fd,
                            cwd="/")


def spawn_dm(cfg: SupervisorConfig, g: Guest, *, jailed: bool, backend_uid: int | None,
             end_backend: Callable[[bk.Backend], None],
             launch: Callable[[DmLaunch], Any] | None = None) -> Any:
    """Prepare every fd of the contract, start the guest's managed back-ends (``g.backends``), start the DM with
    exactly those fds (``launch``, default :func:`exec_dm`; its result is returned), close our copies. Runs in a
    worker thread. On failure every back-end it started is ended and ``g.backends`` is empty again."""
    paths = cfg.paths
    d = g.definition
    name = d.name
    rdir = paths.guest_runtime_dir(name)
    rdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    sdir = paths.guest_state_dir(name)
    sdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    to_close: list[int] = []
    listener: socket.socket | None = None
    specs = iter(bk.specs_for(d))
    g.backends = []
    ok = False

    def keep(fd: int) -> int:
        to_close.append(fd)
        return fd

    def managed(spec: bk.BackendSpec, tap: str | None = None) -> int:
        b = bk.Backend(spec, rdir, sdir, tap=tap, state="starting")
        g.backends.append(b)
        sock = bk.spawn(b, cfg.backend_command, backend_uid, cfg.backend_ready_timeout)
        return keep(sock.detach())

    try:
        sock_path = paths.control_socket(name)
        sock_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(sock_path))  # inside a 0700 dir, so the window before chmod is not exposed
        os.chmod(sock_path, 0o600)
        listener.listen(4)
        ctl = listener.fileno()

        r, w = os.pipe()
        keep(r)
        try:
            # The definition is small (bounded schema) and fits the 64 KiB pipe buffer, so this cannot block.
            os.write(w, d.to_json().encode())
        finally:
            os.close(w)

        console = paths.console_log(name)
        if g.rebooting:  # the guest reset itself: its next boot goes on in the same log, from a line start
            con = keep(os.open(console, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640))
            if os.pread(con, 1, max(0, os.fstat(con).st_size - 1)) not in (b"", b"\n"):
                os.write(con, b"\n")
        else:
            if console.exists() and console.stat().st_size > 0:
                os.replace(console, console.with_name("console.log.1"))
            con = keep(os.open(console, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o640))
        dmlog = keep(os.open(sdir / "dm.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640))
        if os.fstat(dmlog).st_size > 8 << 20:
            os.ftruncate(dmlog, 0)

        kvm = keep(os.open(cfg.kvm_device, os.O_RDWR | os.O_CLOEXEC))
        kernel = keep(open_kernel(d))
        argv = ["--control-fd", str(ctl), "--definition-fd", str(r),
                                       "--console-fd", str(con), "--kvm-fd", str(kvm),
                                       "--kernel-fd", str(kernel)]
        if d.initrd is not None:
            argv += ["--initrd-fd", str(keep(os.open(d.initrd, os.O_RDONLY | os.O_CLOEXEC)))]
        if d.nic_rom is not None and d.nics:
            from daemon.config import nic_rom_file

            argv += ["--nic-rom-fd", str(keep(os.open(nic_rom_file(d.nic_rom), os.O_RDONLY | os.O_CLOEXEC)))]
        for disk in d.disks:
            spec = next(specs) if disk.backend == "vhost-user" else None
            if spec is not None and spec.managed:
                fd = managed(spec)  # our kvmdm-backend serves the image
            elif spec is not None:
                # External back-end: the jailed DM cannot connect() by path; it gets an already connected socket.
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(disk.path)
                except OSError:
                    s.close()
                    raise
                fd = keep(s.detach())
            else:
                fd = keep(os.open(disk.path, (os.O_RDONLY if disk.read_only else os.O_RDWR) | os.O_CLOEXEC))
            argv += ["--disk-fd", str(fd)]
        if d.nics:
            from daemon import net as dnet  # lazy: pyroute2 only for guests with NICs

            for i, nic in enumerate(d.nics):
                if nic.backend == "vhost-user":
                    # Persistent, so that the back-end can open it by name (now and after a restart); removed
                    # when the back-end is stopped (BackendSupervisor.end).
                    ifname, tfd = dnet.create_tap(nic.tap, bridge=nic.bridge, owner_uid=None, guest=name,
                                                  index=i, persist=True)
                    os.close(tfd)  # a tap without IFF_MULTI_QUEUE takes one fd: the back-end's
                    argv += ["--tap-fd", str(managed(next(specs), ifname))]
                    continue
                # Not persistent: the tap goes away with the DM's fd; we close our copy below.
                _ifname, fd = dnet.create_tap(nic.tap, bridge=nic.bridge, owner_uid=g.uid, guest=name, index=i)
                argv += ["--tap-fd", str(keep(fd))]
        if jailed:
            root = paths.jail_root(name)
            root.mkdir(mode=0o755, exist_ok=True)
            argv += ["--jail-root", str(root), "--uid", str(g.uid), "--gid", str(g.uid)]
        else:
            argv += ["--no-jail"]
        pass_fds = [ctl, *(fd for fd in to_close if fd != dmlog)]
        dm = DmLaunch(argv, pass_fds, dmlog, jailed)
        started = exec_dm(cfg, dm) if launch is None else launch(dm)
        ok = True
        return started
    finally:
        if not ok:
            for b in g.backends:
                end_backend(b)
            g.backends = []
        if listener is not None:
            listener.close()
        for fd in to_close:
            with contextlib.suppress(OSError):
                os.close(fd)
