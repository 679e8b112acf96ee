"""Supervision of device-model processes: spawn with exactly the contract's fds, watch with pidfds, restart per
policy, re-attach after a daemon restart.

One :class:`Guest` per definition holds the runtime state. Lifecycle (the daemon's view, ``Guest.state``)::

    stopped --start--> starting --ping ok--> running <--pause/resume--> paused
    running/paused --stop--> stopping --exit--> stopped
    (any live) --DM exits--> restarting --backoff--> starting      (policy allows, under max_restarts)
                           \\-> stopped | crashed | failed            (policy forbids / limit reached)

Exit detection: ``os.pidfd_open(pid)`` registered with the event loop (readable when the process exits, see
pidfd_open(2)), so an exit is noticed immediately, not by polling. If the DM is our child we ``waitpid`` it for the
exit status. After a daemon restart the DMs are *not* our children (they were re-parented when the old daemon
exited), so their exit status is unavailable (waitpid gives ECHILD); the exit reason is then taken from the last
state event the DM sent on its control connection, or reported as unknown.

vhost-user back-ends (daemon.backends): started before the DM (each connected socket is passed as the disk's or
nic's fd), watched with their own pidfds, stopped with the DM. A back-end that dies while its guest runs is
restarted under the guest's restart policy and limits (``max_restarts`` per ``restart_window_s``, per
back-end) and its new connection handed to the running DM by ``attach_backend`` (an fd over the control
socket): the guest is not rebooted. A back-end that cannot be restarted is marked ``failed``; the DM's
front-end then puts the device in NEEDS_RESET (see pv.vhost_user.frontend) and the DM keeps running.
Jail uids: the DM of a guest gets one from the lower half of the configured range, its back-ends share the
uid at the same position in the upper half.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import backends as bk
from daemon import messages as msg
from daemon.config import DEMO_KERNEL, ConfigError, GuestDefinition, parse_definition
from daemon.control import (
    ControlClient,
    ControlClosed,
    ControlError,
    ControlTimeout,
    ProtocolError,
    StateEvent,
)
from daemon.messages import ExitCode, Stats, describe_exit
from daemon.paths import Paths
from daemon.store import DefinitionStore, StoreError, atomic_write

log = logging.getLogger(__name__)

DEFAULT_DM_COMMAND = [sys.executable, "-m", "daemon.dm"]
LIVE_STATES = frozenset({"starting", "running", "paused", "stopping"})
CONSOLE_ROTATE_KEEP = 1  # console.log.1 keeps the previous run's output


class SupervisorError(Exception):
    """Base; ``status`` is the HTTP status the API answers with."""

    status = 409


class GuestNotFound(SupervisorError):
    status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"guest {name!r} not found")


class GuestExists(SupervisorError):
    status = 409


class InvalidState(SupervisorError):
    """The operation is not possible in the guest's current state."""

    status = 409


class StartFailed(SupervisorError):
    """The DM could not be prepared or did not come up (message says why)."""

    status = 422


class DMFault(SupervisorError):
    """The DM misbehaved (invalid answer): a fault of the upstream process, not of the client."""

    status = 502


class DMTimeout(DMFault):
    """The DM did not answer a control request in time (a DM fault, not the client's)."""

    status = 504


class InvalidDefinition(SupervisorError):
    status = 422

    def __init__(self, err: ConfigError) -> None:
        super().__init__(str(err))
        self.errors = err.errors


@dataclass
class Guest:
    definition: GuestDefinition
    state: str = "stopped"
    pid: int | None = None
    pidfd: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    started_at: float | None = None  # wall clock, survives daemon restarts via meta.json
    last_exit_reason: str | None = None
    last_exit_code: int | None = None
    guest_status: int | None = None
    restarts: int = 0
    restart_times: deque[float] = field(default_factory=deque)
    control: ControlClient | None = None
    last_event: StateEvent | None = None
    uid: int | None = None
    stop_requested: bool = False
    restart_task: asyncio.Task[None] | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    generation: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=100))
    backends: list[bk.Backend] = field(default_factory=list)  # daemon-managed vhost-user back-ends

    @property
    def name(self) -> str:
        return self.definition.name

    def uptime(self) -> float | None:
        if self.started_at is None or self.state not in LIVE_STATES:
            return None
        return max(0.0, time.time() - self.started_at)

    def note(self, event: str) -> None:
        self.events.append({"time": time.time(), "event": event})
        log.info("guest %s: %s", self.name, event)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "dm_pid": self.pid,
            "uptime_s": self.uptime(),
            "last_exit_reason": self.last_exit_reason,
            "last_exit_code": self.last_exit_code,
            "guest_status": self.guest_status,
            "restarts": self.restarts,
            "uid": self.uid,
            "last_event": self.last_event.reason if self.last_event is not None else None,
            "backends": [b.info() for b in self.backends],
        }


@dataclass
class SupervisorConfig:
    paths: Paths
    dm_command: list[str] = field(default_factory=lambda: list(DEFAULT_DM_COMMAND))
    kvm_device: str = "/dev/kvm"
    no_jail: bool = False
    uid_base: int = 200000
    uid_count: int = 10000
    start_timeout: float = 10.0
    stop_timeout: float = 10.0
    request_timeout: float = 5.0
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    backend_command: list[str] = field(default_factory=lambda: list(bk.BACKEND_COMMAND))
    backend_ready_timeout: float = bk.READY_TIMEOUT
    # Back-end restarts back off too, but stay well under the front-end's re-attach grace (5 s).
    backend_backoff_max: float = 1.0


class Supervisor:
    def __init__(self, cfg: SupervisorConfig) -> None:
        self.cfg = cfg
        self.paths = cfg.paths
        self.store = DefinitionStore(cfg.paths)
        self.guests: dict[str, Guest] = {}
        self.store_errors: list[StoreError] = []
        self._uids: set[int] = set()
        self._closing = False

    # ------------------------------------------------------------------------------------------------ startup

    async def load(self) -> None:
        """Load definitions, then find DMs left running by a previous daemon and re-attach to them."""
        self.paths.ensure()
        defs, self.store_errors = self.store.load_all()
        for d in defs.values():
            self.guests[d.name] = Guest(d)
            self.guests[d.name].exited.set()
        rg = self.paths.runtime_guests_dir
        for entry in sorted(rg.iterdir()) if rg.is_dir() else []:
            g = self.guests.get(entry.name)
            if g is None:
                await self._reap_orphan_dir(entry)
            else:
                await self._reattach(g)

    def _read_pid(self, name: str) -> int | None:
        try:
            pid = int(self.paths.dm_pid_file(name).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid > 1 else None

    def is_our_dm(self, pid: int) -> bool:
        """``/proc/<pid>/cmdline`` must be a DM command line: ``daemon.dm`` or the configured dm command, plus the
        contract's ``--control-fd`` (a recycled pid of an unrelated process must never be adopted or killed)."""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        args = [a.decode("utf-8", "replace") for a in argv if a]
        if "--control-fd" not in args:
            return False
        n = len(self.cfg.dm_command)
        return args[:n] == self.cfg.dm_command or any("daemon.dm" in a for a in args[:3])

    async def _reattach(self, g: Guest) -> None:
        name = g.name
        self._adopt_backends(g)  # first, so that every path below that ends the guest also stops them
        pid = self._read_pid(name)
        if pid is None:
            self._stop_backends(g)
            self._cleanup_runtime(name, keep_dir=False)
            return
        try:
            pidfd = os.pidfd_open(pid)  # opened first: from here on the pid cannot be recycled under us
        except ProcessLookupError:
            pidfd = None
        if pidfd is not None and not self.is_our_dm(pid):
            os.close(pidfd)
            pidfd = None
        if pidfd is None:
            self._cleanup_runtime(name, keep_dir=False)
            g.note(f"DM pid {pid} exited while the daemon was not running")
            self._after_exit(g, "DM exited while the daemon was not running (exit status unknown)", None,
                             failure=True)
            return
        meta = self._read_meta(name)
        g.pid, g.pidfd, g.popen = pid, pidfd, None
        g.started_at = meta.get("started_at", time.time())
        g.uid = meta.get("uid")
        g.restarts = int(meta.get("restarts", 0))
        if g.uid is not None:
            self._uids.add(g.uid)
        g.generation += 1
        g.exited = asyncio.Event()
        g.state = "running"
        asyncio.get_running_loop().add_reader(pidfd, self._on_pidfd, g, g.generation)
        try:
            client = await self._connect(g, timeout=2.0)
            await client.call(msg.Ping(), timeout=2.0)
        except (OSError, ControlError, TimeoutError) as e:
            g.note(f"re-attach to DM pid {pid} failed ({e}); killing it")
            self._signal(g, signal.SIGKILL)
            return
        g.note(f"re-attached to running DM pid {pid} (not our child: exit status will come from its events)")
        for b in g.backends:
            if b.pidfd is None:  # died while the daemon was down: restart it and hand it to the DM
                self._backend_failed(g, b, "back-end exited while the daemon was not running")

    def _adopt_backends(self, g: Guest) -> None:
        """After a daemon restart: find the guest's managed back-ends by their pid files (cmdline checked)."""
        rdir, sdir = self.paths.guest_runtime_dir(g.name), self.paths.guest_state_dir(g.name)
        g.backends = []
        loop = asyncio.get_running_loop()
        for spec in bk.specs_for(g.definition):
            if not spec.managed:
                continue
            b = bk.Backend(spec, rdir, sdir)
            rec = bk.read_pid_file(b)
            if rec is None:
                continue  # never started (guest was not running)
            pid, b.restarts, b.tap = rec
            g.backends.append(b)
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            if not bk.is_our_backend(pid, b):
                os.close(pidfd)
                continue
            b.pid, b.pidfd, b.state = pid, pidfd, "running"
            b.generation += 1
            loop.add_reader(pidfd, self._on_backend_pidfd, g, b, b.generation)

    async def _reap_orphan_dir(self, entry: Path) -> None:
        """A runtime dir without a definition: kill its DM if it is provably ours, then remove the dir."""
        pid = self._read_pid(entry.name)
        if pid is not None:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                pidfd = None
            if pidfd is not None:
                if self.is_our_dm(pid):
                    log.warning("killing orphan DM pid %d of undefined guest %s", pid, entry.name)
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                os.close(pidfd)
        for pid_file in entry.glob("bk*.pid"):  # its back-ends too (cmdline must name their socket)
            try:
                bpid = int(pid_file.read_text().split()[0])
                bpidfd = os.pidfd_open(bpid)
            except (OSError, ValueError, IndexError):
                continue
            try:
                argv = Path(f"/proc/{bpid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                argv = []
            if str(pid_file.with_suffix(".sock")).encode() in argv:
                log.warning("killing orphan back-end pid %d of undefined guest %s", bpid, entry.name)
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(bpidfd, signal.SIGKILL)
            os.close(bpidfd)
        shutil.rmtree(entry, ignore_errors=True)

    def _read_meta(self, name: str) -> dict[str, Any]:
        try:
            meta = json.loads(self.paths.meta_file(name).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(meta, dict):
            return {}
        out: dict[str, Any] = {}
        if isinstance(meta.get("started_at"), int | float):
            out["started_at"] = float(meta["started_at"])
        uid = meta.get("uid")
        if isinstance(uid, int) and self.cfg.uid_base <= uid < self.cfg.uid_base + self.cfg.uid_count:
            out["uid"] = uid
        if isinstance(meta.get("restarts"), int):
            out["restarts"] = meta["restarts"]
        return out

    # ----------------------------------------------------------------------------------------------- lookup

    def get(self, name: str) -> Guest:
        g = self.guests.get(name)
        if g is None:
            raise GuestNotFound(name)
        return g

    # ------------------------------------------------------------------------------------------ create/destroy

    async def create(self, raw: Any) -> Guest:
        try:
            d = parse_definition(raw, check_paths=True)
        except ConfigError as e:
            raise InvalidDefinition(e) from None
        if d.name in self.guests:
            raise GuestExists(f"guest {d.name!r} already exists")
        await asyncio.to_thread(self.store.save, d)
        g = Guest(d)
        g.exited.set()
        self.guests[d.name] = g
        g.note("defined")
        return g

    async def destroy(self, name: str) -> None:
        g = self.get(name)
        async with g.lock:
            g.stop_requested = True
            self._cancel_restart(g)
            if g.pidfd is not None:
                await self._kill_and_wait(g, "destroyed")
            self._release_uid(g)
            await asyncio.to_thread(self._remove_files, name)
            if g.definition.nics:
                await asyncio.to_thread(self._release_nics, g.definition)
            self.guests.pop(name, None)
            log.info("guest %s: destroyed", name)

    @staticmethod
    def _release_nics(d: GuestDefinition) -> None:
        """Remove taps and bridges daemon.net created for ``d`` (only ones marked ours; errors logged)."""
        from daemon import net as dnet

        try:
            dnet.cleanup(d.name)
            for bridge in {nic.bridge for nic in d.nics if nic.bridge}:
                dnet.release_bridge(bridge)
        except Exception as e:  # noqa: BLE001 - NetError, NetlinkError, OSError: log, destroy goes on
            log.warning("guest %s: network cleanup failed: %s", d.name, e)

    def _remove_files(self, name: str) -> None:
        self.store.delete(name)
        shutil.rmtree(self.paths.guest_state_dir(name), ignore_errors=True)
        shutil.rmtree(self.paths.guest_runtime_dir(name), ignore_errors=True)

    # ----------------------------------------------------------------------------------------------- start

    async def start(self, name: str) -> Guest:
        g = self.get(name)
        async with g.lock:
            if g.state in LIVE_STATES:
                raise InvalidState(f"guest {name!r} is already {g.state}")
            self._cancel_restart(g)
            g.stop_requested = False
            g.restart_times.clear()  # an operator's start opens a fresh restart window
            await self._start_locked(g)
        return g

    async def _start_locked(self, g: Guest) -> None:
        name = g.name
        if g.uid is None and self._jailed(g):
            g.uid = self._alloc_uid()
        try:
            popen = await asyncio.to_thread(self._spawn, g)
        except Exception as e:  # noqa: BLE001 - any failure preparing the DM (missing image, demo build error)
            log.debug("guest %s: spawn preparation failed", name, exc_info=True)
            g.state = "failed" if g.state == "restarting" else "stopped"
            g.last_exit_reason = f"start failed: {e}"
            self._release_uid(g)
            g.note(g.last_exit_reason)
            raise StartFailed(f"guest {name!r}: {g.last_exit_reason}") from None
        g.generation += 1
        g.popen, g.pid = popen, popen.pid
        g.pidfd = os.pidfd_open(popen.pid)
        g.exited = asyncio.Event()
        g.state = "starting"
        g.started_at = time.time()
        g.last_event = None
        asyncio.get_running_loop().add_reader(g.pidfd, self._on_pidfd, g, g.generation)
        for b in g.backends:
            self._watch_backend(g, b)
        atomic_write(self.paths.dm_pid_file(name), f"{popen.pid}\n".encode(), 0o644)
        self._write_meta(g)
        g.note(f"DM spawned, pid {popen.pid}")
        # Wait until the DM answers ping, or exits, whichever first.
        gen = g.generation
        ping = asyncio.ensure_future(self._wait_ping(g))
        died = asyncio.ensure_future(g.exited.wait())
        done, _ = await asyncio.wait({ping, died}, timeout=self.cfg.start_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        for t in (ping, died):
            t.cancel()
        if ping in done and not ping.cancelled() and ping.exception() is None and g.generation == gen \
                and not g.exited.is_set():
            if g.state == "starting":
                g.state = "running" if g.last_event is None or g.last_event.state != "paused" else "paused"
            return
        if not g.exited.is_set():
            g.note("DM did not answer ping in time; killing it")
            await self._kill_and_wait(g, "DM did not come up")
        raise StartFailed(f"guest {name!r}: DM did not start: {g.last_exit_reason}")

    async def _wait_ping(self, g: Guest) -> None:
        deadline = time.monotonic() + self.cfg.start_timeout
        while True:
            try:
                client = await self._connect(g, timeout=1.0)
                await client.call(msg.Ping(), timeout=self.cfg.request_timeout)
                return
            except (OSError, ControlError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    def _jailed(self, g: Guest) -> bool:
        return g.definition.jail.enabled and not self.cfg.no_jail

    def _alloc_uid(self) -> int:
        # Lower half for DMs; the upper half mirrors it for the guests' back-ends (_backend_uid).
        for i in range(max(1, self.cfg.uid_count // 2)):
            uid = self.cfg.uid_base + i
            if uid not in self._uids:
                self._uids.add(uid)
                return uid
        raise StartFailed("no free jail uid left in the configured range")

    def _backend_uid(self, g: Guest) -> int | None:
        """The guest's back-ends' jail uid: distinct from every DM's, inside the configured range."""
        if not self._jailed(g) or g.uid is None:
            return None
        return g.uid + self.cfg.uid_count // 2 if self.cfg.uid_count >= 2 else g.uid

    def _release_uid(self, g: Guest) -> None:
        if g.uid is not None:
            self._uids.discard(g.uid)
            g.uid = None

    def _write_meta(self, g: Guest) -> None:
        meta = {"pid": g.pid, "started_at": g.started_at, "uid": g.uid, "restarts": g.restarts}
        atomic_write(self.paths.meta_file(g.name), json.dumps(meta).encode(), 0o600)

    def _spawn(self, g: Guest) -> subprocess.Popen[bytes]:
        """Prepare every fd of the contract, fork/exec the DM with exactly those, close our copies (thread)."""
        d = g.definition
        name = d.name
        rdir = self.paths.guest_runtime_dir(name)
        rdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        sdir = self.paths.guest_state_dir(name)
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
            sock = bk.spawn(b, self.cfg.backend_command, self._backend_uid(g), self.cfg.backend_ready_timeout)
            return keep(sock.detach())

        try:
            sock_path = self.paths.control_socket(name)
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

            console = self.paths.console_log(name)
            if console.exists() and console.stat().st_size > 0:
                os.replace(console, console.with_name("console.log.1"))
            con = keep(os.open(console, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o640))
            dmlog = keep(os.open(sdir / "dm.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640))
            if os.fstat(dmlog).st_size > 8 << 20:
                os.ftruncate(dmlog, 0)

            kvm = keep(os.open(self.cfg.kvm_device, os.O_RDWR | os.O_CLOEXEC))
            kernel = keep(self._open_kernel(d))
            argv = list(self.cfg.dm_command) + ["--control-fd", str(ctl), "--definition-fd", str(r),
                                                "--console-fd", str(con), "--kvm-fd", str(kvm),
                                                "--kernel-fd", str(kernel)]
            if d.initrd is not None:
                argv += ["--initrd-fd", str(keep(os.open(d.initrd, os.O_RDONLY | os.O_CLOEXEC)))]
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
                        # when the back-end is stopped (_stop_backends).
                        ifname, tfd = dnet.create_tap(nic.tap, bridge=nic.bridge, owner_uid=None, guest=name,
                                                      index=i, persist=True)
                        os.close(tfd)  # a tap without IFF_MULTI_QUEUE takes one fd: the back-end's
                        argv += ["--tap-fd", str(managed(next(specs), ifname))]
                        continue
                    # Not persistent: the tap goes away with the DM's fd; we close our copy below.
                    _ifname, fd = dnet.create_tap(nic.tap, bridge=nic.bridge, owner_uid=g.uid, guest=name, index=i)
                    argv += ["--tap-fd", str(keep(fd))]
            if self._jailed(g):
                root = self.paths.jail_root(name)
                root.mkdir(mode=0o755, exist_ok=True)
                argv += ["--jail-root", str(root), "--uid", str(g.uid), "--gid", str(g.uid)]
            else:
                argv += ["--no-jail"]
            pass_fds = [ctl, *(fd for fd in to_close if fd != dmlog)]
            popen = subprocess.Popen(argv, pass_fds=pass_fds, start_new_session=True, close_fds=True,
                                     stdin=subprocess.DEVNULL, stdout=dmlog, stderr=dmlog, cwd="/")
            ok = True
            return popen
        finally:
            if not ok:
                for b in g.backends:
                    self._end_backend(b)
                g.backends = []
            if listener is not None:
                listener.close()
            for fd in to_close:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _open_kernel(self, d: GuestDefinition) -> int:
        if d.kernel != DEMO_KERNEL:
            return os.open(d.kernel, os.O_RDONLY | os.O_CLOEXEC)
        from guests.build import build_demo  # lazy: another package, and building may be slow

        built: Any = build_demo()
        if isinstance(built, bytes | bytearray):
            fd = os.memfd_create("kvmdm-demo-kernel", os.MFD_CLOEXEC)
            os.write(fd, built)
            os.lseek(fd, 0, os.SEEK_SET)
            return fd
        return os.open(os.fspath(built), os.O_RDONLY | os.O_CLOEXEC)

    # ------------------------------------------------------------------------------------------ exit handling

    def _on_pidfd(self, g: Guest, gen: int) -> None:
        loop = asyncio.get_running_loop()
        pidfd = g.pidfd
        if pidfd is None or gen != g.generation:
            return
        loop.remove_reader(pidfd)
        os.close(pidfd)
        g.pidfd = None
        code: int | None = None
        if g.popen is not None:
            rc = g.popen.wait()  # the pidfd is readable, so the child is a zombie: this does not block
            if rc < 0:
                try:
                    signame = signal.Signals(-rc).name
                except ValueError:
                    signame = str(-rc)
                reason, failure = f"DM killed by signal {signame}", True
            else:
                code = rc
                reason, failure = describe_exit(rc)
        else:
            ev = g.last_event
            if ev is not None and ev.state == "stopped":
                reason, failure = f"DM exited after state 'stopped' ({ev.reason}); exit status unknown", False
                code = None
            elif ev is not None and ev.state == "crashed":
                reason, failure = f"DM exited after state 'crashed' ({ev.reason}); exit status unknown", True
            else:
                reason, failure = "DM exited; exit status unknown (not our child since a daemon restart)", True
        if g.last_event is not None and g.last_event.guest_status is not None:
            g.guest_status = g.last_event.guest_status
        g.note(f"DM pid {g.pid} exited: {reason}")
        self._after_exit(g, reason, code, failure=failure)

    def _after_exit(self, g: Guest, reason: str, code: int | None, *, failure: bool) -> None:
        """Record the exit and decide, per policy, whether and when to restart."""
        g.last_exit_reason = reason
        g.last_exit_code = code
        g.pid = None
        g.popen = None
        g.started_at = None
        if g.control is not None:
            asyncio.ensure_future(g.control.close())
            g.control = None
        self._stop_backends(g)
        self._cleanup_runtime(g.name, keep_dir=True)
        g.exited.set()
        policy = g.definition.restart
        if self._closing or g.stop_requested:
            restart = False
        elif code == ExitCode.RESET:
            restart = policy != "never"
        elif failure:
            restart = policy in ("on-failure", "always")
        else:
            restart = policy == "always"
        # An exit the operator asked for (stop, kill, destroy) is "stopped" even if it took a SIGKILL.
        final = "crashed" if failure and not g.stop_requested else "stopped"
        if not restart:
            g.state = final
            self._release_uid(g)
            return
        now = time.monotonic()
        window = g.definition.restart_window_s
        while g.restart_times and now - g.restart_times[0] > window:
            g.restart_times.popleft()
        if len(g.restart_times) >= g.definition.max_restarts:
            g.state = "failed"
            g.last_exit_reason = (f"{reason}; restart limit reached ({g.definition.max_restarts} "
                                  f"in {window} s)")
            g.note("restart limit reached; giving up")
            self._release_uid(g)
            return
        g.restart_times.append(now)
        g.restarts += 1
        delay = 0.0 if code == ExitCode.RESET else min(
            self.cfg.backoff_max, self.cfg.backoff_initial * 2 ** (len(g.restart_times) - 1))
        g.state = "restarting"
        g.note(f"restarting in {delay:.2f} s (restart #{g.restarts})")
        g.restart_task = asyncio.ensure_future(self._restart_after(g, delay))

    async def _restart_after(self, g: Guest, delay: float) -> None:
        await asyncio.sleep(delay)
        async with g.lock:
            if g.state != "restarting" or g.stop_requested or self.guests.get(g.name) is not g:
                return
            g.restart_task = None
            try:
                await self._start_locked(g)
            except SupervisorError as e:
                log.warning("guest %s: restart failed: %s", g.name, e)

    def _cancel_restart(self, g: Guest) -> None:
        if g.restart_task is not None:
            g.restart_task.cancel()
            g.restart_task = None
        if g.state == "restarting":
            g.state = "stopped"

    def _cleanup_runtime(self, name: str, *, keep_dir: bool) -> None:
        rdir = self.paths.guest_runtime_dir(name)
        if not keep_dir:
            shutil.rmtree(rdir, ignore_errors=True)
            return
        for p in (self.paths.dm_pid_file(name), self.paths.control_socket(name), self.paths.meta_file(name)):
            p.unlink(missing_ok=True)

    # --------------------------------------------------------------------------------------- vhost-user back-ends

    def _watch_backend(self, g: Guest, b: bk.Backend) -> None:
        assert b.pid is not None
        b.pidfd = os.pidfd_open(b.pid)
        b.generation += 1
        b.state = "running"
        asyncio.get_running_loop().add_reader(b.pidfd, self._on_backend_pidfd, g, b, b.generation)

    def _on_backend_pidfd(self, g: Guest, b: bk.Backend, gen: int) -> None:
        if b.pidfd is None or gen != b.generation:
            return
        asyncio.get_running_loop().remove_reader(b.pidfd)
        os.close(b.pidfd)
        b.pidfd = None
        if b.popen is not None:
            rc = b.popen.wait()  # readable pidfd: a zombie, this does not block
            if rc < 0:
                try:
                    reason = f"back-end killed by signal {signal.Signals(-rc).name}"
                except ValueError:
                    reason = f"back-end killed by signal {-rc}"
            else:
                reason = f"back-end exited with status {rc}"
        else:
            reason = "back-end exited (status unknown: not our child since a daemon restart)"
        b.popen = None
        if b.stop_requested or b not in g.backends:
            return
        g.note(f"{b.spec.kind} back-end {b.spec.device} pid {b.pid}: {reason}")
        self._backend_failed(g, b, reason)

    def _backend_failed(self, g: Guest, b: bk.Backend, reason: str) -> None:
        """A back-end died (or could not be restarted) while its guest runs: restart it per the guest's policy
        and limits, or give up (the DM's device then goes to NEEDS_RESET after its grace period)."""
        b.pid = None
        b.last_exit_reason = reason
        if self._closing or b.stop_requested or g.stop_requested or g.state not in LIVE_STATES:
            b.state = "stopped"
            return
        d = g.definition
        if d.restart == "never":
            b.state = "failed"
            g.note(f"back-end {b.spec.device} not restarted (restart policy 'never')")
            return
        now = time.monotonic()
        while b.restart_times and now - b.restart_times[0] > d.restart_window_s:
            b.restart_times.popleft()
        if len(b.restart_times) >= d.max_restarts:
            b.state = "failed"
            b.last_exit_reason = f"{reason}; restart limit reached ({d.max_restarts} in {d.restart_window_s} s)"
            g.note(f"back-end {b.spec.device}: restart limit reached; giving up")
            return
        delay = 0.0 if not b.restart_times else min(
            self.cfg.backend_backoff_max, self.cfg.backoff_initial * 2 ** (len(b.restart_times) - 1))
        b.restart_times.append(now)
        b.restarts += 1
        b.state = "restarting"
        g.note(f"restarting back-end {b.spec.device} in {delay:.2f} s (restart #{b.restarts})")
        b.task = asyncio.ensure_future(self._restart_backend(g, b, delay))

    async def _restart_backend(self, g: Guest, b: bk.Backend, delay: float) -> None:
        await asyncio.sleep(delay)
        b.task = None
        if b.state != "restarting" or b.stop_requested or b not in g.backends:
            return
        try:
            sock = await asyncio.to_thread(bk.spawn, b, self.cfg.backend_command, self._backend_uid(g),
                                           self.cfg.backend_ready_timeout)
        except (bk.BackendStartError, OSError) as e:
            g.note(f"back-end {b.spec.device}: restart failed: {e}")
            self._backend_failed(g, b, f"restart failed: {e}")
            return
        with sock:
            if b.stop_requested or b not in g.backends:  # the guest stopped meanwhile
                self._end_backend(b)
                return
            self._watch_backend(g, b)
            gen = b.generation
            bk.write_pid_file(b)
            try:
                res = await self._request(g, msg.AttachBackend(b.spec.device), fd=sock.fileno())
            except SupervisorError as e:
                g.note(f"back-end {b.spec.device}: re-attach to the DM failed: {e}")
                if b.generation != gen or b.pidfd is None or b.stop_requested:
                    return  # it died meanwhile and its pidfd handler already applied the policy
                self._end_backend(b)  # a back-end the DM cannot use is a failed one: policy and limits decide
                b.stop_requested = False
                self._backend_failed(g, b, f"re-attach to the DM failed: {e}")
                return
        g.note(f"back-end {b.spec.device} pid {b.pid} re-attached to the DM "
               f"({'rings resumed' if res.resumed else 'no rings resumed'})")

    def _end_backend(self, b: bk.Backend) -> None:
        """Kill ``b`` (pidfd or our child), reap it, remove its runtime files and, for net, its tap."""
        b.stop_requested = True
        if b.task is not None:
            b.task.cancel()
            b.task = None
        if b.pidfd is not None:
            with contextlib.suppress(RuntimeError):  # no running loop (spawn thread): nothing registered
                asyncio.get_running_loop().remove_reader(b.pidfd)
        bk.kill(b)
        if b.pidfd is not None:
            os.close(b.pidfd)
            b.pidfd = None
        b.popen, b.pid = None, None
        bk.remove_files(b)
        if b.tap is not None:
            from daemon import net as dnet

            try:
                dnet.remove_tap(b.tap)
            except Exception as e:  # noqa: BLE001 - NetError, NetlinkError, OSError: logged, cleanup goes on
                log.warning("back-end %d: cannot remove tap %s: %s", b.spec.device, b.tap, e)
        if b.state != "failed":
            b.state = "stopped"

    def _stop_backends(self, g: Guest) -> None:
        """The DM is gone (or never came up): its back-ends go too (they serve no one else)."""
        for b in g.backends:
            self._end_backend(b)

    # --------------------------------------------------------------------------------------------- control

    def _on_event(self, g: Guest, client: ControlClient, ev: StateEvent) -> None:
        if g.control is not client:
            return
        g.last_event = ev
        if ev.guest_status is not None:
            g.guest_status = ev.guest_status
        if g.state in ("running", "paused") and ev.state in ("running", "paused"):
            g.state = ev.state

    def _on_close(self, g: Guest, client: ControlClient, reason: str) -> None:
        if g.control is client:
            g.control = None

    async def _connect(self, g: Guest, timeout: float = 2.0) -> ControlClient:
        if g.control is not None and not g.control.closed:
            return g.control
        holder: list[ControlClient] = []
        client = await ControlClient.connect(
            self.paths.control_socket(g.name),
            on_event=lambda ev: self._on_event(g, holder[0], ev) if holder else None,
            on_close=lambda reason: self._on_close(g, holder[0], reason) if holder else None,
            timeout=timeout)
        holder.append(client)
        g.control = client
        return client

    async def _request(self, g: Guest, command: msg.Command[msg.R], timeout: float | None = None,
                       fd: int | None = None) -> msg.R:
        if g.state not in ("running", "paused", "starting", "stopping") or g.pidfd is None:
            raise InvalidState(f"guest {g.name!r} is {g.state}, not running")
        t = self.cfg.request_timeout if timeout is None else timeout
        try:
            client = await self._connect(g, timeout=t)
        except (OSError, TimeoutError) as e:
            raise DMTimeout(f"cannot reach the DM of {g.name!r}: {e}") from None
        try:
            return await client.call(command, timeout=t, fd=fd)
        except ProtocolError as e:
            raise DMFault(f"DM of {g.name!r} answered {command.cmd!r} outside the protocol: {e}") from None
        except ControlClosed as e:
            raise InvalidState(f"DM of {g.name!r} closed the control connection: {e}") from None
        except ControlTimeout as e:
            raise DMTimeout(str(e)) from None
        except ControlError as e:
            raise InvalidState(f"DM refused {command.cmd!r}: {e}") from None

    # ------------------------------------------------------------------------------------ lifecycle commands

    async def stop(self, name: str, timeout: float | None = None) -> Guest:
        """Graceful stop: ask the DM, wait for its exit, SIGKILL after ``timeout``."""
        g = self.get(name)
        async with g.lock:
            if g.state == "restarting":
                g.stop_requested = True
                self._cancel_restart(g)
                self._release_uid(g)
                return g
            if g.pidfd is None:
                raise InvalidState(f"guest {name!r} is {g.state}, not running")
            g.stop_requested = True
            g.state = "stopping"
            t = self.cfg.stop_timeout if timeout is None else timeout
            with contextlib.suppress(SupervisorError):
                await self._request(g, msg.Stop(), timeout=min(t, self.cfg.request_timeout))
            try:
                await asyncio.wait_for(g.exited.wait(), t)
            except TimeoutError:
                g.note(f"DM did not exit within {t:g} s of stop; killing it")
                await self._kill_and_wait(g, "stop timed out")
        return g

    async def kill(self, name: str) -> Guest:
        g = self.get(name)
        async with g.lock:
            if g.state == "restarting":
                g.stop_requested = True
                self._cancel_restart(g)
                self._release_uid(g)
                return g
            if g.pidfd is None:
                raise InvalidState(f"guest {name!r} is {g.state}, not running")
            await self._kill_and_wait(g, "killed by request")
        return g

    async def _kill_and_wait(self, g: Guest, why: str) -> None:
        g.stop_requested = True
        g.note(f"SIGKILL DM pid {g.pid}: {why}")
        self._signal(g, signal.SIGKILL)
        try:
            await asyncio.wait_for(g.exited.wait(), 5.0)
        except TimeoutError:
            log.error("guest %s: DM pid %s survived SIGKILL for 5 s", g.name, g.pid)

    def _signal(self, g: Guest, sig: int) -> None:
        if g.pidfd is not None:
            # pidfd_send_signal cannot hit a recycled pid (pidfd_send_signal(2)).
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(g.pidfd, sig)

    async def pause(self, name: str) -> Guest:
        g = self.get(name)
        if g.state != "running":
            raise InvalidState(f"guest {name!r} is {g.state}, not running")
        await self._request(g, msg.Pause())
        g.state = "paused"
        return g

    async def resume(self, name: str) -> Guest:
        g = self.get(name)
        if g.state != "paused":
            raise InvalidState(f"guest {name!r} is {g.state}, not paused")
        await self._request(g, msg.Resume())
        g.state = "running"
        return g

    async def reset(self, name: str) -> Guest:
        g = self.get(name)
        if g.state not in ("running", "paused"):
            raise InvalidState(f"guest {name!r} is {g.state}, not running")
        await self._request(g, msg.Reset())
        g.note("reset")
        return g

    async def console_input(self, name: str, data: bytes) -> int:
        g = self.get(name)
        reply = await self._request(g, msg.ConsoleInput(data))
        return reply.accepted

    async def stats(self, name: str, timeout: float | None = None) -> Stats:
        g = self.get(name)
        return await self._request(g, msg.GetStats(), timeout=timeout)

    def dm_rss(self, g: Guest) -> int | None:
        """RSS read by the daemon itself from /proc (not trusting the DM's own figure)."""
        if g.pid is None:
            return None
        pid = self.jailed_child(g.pid) or g.pid
        try:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def jailed_child(pid: int) -> int | None:
        """A jailed DM is the only child of the spawned pid (the jail's keeper, daemon/jail.py step 10): the
        process whose memory and CPU are the guest's. None for an unjailed DM (it has no child)."""
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        return int(kids[0]) if len(kids) == 1 else None

    # ------------------------------------------------------------------------------------------- shutdown

    async def close(self) -> None:
        """Daemon exit: stop watching, leave DMs running (they are re-attached by the next daemon)."""
        self._closing = True
        loop = asyncio.get_running_loop()
        for g in self.guests.values():
            if g.restart_task is not None:
                g.restart_task.cancel()
            if g.pidfd is not None:
                loop.remove_reader(g.pidfd)
                os.close(g.pidfd)
                g.pidfd = None
            if g.control is not None:
                await g.control.close()
                g.control = None
            for b in g.backends:  # left running with the DM; the next daemon adopts them (pid files)
                if b.task is not None:
                    b.task.cancel()
                if b.pidfd is not None:
                    loop.remove_reader(b.pidfd)
                    os.close(b.pidfd)
                    b.pidfd = None
                if b.pid is not None:
                    with contextlib.suppress(OSError):
                        bk.write_pid_file(b)
            if g.pid is not None and g.started_at is not None:
                with contextlib.suppress(OSError):
                    self._write_meta(g)

    def summary(self) -> Sequence[dict[str, Any]]:
        return [g.info() for g in self.guests.values()]
